"""`train --quality/--device` user errors: one line, exit 1, no traceback (the CLI checks them before any work)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def train(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "food_classifier.cli", "train", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize(("args", "message"), [
    (["--quality", "ultra"], "--quality ultra: choose one of fast, best"),
    (["--device", "tpu"], "--device tpu: choose one of auto, cpu, cuda"),
])
def test_bad_choice_is_one_line(tmp_path, args, message):
    out = train(*args, cwd=tmp_path)
    assert out.returncode == 1 and message in out.stderr + out.stdout
    assert "Traceback" not in out.stderr


def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    out = train("--device", "cuda", cwd=tmp_path)
    assert out.returncode == 1 and "PyTorch sees no CUDA GPU" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
