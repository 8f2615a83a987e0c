"""Training side end to end on generated photos (seconds): fit -> export -> evaluate -> publish."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import colour_image
from PIL import Image

from food_classifier.bundle import load_bundle
from food_classifier.inference import Classifier
from food_classifier.training.config import TrainConfig
from food_classifier.training.data import read_manifest
from food_classifier.training.pipeline import train_and_publish
from food_classifier.training.runs import History
from food_classifier.training.train import fit, load_checkpoint


@pytest.fixture(scope="module")
def cnn_run(tiny_manifest, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cnn")
    config = TrainConfig(arch="base_cnn", epochs=3, batch_size=8, seed=0, threads=1, patience=10)
    run, bundle, metrics = train_and_publish(tiny_manifest, config, runs_dir=tmp / "runs",
                                             models_dir=tmp / "models", name="tiny")
    return run, bundle, metrics


def history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_run_dir_has_checkpoint_history_and_plot(cnn_run):
    run, _, _ = cnn_run
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(r["stage"] == "end_to_end" for r in rows)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    with Image.open(run / "history.png") as png:
        assert png.size[0] >= 800
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] == "base_cnn" and config["labels"] == ["blue", "green", "red"]
    assert config["train_seconds"] > 0


@pytest.mark.slow
def test_published_bundle_is_complete_and_predicts(cnn_run, tiny_manifest):
    run, bundle_dir, metrics = cnn_run
    assert bundle_dir.parent.name == "tiny" and bundle_dir.name.endswith(load_bundle(bundle_dir).version[-8:])
    b = load_bundle(bundle_dir)
    assert b.meta.parity.max_abs_prob_diff < 1e-4 and b.meta.parity.top1_agreement == 1.0
    assert set(b.meta.metrics) == {"train", "validation", "test"}
    assert b.meta.dataset.manifest_sha256 and b.meta.training.arch == "base_cnn"
    assert b.preprocessing.crop == 128
    n = {t: sum(r.tier == t for r in read_manifest(tiny_manifest)) for t in ("train", "validation", "test")}
    assert {t: m["n"] for t, m in metrics["tiers"].items()} == n
    assert json.loads((run / "metrics.json").read_text())["tiers"]["test"]["n"] == n["test"]
    clf = Classifier(bundle_dir)
    preds = clf.predict_batch([colour_image(c, seed=7) for c in ("red", "green", "blue")])
    assert all(0 <= p.label_idx < 3 for p in preds)


@pytest.mark.slow
def test_same_seed_same_model(tiny_manifest, tmp_path):
    config = TrainConfig(arch="base_cnn", epochs=1, batch_size=8, seed=3, threads=1)
    a = fit(tiny_manifest, config, runs_dir=tmp_path)
    b = fit(tiny_manifest, config, runs_dir=tmp_path)
    assert a != b
    assert [r["train_loss"] for r in history(a)] == [r["train_loss"] for r in history(b)]


@pytest.mark.slow
def test_resume_continues_where_it_stopped(tiny_manifest, tmp_path, monkeypatch):
    config = TrainConfig(arch="base_cnn", epochs=4, batch_size=8, seed=0, threads=1, patience=10)
    original = History.log

    def interrupted(self, epoch, *args):
        if epoch == 3:  # killed during epoch 3, after epoch 2's last.pt was written
            raise KeyboardInterrupt
        return original(self, epoch, *args)

    monkeypatch.setattr(History, "log", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_manifest, config, runs_dir=tmp_path)
    monkeypatch.setattr(History, "log", original)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert [int(r["epoch"]) for r in history(run)] == [1, 2]
    fit(tiny_manifest, config, resume=run)
    assert [int(r["epoch"]) for r in history(run)] == [1, 2, 3, 4]  # resumed at 3, did not start over
    model, meta = load_checkpoint(run)
    assert meta.arch == "base_cnn" and not model.training


@pytest.mark.slow
def test_out_of_fold_logits_never_see_their_own_row():
    """A row duplicated with a flipped label would be memorised by a head that saw it; out of fold it can't be."""
    import torch

    from food_classifier.training.head import out_of_fold_logits

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 4
    y = torch.arange(60) % 3
    x = centres[y] + torch.randn(60, 16, generator=g)
    xv = torch.stack([x, x + 0.1], dim=1)  # 60 rows x 2 views
    logits = out_of_fold_logits(torch.nn.Linear(16, 3), xv, y, TrainConfig(weight_decay=1e-3), epochs=5)
    assert logits.shape == (60, 3)
    assert (logits.argmax(1) == y.numpy()).mean() >= 0.95  # clusters are separable: held-out rows still right
    # a far outlier row labelled against its cluster stays "wrong" out of fold (nobody memorised it)
    y_bad = y.clone()
    y_bad[0] = (y[0] + 1) % 3
    logits_bad = out_of_fold_logits(torch.nn.Linear(16, 3), xv, y_bad, TrainConfig(weight_decay=1e-3), epochs=5)
    assert logits_bad[0].argmax() == y[0]


