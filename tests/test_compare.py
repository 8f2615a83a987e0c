"""Champion and challenger (issue 23 item 4): `models compare` and `models promote --if-better` on real tiny ONNX
bundles and labelled photo folders; McNemar's exact test without scipy."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_colour_bundle, make_imagefolder

from food_classifier.bundle import promoted_version
from food_classifier.compare import bootstrap_ci, labelled_photos, mcnemar_exact

CLI = [sys.executable, "-m", "food_classifier.cli"]
GOOD = "20260101T000000-colour"
SOFT = "20260201T000000-soft"    # same best class as GOOD, less sure: equally accurate
WRONG = "20260301T000000-argmin"  # the newest: picks the least present colour, never right


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    make_colour_bundle(root / "colour" / GOOD)
    make_colour_bundle(root / "colour" / SOFT, version=SOFT, created_at="2026-02-01T00:00:00+00:00", scale=2.0)
    make_colour_bundle(root / "colour" / WRONG, version=WRONG, created_at="2026-03-01T00:00:00+00:00", scale=-4.0)
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("labelled") / "data", per_class=6)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_mcnemar_exact_matches_the_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    for a, b in [(0, 0), (0, 5), (3, 9), (10, 10), (1, 20), (40, 25)]:
        want = stats.binomtest(min(a, b), a + b, 0.5).pvalue if a + b else 1.0
        assert mcnemar_exact(a, b) == pytest.approx(want, rel=1e-9), (a, b)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_photos():
    rng = np.random.default_rng(1)
    small = rng.choice([-1.0, 0.0, 0.0, 1.0, 1.0], size=40)
    big = np.tile(small, 25)
    lo, hi = bootstrap_ci(small)
    assert lo <= small.mean() <= hi
    lo2, hi2 = bootstrap_ci(big)
    assert hi2 - lo2 < (hi - lo) / 3


def test_photos_are_the_test_tier_plus_labelled_ones_the_model_did_not_fit(tmp_path):
    photos = make_imagefolder(tmp_path / "photos", per_class=4)
    files = sorted(photos.rglob("*.jpg"))
    import hashlib

    sha = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "tier", "sha256"])
        for i, p in enumerate(files[:6]):
            w.writerow([p, p.parent.name, "test" if i < 2 else "train", sha[p]])
        w.writerow([tmp_path / "gone.jpg", "red", "test", "0" * 64])
    got = labelled_photos(tmp_path / "m.csv", photos)
    assert [p.source for p in got.photos].count("test tier") == 2
    assert len(got.photos) == len(files) - 4  # the 4 train photos are left out, the 2 test ones counted once
    assert got.skipped == {"test photo missing on disk": 1, "labelled photo in the manifest's train/validation": 4}


def test_compare_prints_accuracies_paired_difference_mcnemar_per_class_and_coverage(models, labelled):
    out = run("models", "compare", "colour", GOOD, WRONG, "--data", str(labelled), "--models-dir", str(models))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "photos: 18 labelled" in text
    assert "accuracy  A 100.0 %   B   0.0 %" in text
    assert "B - A     -100.0 points, bootstrap 95 % interval [-100.0, -100.0]" in text
    assert f"exact p = {mcnemar_exact(18, 0):.3g}  (18 photos only A gets right, 0 only B)" in text
    for colour in ("blue", "green", "red"):
        assert re.search(rf"^{colour} +6 +100\.0 +0\.0 +-100\.0$", text, re.M), text
    assert "A at its threshold none: answers 100.0 % of photos, 100.0 % of those right" in text
    assert f"{WRONG} is worse" in text


def test_defaults_are_the_served_champion_and_the_newest_challenger(models, labelled):
    out = run("models", "compare", "colour", "--data", str(labelled), "--models-dir", str(models))
    assert out.returncode == 0, out.stderr  # nothing promoted: the newest against the one before it
    assert f"A (champion):   {SOFT}" in out.stdout and f"B (challenger): {WRONG}" in out.stdout
    out = run("models", "compare", "colour", WRONG, WRONG, "--models-dir", str(models))
    assert out.returncode == 1 and f"A and B are both {WRONG}" in out.stderr and "Traceback" not in out.stderr
    assert run("models", "promote", "colour", GOOD, "--models-dir", str(models)).returncode == 0
    out = run("models", "compare", "colour", "--data", str(labelled), "--models-dir", str(models))
    assert out.returncode == 0, out.stderr
    assert f"A (champion):   {GOOD}" in out.stdout and f"B (challenger): {WRONG}" in out.stdout


def test_promote_if_better_refuses_a_worse_challenger_and_takes_an_equal_one(models, labelled):
    d = ["--data", str(labelled), "--models-dir", str(models)]
    assert run("models", "promote", "colour", GOOD, "--models-dir", str(models)).returncode == 0
    out = run("models", "promote", "colour", WRONG, "--if-better", *d)
    assert out.returncode == 1, out.stdout
    assert f"not promoted: {WRONG} is worse: -100.0% on 18 photos" in out.stderr and "Traceback" not in out.stderr
    assert promoted_version(models / "colour") == GOOD  # unchanged
    out = run("models", "promote", "colour", SOFT, "--if-better", *d)
    assert out.returncode == 0, out.stderr
    assert f"{SOFT} is not worse: +0.0% on 18 photos" in out.stdout
    assert promoted_version(models / "colour") == SOFT
    out = run("models", "promote", "colour", SOFT, "--if-better", *d)
    assert out.returncode == 0 and "promoted already" in out.stdout


def test_an_unreadable_photo_is_left_out_for_both_and_counted(models, labelled, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(labelled, data)
    (data / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = run("models", "compare", "colour", GOOD, SOFT, "--data", str(data), "--models-dir", str(models))
    assert out.returncode == 0, out.stderr
    assert "photos: 18 labelled; skipped 1 (unreadable photo)" in out.stdout


def test_no_labelled_photos_is_a_clear_error(models, tmp_path):
    (tmp_path / "empty").mkdir()
    out = run("models", "compare", "colour", GOOD, SOFT, "--data", str(tmp_path / "empty"), "--models-dir",
              str(models))
    assert out.returncode == 1 and "no labelled photos to compare on" in out.stderr
    out = run("models", "compare", "colour", GOOD, "nope", "--models-dir", str(models))
    assert out.returncode == 1 and "has no version 'nope'" in out.stderr
