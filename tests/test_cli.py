"""The command line as a user meets it: help everywhere, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import colour_image

CLI = [sys.executable, "-m", "food_classifier.cli"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


@pytest.mark.parametrize("cmd", [[], ["data"], ["data", "split"], ["data", "fetch"], ["data", "prepare"],
                                 ["train"], ["evaluate"], ["export"], ["predict"], ["serve"], ["report"]])
def test_every_command_has_help(cmd):
    out = run(*cmd, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["data", "split", "/no/such/folder"], "/no/such/folder"),
    (["train", "--manifest", "/no/such/manifest.csv"], "does not exist"),
    (["predict", "--model", "/no/such/model", "x.jpg"], "no model bundle found"),
    (["evaluate", "/no/such/run"], "not a run dir"),
])
def test_user_errors_are_one_clear_line(args, message):
    out = run(*args)
    assert out.returncode == 1
    assert message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1


def test_unknown_model_name_is_one_clear_line(tiny_manifest):
    out = run("train", "--manifest", str(tiny_manifest), "--arch", "pizzanet")
    assert out.returncode == 1 and "unknown model 'pizzanet'" in out.stderr and "Traceback" not in out.stderr


def test_split_prints_the_count_table(tmp_path):
    from conftest import make_imagefolder

    root = make_imagefolder(tmp_path / "photos", per_class=10)
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = run("data", "split", str(tmp_path), "--manifest", str(tmp_path / "m.csv"))
    assert out.returncode == 0, out.stderr
    assert "validation" in out.stdout and "total" in out.stdout
    assert "30 images; 1 rejected" in out.stdout


def test_data_prepare_uses_the_local_folder(tmp_path):
    from conftest import make_imagefolder

    make_imagefolder(tmp_path / "photos", per_class=8)
    out = run("data", "prepare", "--manifest", str(tmp_path / "m.csv"),
              env={"FOOD_CLASSIFIER_DATA": str(tmp_path / "photos")})
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m.csv").is_file() and "24 images" in out.stdout


def test_predict_prints_labels_and_json(colour_bundle, tmp_path):
    for name in ("red", "blue"):
        colour_image(name).save(tmp_path / f"{name}.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    out = run("predict", "--model", str(colour_bundle), str(tmp_path / "red.png"), str(tmp_path / "bad.jpg"))
    assert out.returncode == 1  # issue 16: an unreadable image fails the command (the others are still answered)
    assert "red.png: red" in out.stdout and "bad.jpg: error" in out.stderr
    out = run("predict", "--json", "--model", str(colour_bundle), str(tmp_path / "blue.png"))
    assert json.loads(out.stdout)["label"] == "blue"