@pytest.mark.slow
def test_calibration_uses_out_of_fold_logits_on_the_head_path(tiny_manifest, tmp_path):
    from food_classifier.training.pipeline import finalize

    config = TrainConfig(arch="efficientnet_lite0", image_size=64, aug_views=1, seed=0)
    run = fit(tiny_manifest, config, runs_dir=tmp_path / "runs")
    assert (run / "oof_logits.npz").is_file()
    bundle, _ = finalize(run, models_dir=None, int8=False)
    cal = load_bundle(bundle).meta.calibration
    n = sum(r.tier in ("train", "validation") for r in read_manifest(tiny_manifest))
    assert cal.fitted_on == "out-of-fold train+validation" and cal.n_fit == n
    ref = load_bundle(bundle).meta.reference  # monitoring's baseline, from the same held-out probabilities
    assert ref is not None and ref.n == n and ref.source == cal.fitted_on and sum(ref.class_counts) == n


@pytest.mark.slow
@pytest.mark.parametrize("refit", [True, False])
def test_refit_head_sees_validation_and_says_so(tiny_manifest, tmp_path, refit):
    """With refit the head is fitted on train+validation: validation is then flagged as not held out
    in the bundle, the metrics and the printed table, and no validation curve is logged for it."""
    from food_classifier.training.evaluate import format_table
    from food_classifier.training.pipeline import finalize

    config = TrainConfig(arch="efficientnet_lite0", image_size=64, aug_views=1, seed=0, refit=refit)
    run = fit(tiny_manifest, config, runs_dir=tmp_path / "runs")
    bundle, metrics = finalize(run, models_dir=None, int8=False)
    fitted = ["train", "validation"] if refit else ["train"]
    assert load_bundle(bundle).meta.training.fit_tiers == fitted
    assert {t: m["held_out"] for t, m in metrics["tiers"].items()} == \
        {t: t not in fitted for t in ("train", "validation", "test")}
    assert load_bundle(bundle).meta.metrics["validation"].held_out is (not refit)
    table = format_table(metrics)
    assert ("validation* " in table) is refit and "train* " in table and "test* " not in table
    val_logged = [r["val_loss"] for r in history(run)]
    assert all(v == "nan" for v in val_logged) if refit else all(v != "nan" for v in val_logged)
    from food_classifier.training.report import build_report

    html = build_report(run).read_text()
    tiers_section = html.split('data-section="tiers"')[1].split("</section>")[0]
    assert ("validation*" in tiers_section) is refit and "test*" not in tiers_section
    assert "accuracy on out-of-fold train+validation (held out" in html
    # the fitted tiers were scored from the head's cached-feature logits, not the bundle: same numbers
    import numpy as np

    with np.load(run / "head_logits.npz") as h:
        assert len(h["path"]) == sum(r.tier in fitted for r in read_manifest(tiny_manifest))
    saved, clf = np.load(run / "logits.npz"), Classifier(bundle)
    idx = np.flatnonzero(np.isin(saved["tier"], fitted))[::5]
    ref = clf.logits(np.stack([clf.preprocess(p) for p in saved["path"][idx]]))
    np.testing.assert_allclose(saved["logits"][idx], ref, atol=1e-4)


@pytest.mark.slow
def test_ensemble_head_fit_equals_each_member_fitted_alone():
    """The joint L-BFGS fit of an EnsembleHead is the sum of independent problems: at convergence
    each member head is the one a plain Linear reaches on that member's features alone."""
    import torch

    from food_classifier.training.head import lbfgs_head_step
    from food_classifier.training.models import EnsembleHead

    g = torch.Generator().manual_seed(1)
    y = torch.arange(90) % 3
    a = torch.randn(3, 8, generator=g)[y] + torch.randn(90, 8, generator=g)
    b = torch.randn(3, 5, generator=g)[y] + 2 * torch.randn(90, 5, generator=g)
    config = TrainConfig(weight_decay=1e-2, label_smoothing=0.1)
    joint = EnsembleHead([8, 5], 3)
    step = lbfgs_head_step(joint, torch.cat([a, b], 1), y, config)
    for _ in range(60):
        step()
    for head, x in zip(joint.heads, (a, b), strict=True):
        alone = torch.nn.Linear(x.shape[1], 3)
        step = lbfgs_head_step(alone, x, y, config)
        for _ in range(60):
            step()
        with torch.no_grad():  # probabilities: logits may differ by a constant (biases are not penalised)
            torch.testing.assert_close(head(x).softmax(1), alone(x).softmax(1), atol=2e-3, rtol=0)
    with torch.no_grad():  # and the ensemble's logits are the members' mean
        x = torch.cat([a, b], 1)
        torch.testing.assert_close(joint(x), (joint.heads[0](a) + joint.heads[1](b)) / 2)
