"""Dataset scanning and splitting on generated ImageFolders (plus the shared food101_mini3 if present)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from food_classifier.training.data import (
    DataError,
    Row,
    count_table,
    dhash,
    find_image_root,
    manifest_sha256,
    read_manifest,
    scan,
    split,
    write_manifest,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "food101_mini3"
CLASSES = ("apple", "banana", "cherry")
PER_CLASS = 40


def photo(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A random 'scene': smooth colour blobs, a few shapes, mild noise, so dHashes differ per seed.

    The blobs matter: on a flat background dHash bits depend on noise and JPEG artefacts, as they
    would on a plain-white product photo.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        box = (x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_classes(root: Path, counts: dict[str, int], seed: int = 0, fmt: str = "JPEG") -> None:
    for k, (label, n) in enumerate(counts.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            ext = "jpg" if fmt == "JPEG" else "png"
            photo(seed + 1000 * k + i).save(root / label / f"{label[0]}_{i:03d}.{ext}", fmt)


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    """download/wrapper/dataset/{apple,banana,cherry} with junk, broken files and two duplicates."""
    top = tmp_path_factory.mktemp("download")
    ds = top / "wrapper" / "dataset"
    make_classes(ds, {"apple": PER_CLASS, "banana": PER_CLASS})
    make_classes(ds, {"cherry": PER_CLASS}, seed=50_000, fmt="PNG")
    (top / ".DS_Store").write_bytes(b"\0junk")
    (top / "wrapper" / ".DS_Store").write_bytes(b"\0junk")
    for mac in (top / "__MACOSX" / "dataset" / "apple", ds / "__MACOSX" / "apple"):
        mac.mkdir(parents=True)
        (mac / "._a_000.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    (ds / "apple" / "._a_001.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    (ds / "cherry" / ".hidden.jpg").write_bytes(b"not an image")
    shutil.copy(ds / "apple" / "a_000.jpg", ds / "apple" / "dup_exact.jpg")
    near = photo(1001)  # banana b_001, re-encoded smaller at a lower quality
    near.resize((90, 68), Image.BILINEAR).save(ds / "banana" / "near_dup.jpg", quality=55)
    whole = (ds / "apple" / "a_002.jpg").read_bytes()
    (ds / "apple" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (ds / "banana" / "empty.jpg").write_bytes(b"")
    (ds / "cherry" / "notes.txt").write_text("these are cherries\n")
    return top


def tiers_by_name(rows: list[Row]) -> dict[str, str]:
    return {r.path.name: r.tier for r in rows}


def test_find_image_root_looks_through_wrappers(messy):
    assert find_image_root(messy) == messy / "wrapper" / "dataset"
    assert find_image_root(messy / "wrapper" / "dataset") == messy / "wrapper" / "dataset"


def test_scan_rejects_broken_files_and_ignores_junk(messy):
    result = scan(messy, progress=False)
    assert sorted(p.name for p, _ in result.rejected) == ["empty.jpg", "notes.txt", "truncated.jpg"]
    reasons = {p.name: why for p, why in result.rejected}
    assert reasons["empty.jpg"] == "empty file"
    assert "corrupt or truncated" in reasons["truncated.jpg"]
    assert Counter(it.label for it in result.items) == {"apple": PER_CLASS + 1, "banana": PER_CLASS + 1,
                                                        "cherry": PER_CLASS}
    assert not [it for it in result.items if it.path.name.startswith(".") or "__MACOSX" in it.path.parts]
    a0 = next(it for it in result.items if it.path.name == "a_000.jpg")
    assert a0.sha256 == hashlib.sha256(a0.path.read_bytes()).hexdigest()
    assert a0.path.is_absolute() and a0.tier is None


def test_dhash_separates_different_images_and_matches_near_copies(messy):
    d = messy / "wrapper" / "dataset" / "banana"
    h1, h_near, h2 = (dhash(Image.open(d / n)) for n in ("b_001.jpg", "near_dup.jpg", "b_002.jpg"))
    assert bin(h1 ^ h_near).count("1") <= 6
    assert bin(h1 ^ h2).count("1") > 12


def test_split_is_stratified_with_about_the_right_ratios(messy, tmp_path):
    rows = split(messy, tmp_path / "m.csv", progress=False)
    assert len(rows) == 3 * PER_CLASS + 2
    counts = Counter((r.label, r.tier) for r in rows)
    for label in CLASSES:
        n = sum(v for (lab, _), v in counts.items() if lab == label)
        for tier, ratio in (("train", 0.7), ("validation", 0.15), ("test", 0.15)):
            assert abs(counts[label, tier] - n * ratio) <= 2, (label, tier, counts)
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert sorted(Path(r["path"]).name for r in report["rejected"]) == ["empty.jpg", "notes.txt", "truncated.jpg"]
    groups = sorted(sorted(Path(p).name for p in g["paths"]) for g in report["duplicate_groups"])
    assert groups == [["a_000.jpg", "dup_exact.jpg"], ["b_001.jpg", "near_dup.jpg"]]
    assert sorted(g["exact"] for g in report["duplicate_groups"]) == [False, True]


def test_negative_distance_groups_exact_copies_only(messy, tmp_path):
    split(messy, tmp_path / "m.csv", near_dup_distance=-1, progress=False)
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert [sorted(Path(p).name for p in g["paths"]) for g in report["duplicate_groups"]] == [
        ["a_000.jpg", "dup_exact.jpg"]]


def test_duplicates_never_straddle_tiers(messy, tmp_path):
    together = set()
    for seed in range(6):
        tiers = tiers_by_name(split(messy, tmp_path / f"m{seed}.csv", seed=seed, progress=False))
        assert tiers["a_000.jpg"] == tiers["dup_exact.jpg"]
        assert tiers["b_001.jpg"] == tiers["near_dup.jpg"]
        together.add(tiers["a_000.jpg"])
    assert len(together) > 1  # the group itself moves between seeds: it is really being split as a unit


def test_split_is_deterministic_per_seed(messy, tmp_path):
    a = split(messy, tmp_path / "a.csv", seed=42, progress=False)
    b = split(messy, tmp_path / "b.csv", seed=42, progress=False)
    c = split(messy, tmp_path / "c.csv", seed=7, progress=False)
    assert a == b
    assert manifest_sha256(tmp_path / "a.csv") == manifest_sha256(tmp_path / "b.csv")
    assert tiers_by_name(a) != tiers_by_name(c)
    assert sorted(r.path for r in a) == sorted(r.path for r in c)


def test_train_test_layout_keeps_the_given_test_tier(tmp_path):
    root = tmp_path / "pst"
    make_classes(root / "train", {"pizza": 20, "steak": 20})
    make_classes(root / "test", {"pizza": 5, "steak": 5}, seed=90_000)
    shutil.copy(root / "test" / "pizza" / "p_000.jpg", root / "train" / "pizza" / "leak.jpg")
    rows = split(tmp_path, tmp_path / "m.csv", progress=False)
    test = sorted(r.path for r in rows if r.tier == "test")
    given = sorted((root / "test").rglob("*.jpg"))
    assert test == sorted([*given, (root / "train" / "pizza" / "leak.jpg").resolve()])  # the leak goes with its twin
    val = [r for r in rows if r.tier == "validation"]
    assert all(r.path.parent.parent.name == "train" for r in val)
    assert Counter(r.label for r in val) == {"pizza": 4, "steak": 4}  # round(20 * 0.15 / 0.85)


def test_given_valid_tier_is_kept(tmp_path):
    make_classes(tmp_path / "train", {"x": 6, "y": 6})
    make_classes(tmp_path / "valid", {"x": 2, "y": 2}, seed=10_000)
    make_classes(tmp_path / "test", {"x": 2, "y": 2}, seed=20_000)
    rows = split(tmp_path, tmp_path / "m.csv", progress=False)
    dirs = {"train": "train", "validation": "valid", "test": "test"}
    assert all(r.path.parent.parent.name == dirs[r.tier] for r in rows)
    assert Counter(r.tier for r in rows) == {"train": 12, "validation": 4, "test": 4}


def test_error_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        split(tmp_path / "nope", tmp_path / "m.csv", progress=False)


def test_error_no_class_folders(tmp_path):
    photo(1).save(tmp_path / "loose.jpg")
    with pytest.raises(DataError, match="No folder with one subfolder of images per class"):
        split(tmp_path, tmp_path / "m.csv", progress=False)


def test_error_single_class(tmp_path):
    make_classes(tmp_path / "ds", {"only": 6})
    with pytest.raises(DataError, match="at least 2 classes.*found 1: only"):
        split(tmp_path / "ds", tmp_path / "m.csv", progress=False)


def test_error_class_too_small_names_class_and_count(tmp_path):
    make_classes(tmp_path, {"big": 12, "tiny": 2})
    with pytest.raises(DataError, match="Class 'tiny' has only 2 usable image"):
        split(tmp_path, tmp_path / "m.csv", progress=False)


def test_error_duplicates_count_once(tmp_path):
    make_classes(tmp_path, {"big": 12, "tiny": 2})
    shutil.copy(tmp_path / "tiny" / "t_000.jpg", tmp_path / "tiny" / "copy.jpg")
    with pytest.raises(DataError, match="'tiny' has only 3 usable image.*2 after merging duplicates"):
        split(tmp_path, tmp_path / "m.csv", progress=False)


def test_error_given_layout_missing_a_class_in_test(tmp_path):
    make_classes(tmp_path / "train", {"x": 6, "y": 6})
    make_classes(tmp_path / "test", {"x": 2}, seed=5000)
    with pytest.raises(DataError, match="Class 'y' has 6 usable image.*none in the test tier"):
        split(tmp_path, tmp_path / "m.csv", progress=False)


def test_error_bad_ratios(messy, tmp_path):
    with pytest.raises(DataError, match="three positive numbers"):
        split(messy, tmp_path / "m.csv", ratios=(0.8, 0.2, 0.0), progress=False)


def test_manifest_round_trip(messy, tmp_path):
    path = tmp_path / "sub" / "m.csv"
    rows = split(messy, path, progress=False)
    assert path.read_text().splitlines()[0] == "path,label,tier,sha256"
    back = read_manifest(path)
    assert back == rows
    assert all(r.path.is_absolute() and r.path.is_file() for r in back)
    assert {r.tier for r in back} == {"train", "validation", "test"}
    assert manifest_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    write_manifest(back, tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == path.read_bytes()


def test_read_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("file,class\n/a.jpg,x\n")
    with pytest.raises(DataError, match="expected path,label,tier,sha256"):
        read_manifest(tmp_path / "bad.csv")
    (tmp_path / "tier.csv").write_text("path,label,tier,sha256\n/a.jpg,x,holdout,00\n")
    with pytest.raises(DataError, match="unknown tier 'holdout'"):
        read_manifest(tmp_path / "tier.csv")


def test_count_table():
    rows = ([Row(Path(f"/a{i}"), "apple_pie", "train", "0") for i in range(7)]
            + [Row(Path(f"/b{i}"), "bibimbap", t, "0") for i, t in enumerate(["train"] * 3 + ["validation", "test"])]
            + [Row(Path("/a9"), "apple_pie", "test", "0")])
    lines = {ln.split()[0]: ln.split()[1:] for ln in count_table(rows).splitlines() if ln[0].isalpha()}
    assert lines["class"] == ["train", "validation", "test", "total"]
    assert lines["apple_pie"] == ["7", "0", "1", "8"]
    assert lines["bibimbap"] == ["3", "1", "1", "5"]
    assert lines["total"] == ["10", "1", "2", "13"]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared dataset food101_mini3 not present")
def test_split_food101_mini3(tmp_path):
    rows = split(SHARED_DATA, tmp_path / "m.csv", progress=False)  # speed: bench/bench_pipeline.py, not here
    assert len(rows) == 1123
    assert sorted({r.label for r in rows}) == ["apple_pie", "bibimbap", "breakfast_burrito"]
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["rejected"] == []
    counts = Counter((r.label, r.tier) for r in rows)
    for label in ("apple_pie", "bibimbap", "breakfast_burrito"):
        n = sum(v for (lab, _), v in counts.items() if lab == label)
        for tier, ratio in (("train", 0.7), ("validation", 0.15), ("test", 0.15)):
            assert abs(counts[label, tier] - n * ratio) <= 3, (label, tier, counts[label, tier], n)
