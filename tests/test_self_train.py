"""Issue 23 item 5: self-training (`train --unlabeled DIR`): the pseudo-label rule on numbers, the unlabelled
folder read safely, and a real head path that pseudo-labels photos and refits on them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import COLOURS, colour_image

from food_classifier.training.self_train import pseudo_label, unlabeled_rows
from food_classifier.training.sources import DataError


def test_pseudo_labels_are_confident_and_capped_per_class():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.45, 0.55], [0.2, 0.8], [0.5, 0.5], [0.6, 0.4]])
    idx, labels = pseudo_label(probs, labelled_y=np.array([0, 1]), num_classes=2, min_confidence=0.55,
                               per_label=2.0)
    # class 0: the two most confident of rows 0,1,2,6 (cap 2 x 1 label); class 1: rows 3 and 4 (both >= 0.55)
    assert idx.tolist() == [0, 1, 3, 4] and labels.tolist() == [0, 0, 1, 1]
    none, _ = pseudo_label(probs, np.array([0, 1]), 2, min_confidence=0.95)
    assert len(none) == 0


def test_a_class_without_real_labels_gets_no_pseudo_labels():
    probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.9, 0.1]])
    idx, labels = pseudo_label(probs, labelled_y=np.array([0, 0]), num_classes=2, min_confidence=0.5)
    assert idx.tolist() == [2] and labels.tolist() == [0]


def test_unlabeled_folder_skips_labelled_duplicate_hidden_and_broken_files(tmp_path, capsys):
    root, name = tmp_path / "kept", next(iter(COLOURS))
    (root / "photos" / ".trash").mkdir(parents=True)
    for i in range(3):
        colour_image(name, seed=i).save(root / "photos" / f"p{i}.jpg")
    (root / "photos" / "copy.jpg").write_bytes((root / "photos" / "p0.jpg").read_bytes())  # same photo again
    colour_image(name, seed=9).save(root / "photos" / ".trash" / "hidden.jpg")
    (root / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "photos" / "p0.json").write_text("{}")  # a kept photo's record: not an image
    import hashlib

    labelled = {hashlib.sha256((root / "photos" / "p2.jpg").read_bytes()).hexdigest()}
    rows = unlabeled_rows(root, labelled)
    assert sorted(r.path.name for r in rows) in (["copy.jpg", "p1.jpg"], ["p0.jpg", "p1.jpg"])
    assert {r.tier for r in rows} == {"unlabeled"} and len({r.sha256 for r in rows}) == 2
    out = capsys.readouterr().out
    assert "2 photos" in out and "1 unreadable skipped" in out
    with pytest.raises(DataError, match="--unlabeled .*no such folder"):
        unlabeled_rows(tmp_path / "missing", set())


@pytest.mark.slow
def test_self_train_refits_on_the_labelled_rows_plus_the_heads_own_confident_answers():
    """Whether it pays is bench/bench_active.py's question; here: what the refit is given."""
    import torch

    from food_classifier.training.self_train import self_train

    head = torch.nn.Linear(2, 3)  # class 2 has no label and never wins
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 4.0], [0.0, 0.0]]))
        head.bias.zero_()
    x, y = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), torch.tensor([0, 1])
    # row 2 is a coin toss between 0 and 1 (confidence ~0.4 < MIN_CONFIDENCE)
    unlabeled = torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]], [[0.1, 0.1]], [[0.0, 1.0]]])
    seen = {}

    def refit(a, b):
        seen["x"], seen["y"] = a, b
        return torch.nn.Linear(2, 3)

    tuned, added = self_train(head, x, y, unlabeled, refit)
    assert added == 3 and tuned is not head
    assert seen["x"].shape == (5, 1, 2) and seen["y"].tolist() == [0, 1, 0, 1, 1]
    assert torch.equal(seen["x"][2:], unlabeled[[0, 1, 3]])
    seen.clear()
    same, none = self_train(head, x, y, unlabeled[2:3], refit)  # nothing confident: no refit at all
    assert same is head and none == 0 and not seen


@pytest.mark.slow
def test_train_unlabeled_pseudo_labels_real_photos_and_keeps_out_of_fold_logits(tiny_manifest, tmp_path, capsys):
    from food_classifier.training.config import TrainConfig
    from food_classifier.training.data import read_manifest
    from food_classifier.training.train import fit_run

    pool = tmp_path / "traffic"
    pool.mkdir()
    for c, name in enumerate(COLOURS):
        for i in range(6):
            colour_image(name, size=(110 + 3 * i, 90), noise=60, seed=9000 + 50 * c + i).save(pool / f"{name}{i}.jpg")
    config = TrainConfig(arch="efficientnet_lite0", image_size=64, aug_views=1, seed=0, unlabeled=str(pool))
    fitted = fit_run(tiny_manifest, config, runs_dir=tmp_path / "runs")
    out = capsys.readouterr().out
    assert "unlabeled: 18 photos" in out and "self-training: " in out
    added = int(out.split("self-training: ")[1].split(" of ")[0])
    assert 0 < added <= 18
    n = sum(r.tier in ("train", "validation") for r in read_manifest(tiny_manifest))
    assert fitted.oof.logits.shape == (n, 3) and np.isfinite(fitted.oof.logits).all()
    assert (fitted.oof.logits.argmax(1) == fitted.oof.y).mean() > 0.8
