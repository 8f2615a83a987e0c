"""`train --quality best` (training/finetune.py) on a tiny generated split: end to end to a bundle
that serves, resumed after SIGKILL, stopped honestly by the time budget."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from conftest import colour_image

from food_classifier.inference import Classifier
from food_classifier.training.config import TrainConfig

pytestmark = pytest.mark.slow  # Lite0 trunk activations + a few tuning epochs: a minute or two on 2 cores

BEST = {"arch": "efficientnet_lite0", "quality": "best", "fine_tune_blocks": 1, "batch_size": 8, "seed": 0,
        "patience": 10, "time_budget": 0.0}


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """One feature cache for this module: the trunk activations are computed once, not per test."""
    monkeypatch.setenv("FOOD_CLASSIFIER_CACHE", str(tmp_path_factory.getbasetemp() / "finetune_cache"))


def history(run) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_best_recipe_publishes_a_bundle_that_serves(tiny_manifest, tmp_path):
    from food_classifier.bundle import load_bundle
    from food_classifier.training.pipeline import train_and_publish

    config = TrainConfig(**BEST, epochs=1)
    run, bundle, metrics = train_and_publish(tiny_manifest, config, runs_dir=tmp_path / "runs",
                                             models_dir=tmp_path / "models", name="tiny", int8=True)
    rows = history(run)
    assert [r["stage"] for r in rows] == ["best_member0"] and rows[0]["epoch"] == "1"
    b = load_bundle(bundle)
    assert b.meta.training.arch == "efficientnet_lite0" and b.meta.parity.top1_agreement == 1.0
    assert "int8" in b.meta.variants and b.meta.calibration.temperature > 0
    assert metrics["tiers"]["test"]["n"] > 0
    preds = Classifier(bundle).predict_batch([colour_image(c, seed=7) for c in ("red", "green", "blue")])
    assert all(0 <= p.label_idx < 3 for p in preds)


# Fine-tunes in a child that kills itself (SIGKILL: no cleanup) right after epoch 2 is saved.
CHILD = r"""
import sys
import os, signal
from pathlib import Path
import torch

real_save = torch.save
def save(obj, f, *a, **kw):
    real_save(obj, f, *a, **kw)
    if Path(f).name == "member0-last.pt" and obj["epoch"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save

from food_classifier.training.config import TrainConfig
from food_classifier.training.train import fit_run
fit_run(sys.argv[1], TrainConfig(**eval(sys.argv[3]), epochs=4), runs_dir=sys.argv[2])
print("finished without being killed")
"""


def test_resume_after_sigkill_continues_at_the_next_epoch(tiny_manifest, tmp_path, capsys):
    from food_classifier.training.train import fit_run

    out = subprocess.run([sys.executable, "-c", CHILD, str(tiny_manifest), str(tmp_path), repr(BEST)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == -9, out.stdout + out.stderr
    (run,) = tmp_path.iterdir()
    assert [r["epoch"] for r in history(run)] == ["1", "2"]
    fitted = fit_run(tiny_manifest, TrainConfig(**BEST, epochs=4), resume=run)
    assert "resuming at epoch 3/4" in capsys.readouterr().out
    assert [r["epoch"] for r in history(run)] == ["1", "2", "3", "4"]  # epochs 1-2 not trained again
    assert (run / "member0.pt").is_file() and fitted.dir == run
    # a finished member is loaded, not tuned again
    fit_run(tiny_manifest, TrainConfig(**BEST, epochs=4), resume=run)
    assert "already tuned" in capsys.readouterr().out
    assert len(history(run)) == 4


def test_time_budget_stops_between_epochs_and_says_so(tiny_manifest, tmp_path, capsys):
    from food_classifier.training.train import fit_run

    fitted = fit_run(tiny_manifest, TrainConfig(**(BEST | {"time_budget": 0.001}), epochs=5), runs_dir=tmp_path)
    assert [r["epoch"] for r in history(fitted.dir)] == ["1"]  # one epoch always runs; then the budget stops it
    assert "stopped after epoch 1/5" in fitted.stopped and fitted.stopped in capsys.readouterr().out


def test_device_cuda_without_a_gpu_is_a_clear_error():
    import torch

    from food_classifier.training.finetune import resolve_device

    assert resolve_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
