"""Issue 23 item 3: retraining on a grown folder keeps every known photo in its tier (a photo once in
test stays in test) and reuses every cached feature, extracting only the new photos."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import COLOURS, colour_image, make_imagefolder

from food_classifier.training.data import read_manifest, split


def grow(root: Path, per_class: int, start: int = 1000) -> None:
    """Add `per_class` new, distinct photos to every class (as labelling would)."""
    for c, name in enumerate(COLOURS):
        for i in range(start, start + per_class):
            colour_image(name, size=(130 + 3 * (i - start), 96), noise=60, seed=7000 + 100 * c + i).save(
                root / name / f"new_{i}.jpg", quality=90)


def tiers(manifest: Path) -> dict[str, str]:
    return {r.sha256: r.tier for r in read_manifest(manifest)}


def test_resplit_of_a_grown_folder_keeps_every_known_photo_in_its_tier(tmp_path):
    photos = make_imagefolder(tmp_path / "photos", per_class=12)
    split(photos, tmp_path / "m.csv", progress=False)
    before = tiers(tmp_path / "m.csv")
    grow(photos, 10)
    shutil.copy(tmp_path / "m.csv", tmp_path / "fresh.csv")
    rows = split(photos, tmp_path / "m.csv", progress=False)
    after = {r.sha256: r.tier for r in rows}
    assert {h: after[h] for h in before} == before  # nothing known moved
    new = [r for r in rows if r.sha256 not in before]
    assert len(new) == 30 and {r.tier for r in new} == {"train", "validation", "test"}
    for label in COLOURS:  # the new photos filled the tiers toward the ratios (22 photos: ~3 test)
        n_test = sum(r.tier == "test" for r in rows if r.label == label)
        assert 2 <= n_test <= 5, (label, n_test)
    # without the previous manifest (what split did before), known photos do move: the test above has teeth
    moved = {h for h, t in tiers_of(split(photos, tmp_path / "fresh.csv", progress=False, keep_tiers=False)).items()
             if h in before and before[h] != t}
    assert moved


def tiers_of(rows: list) -> dict[str, str]:
    return {r.sha256: r.tier for r in rows}


def test_resplit_ignores_an_unreadable_previous_manifest(tmp_path):
    photos = make_imagefolder(tmp_path / "photos", per_class=6)
    (tmp_path / "m.csv").write_text("not,a,manifest\n")
    rows = split(photos, tmp_path / "m.csv", progress=False)
    assert len(rows) == 18 and read_manifest(tmp_path / "m.csv") == rows


class _TinyBackbone:
    """A real (tiny) torch backbone: `forward_features` is what features.extract exports and runs."""

    @staticmethod
    def make():
        import torch

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 4, 3)

            def forward_features(self, x):
                return self.conv(x).mean(dim=(2, 3))

        torch.manual_seed(0)
        return Tiny().eval()


@pytest.mark.slow
def test_extract_reuses_cached_features_and_computes_only_new_photos(tmp_path, monkeypatch):
    from food_classifier.preprocessing import PreprocessSpec
    from food_classifier.training import features as F

    monkeypatch.setenv("FOOD_CLASSIFIER_CACHE", str(tmp_path / "cache"))
    photos = make_imagefolder(tmp_path / "photos", per_class=4)
    rows = split(photos, tmp_path / "m.csv", progress=False)
    model, spec = _TinyBackbone.make(), PreprocessSpec(resize=36, crop=32)
    F.STATS.reset()
    first = F.extract(rows, model, "tiny-test", spec)
    assert F.STATS.summary().startswith("features: 0 cached, 12 new (extracted in ")
    grow(photos, 2)
    rows2 = split(photos, tmp_path / "m.csv", progress=False)
    F.STATS.reset()
    second = F.extract(rows2, model, "tiny-test", spec)
    assert F.STATS.summary().startswith("features: 12 cached, 6 new (extracted in ")
    old = {r.sha256: i for i, r in enumerate(rows)}
    for j, r in enumerate(rows2):  # the cached vectors are the ones computed the first time
        if r.sha256 in old:
            assert (second[j] == first[old[r.sha256]]).all()


def _cli(*args: str, env: dict[str, str], timeout: float = 900) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "food_classifier.cli", *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-3000:])
    return out.stdout


@pytest.mark.slow
@pytest.mark.live
def test_the_loop_end_to_end_train_grow_retrain_compare_promote_reload(tmp_path):
    """train --data -> more labelled photos -> train --data (cached features, same test photos) -> models compare
    -> promote --if-better -> the running server reloads (SIGHUP) and serves the promoted version."""
    import os
    import re
    import signal
    import time

    import httpx

    from food_classifier.testing import ServerProcess

    env = {k: v for k, v in os.environ.items() if k != "FOOD_CLASSIFIER_PROGRESS"}
    env["FOOD_CLASSIFIER_CACHE"] = str(tmp_path / "cache")
    photos = make_imagefolder(tmp_path / "data", per_class=10)
    models, manifest = tmp_path / "models", tmp_path / "m.csv"
    train = ["train", "--data", str(photos), "--manifest", str(manifest), "--arch", "efficientnet_lite0",
             "--image-size", "64", "--aug-views", "1", "--no-int8", "--runs-dir", str(tmp_path / "runs"),
             "--models-dir", str(models), "--name", "food"]
    first = _cli(*train, env=env)
    assert re.search(r"^features: 0 cached, 24 new \(extracted in [\d.]+ s\)$", first, re.M), first
    from food_classifier.bundle import published_versions

    (v1,) = [p.name for p in published_versions(models / "food")]
    _cli("models", "promote", "food", v1, "--models-dir", str(models), env=env)
    test_before = {h for h, t in tiers(manifest).items() if t == "test"}

    with ServerProcess([models / "food"], args=["--ort-threads", "1"], env=env) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/v1/models/food").json()["version"] == v1
        grow(photos, 4)  # the label page would have written these
        second = _cli(*train, env=env)
        assert "previous manifest: 30 photos kept their tier, 12 new" in second
        assert re.search(r"^features: 24 cached, \d+ new \(extracted in [\d.]+ s\)$", second, re.M), second
        assert test_before <= {h for h, t in tiers(manifest).items() if t == "test"}
        (v2,) = [p.name for p in published_versions(models / "food") if p.name != v1]
        compared = _cli("models", "compare", "food", "--data", str(photos), "--models-dir", str(models), env=env)
        assert f"A (champion):   {v1}" in compared and f"B (challenger): {v2}" in compared
        assert re.search(r"^photos: \d+ labelled; skipped \d+ \(labelled photo in the manifest's train", compared,
                         re.M), compared
        promoted = _cli("models", "promote", "food", v2, "--if-better", "--data", str(photos), "--models-dir",
                        str(models), env=env)
        assert f"{v2} is not worse" in promoted and f"promoted food {v2}" in promoted
        assert c.get("/v1/models/food").json()["version"] == v1  # until it reloads
        srv.signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while c.get("/v1/models/food").json()["version"] != v2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.get("/v1/models/food").json()["version"] == v2
