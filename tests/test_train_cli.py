"""`train` as a new user runs it (issue 16): photos in, a served-ready bundle out, with the split's
findings, a time per stage, where everything went and the exact command that serves it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import make_colour_bundle, make_imagefolder

from food_classifier.cli.train import next_steps

CLI = [sys.executable, "-m", "food_classifier.cli"]
STAGES = ["prepare", "fit", "export", "evaluate", "calibrate", "int8", "publish"]


@pytest.mark.slow
def test_train_data_folder_prepares_trains_and_says_how_to_serve(tmp_path):
    photos = make_imagefolder(tmp_path / "my photos", per_class=10)
    (photos / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    env = {k: v for k, v in os.environ.items() if k != "FOOD_CLASSIFIER_PROGRESS"}
    out = subprocess.run([*CLI, "train", "--data", str(photos), "--manifest", str(tmp_path / "data" / "m.csv"),
                          "--arch", "base_cnn", "--epochs", "1", "--batch-size", "8",
                          "--runs-dir", str(tmp_path / "runs"), "--models-dir", str(tmp_path / "models")],
                         capture_output=True, text=True, timeout=600, env=env)  # stdout and stderr: pipes
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "\r" not in text + out.stderr  # progress off a terminal: lines, not bars
    assert re.search(r"^scanning images: done, 31 img", out.stderr, re.M)
    assert "rejected: 1 file(s), skipped" in text and "  red/broken.jpg: " in text  # the split's findings
    assert (tmp_path / "data" / "m.csv").is_file()

    table = text[text.index("stage "):]
    stages = re.findall(r"^(\w+) +(\d+\.\d) +\d+ %$", table, re.M)
    assert [name for name, _ in stages] == [*STAGES, "other"], table  # other: start-up, imports
    assert re.search(r"^total +\d+\.\d +\(\d+ min \d\d s\)$", table, re.M)
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "timings.json").read_text()).keys() == set(STAGES)

    (version,) = [p for p in (tmp_path / "models" / "food").iterdir()]
    assert f"bundle: {version}  (" in text and "MB; `serve` will use its" in text
    assert f"run:    {run}" in text
    assert f"serve it:  food-classifier serve {tmp_path / 'models' / 'food'}" in text


def test_train_refuses_data_with_resume(tmp_path):
    out = subprocess.run([*CLI, "train", "--data", str(tmp_path), "--resume", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "pass one of them" in out.stderr and "Traceback" not in out.stderr


def test_train_refuses_bad_recipe_options_before_any_work(tmp_path):
    photos = make_imagefolder(tmp_path / "photos", per_class=2)
    manifest = tmp_path / "m.csv"
    for extra, message in ((["--target-precision", "0.9", "--target-coverage", "0.8"], "exclude each other"),
                           (["--target-coverage", "0"], "--target-coverage must be in (0, 1]"),
                           (["--unlabeled", str(tmp_path / "nowhere")], "no such folder"),
                           (["--quality", "best", "--unlabeled", str(tmp_path)], "--unlabeled self-trains")):
        out = subprocess.run([*CLI, "train", "--data", str(photos), "--manifest", str(manifest), *extra],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert not manifest.exists()  # nothing half done


def test_train_options_come_from_train_config():
    """The abstention targets are declared once, in TrainConfig: the CLI shows its help text."""
    from dataclasses import fields

    from food_classifier.training.config import TrainConfig

    out = subprocess.run([*CLI, "train", "--help"], capture_output=True, text=True, timeout=120)
    shown = " ".join(out.stdout.split())  # the help is wrapped to the terminal
    for name in ("target_precision", "target_coverage"):
        f = next(f for f in fields(TrainConfig) if f.name == name)
        assert f.default is None and " ".join(f.metadata["help"].split()) in shown, name


def test_next_steps_name_the_version_to_serve_when_another_is_promoted(tmp_path):
    from food_classifier.bundle import set_promoted

    model = tmp_path / "my models" / "food"
    old = make_colour_bundle(model / "v1", version="v1", name="food")
    new = make_colour_bundle(model / "v2", version="v2", name="food", created_at="2026-02-01T00:00:00+00:00")
    text = next_steps(tmp_path / "runs" / "r", new, model)
    assert f"serve it:  food-classifier serve '{model}'" in text  # quoted: the path has a space
    set_promoted(model, "v1")
    text = next_steps(tmp_path / "runs" / "r", new, model)
    assert f"note: {model} serves its promoted version v1, not this one" in text
    assert f"serve this one:  food-classifier serve '{new}'" in text
    assert f"or promote it:   food-classifier models promote food v2 --models-dir '{model.parent}'" in text
    assert old.is_dir()
