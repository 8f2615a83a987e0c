"""`train` killed with SIGKILL while publishing and while quantizing: the server then serves the last
published version, never the half-written one, and nothing is left outside the run and models dirs."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from conftest import make_colour_bundle

from food_classifier.bundle import versions
from food_classifier.testing import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.live]  # trains (torch), then serves what survived

# Runs `train` in a child that kills itself (SIGKILL: no cleanup, no finally) at one moment.
CHILD = r"""
import os, signal, sys
from pathlib import Path

manifest, root, moment = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if moment == "publish":  # the rename that publishes a bundle: its temp dir is complete, not yet in place
    real_rename = os.rename
    def rename(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".tmp-") and not Path(dst).name.startswith("."):
            die()
        return real_rename(src, dst, *args, **kwargs)
    os.rename = rename
else:  # quantization: ONNX Runtime has written its scratch files, the int8 graph is not in place
    import onnxruntime.quantization as q
    for name in ("quantize_static", "quantize_dynamic"):
        real = getattr(q, name)
        def quantize(*args, _real=real, **kwargs):
            _real(*args, **kwargs)
            die()
        setattr(q, name, quantize)

from food_classifier.training.config import TrainConfig
from food_classifier.training.pipeline import train_and_publish

config = TrainConfig(arch="base_cnn", epochs=1, batch_size=8, seed=0, threads=1)
train_and_publish(manifest, config, runs_dir=root / "runs", models_dir=root / "models", name="tiny")
print("finished without being killed")
"""


@pytest.mark.parametrize("moment", ["publish", "quantize"])
def test_killed_train_leaves_the_last_published_version_served(tiny_manifest, tmp_path, moment):
    model_dir = tmp_path / "models" / "tiny"
    make_colour_bundle(model_dir / "v0", version="v0", name="tiny")  # what was published before
    tmp_before = set(Path(tempfile.gettempdir()).iterdir())
    out = subprocess.run([sys.executable, "-c", CHILD, str(tiny_manifest), str(tmp_path), moment],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == -9, out.stdout + out.stderr  # it really died by SIGKILL at that moment
    assert [v.name for v in versions(model_dir)] == ["v0"]
    if moment == "publish":  # the complete but unpublished bundle is there, hidden
        (left,) = [p for p in model_dir.iterdir() if p.name.startswith(".tmp-")]
        assert (left / "bundle.json").is_file() and (left / "model.onnx").is_file()
    new_in_tmp = [p.name for p in set(Path(tempfile.gettempdir()).iterdir()) - tmp_before if "int8" in p.name]
    assert new_in_tmp == []  # quantization scratch lives beside its output, inside the run dir
    with ServerProcess([model_dir], args=["--ort-threads", "1"]) as srv:
        assert httpx.get(f"{srv.url}/readyz", timeout=10).json()["models"] == {"tiny": "v0"}
