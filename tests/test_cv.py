"""Cross-validation: fold construction (stratified, groups kept together, test tier untouched), the
mean +- std arithmetic, and one real 2-fold run of the recipe on generated photos."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import make_imagefolder

from food_classifier.training.cv import cross_validate, format_cv, make_folds, mean_std, row_groups
from food_classifier.training.data import Row


def test_mean_std_is_sample_std():
    s = mean_std([0.9, 0.95, 1.0])
    assert s["mean"] == pytest.approx(0.95) and s["std"] == pytest.approx(0.05)  # ddof=1
    assert (s["min"], s["max"]) == (0.9, 1.0)
    assert mean_std([0.8])["std"] == 0.0


def synthetic(n_per_class: int = 40, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(classes), n_per_class)
    groups = np.arange(len(labels))
    groups[1::7] = groups[0::7][: len(groups[1::7])]  # every 7th pair is a duplicate group
    return labels, groups


def test_folds_partition_stratify_and_keep_groups_together():
    labels, groups = synthetic()
    folds = make_folds(labels, groups, k=5, val_fraction=0.2, seed=1)
    assert len(folds) == 5
    held = np.concatenate([f["held_out"] for f in folds])
    assert sorted(held.tolist()) == list(range(len(labels)))  # each row held out exactly once
    for f in folds:
        parts = [set(f[k].tolist()) for k in ("train", "validation", "held_out")]
        assert sum(map(len, parts)) == len(labels) and set.union(*parts) == set(range(len(labels)))
        for g in np.unique(groups):
            members = set(np.flatnonzero(groups == g).tolist())
            assert sum(bool(members & p) for p in parts) == 1  # a duplicate group never straddles parts
        counts = Counter(labels[f["held_out"]].tolist())
        assert all(abs(counts[c] - 8) <= 2 for c in range(3))  # stratified: ~40/5 per class
        share = len(f["validation"]) / (len(f["train"]) + len(f["validation"]))
        assert 0.12 < share < 0.3


def test_repeats_reshuffle():
    labels, groups = synthetic()
    folds = make_folds(labels, groups, k=3, val_fraction=0.2, seed=0, repeats=2)
    assert len(folds) == 6
    first = {frozenset(f["held_out"].tolist()) for f in folds[:3]}
    second = {frozenset(f["held_out"].tolist()) for f in folds[3:]}
    assert first != second


def test_k_below_two_is_refused():
    labels, groups = synthetic()
    with pytest.raises(ValueError, match="K >= 2"):
        make_folds(labels, groups, k=1, val_fraction=0.2)


def test_row_groups_merge_exact_and_reported_duplicates(tmp_path):
    rows = [Row(tmp_path / f"{i}.jpg", "a", "train", sha) for i, sha in enumerate("xxyzw")]
    manifest = tmp_path / "m.csv"
    (tmp_path / "m.report.json").write_text(json.dumps({"duplicate_groups": [
        {"exact": False, "labels": ["a"], "paths": [str(tmp_path / "2.jpg"), str(tmp_path / "3.jpg")]}]}))
    g = row_groups(rows, manifest)
    assert g[0] == g[1] and g[2] == g[3] and len(set(g.tolist())) == 3


@pytest.mark.slow
def test_cross_validate_runs_the_recipe_and_leaves_test_alone(tmp_path):
    from food_classifier.training.data import read_manifest, split
    from food_classifier.training.train import TrainConfig

    split(make_imagefolder(tmp_path / "photos", per_class=10), tmp_path / "manifest.csv", progress=False)
    rows = read_manifest(tmp_path / "manifest.csv")
    n_fold_rows = sum(r.tier != "test" for r in rows)
    config = TrainConfig(arch="base_cnn", epochs=1, batch_size=8, seed=0, threads=1)
    cv = cross_validate(tmp_path / "manifest.csv", config, k=2, out_dir=tmp_path)
    assert cv["n_rows"] == n_fold_rows < len(rows)
    assert len(cv["folds"]) == 2 and sum(f["n_held_out"] for f in cv["folds"]) == n_fold_rows
    accs = [f["accuracy"] for f in cv["folds"]]
    assert cv["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert cv["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert json.loads(Path(tmp_path / "cv.json").read_text())["k"] == 2
    text = format_cv(cv)
    assert "2-fold" in text and "±" in text and "test tier untouched" in text
