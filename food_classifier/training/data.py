"""Dataset side of training: find the image folder, scan it, split it into tiers without leaks.

A dataset is an ImageFolder (one folder per class) or a train/test(/valid) layout of ImageFolders.
`split` writes a manifest CSV (path,label,tier,sha256) that the trainer reads; duplicate and
near-duplicate photos are grouped first so that no group straddles train/validation/test.
Download and archive extraction live in download.py; the named sources and `DataError` in sources.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from food_classifier.preprocessing import ImageError, open_image
from food_classifier.training.duplicates import dhash, duplicate_groups
from food_classifier.training.progress import progress_bar
from food_classifier.training.sources import DataError

TIERS = ("train", "validation", "test")
TIER_DIRS = {"train": "train", "test": "test", "valid": "validation", "validation": "validation", "val": "validation"}


# ----------------------------------------------------------------------------- finding the root

def _ignored(p: Path) -> bool:
    """Hidden files (.DS_Store, ._foo) and macOS resource-fork folders are archive junk."""
    return p.name.startswith(".") or p.name == "__MACOSX"


def _subdirs(p: Path) -> list[Path]:
    return sorted(c for c in p.iterdir() if c.is_dir() and not _ignored(c))


def _is_class_root(p: Path) -> bool:
    """Every visible subfolder holds files directly: those subfolders are the classes."""
    dirs = _subdirs(p)
    return bool(dirs) and all(any(f.is_file() and not _ignored(f) for f in d.iterdir()) for d in dirs)


def _is_split_root(p: Path) -> bool:
    names = {d.name.lower() for d in _subdirs(p)}
    tiers = [d for d in _subdirs(p) if d.name.lower() in TIER_DIRS]
    return {"train", "test"} <= names and names <= set(TIER_DIRS) and all(_is_class_root(d) for d in tiers)


def find_image_root(path: str | Path) -> Path:
    """Shallowest folder (breadth-first) that is an ImageFolder or a train/test layout.

    Archives wrap their data in arbitrary folders (name/, archive/name/, plus __MACOSX/), so we
    look through them rather than asking the user to point at the right level.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"Dataset folder {path} does not exist.")
    level = [path]
    while level:
        for p in level:
            if _is_split_root(p) or _is_class_root(p):
                return p
        level = [d for p in level for d in _subdirs(p)]
    raise DataError(f"No folder with one subfolder of images per class was found under {path}.")


# ----------------------------------------------------------------------------- scanning

@dataclass
class Item:
    path: Path
    label: str
    sha256: str
    tier: str | None = None  # tier given by a train/test layout, else None
    dhash: int = 0  # 64-bit difference hash, for near-duplicate grouping


@dataclass
class ScanResult:
    items: list[Item]
    rejected: list[tuple[Path, str]]  # (file, reason)


def _check(path: Path) -> tuple[str, int] | str:
    """(sha256, dhash) for a fully decodable image, else the reason it is rejected."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"unreadable ({e.strerror or e.__class__.__name__})"
    if not data:
        return "empty file"
    try:
        img = open_image(data)  # decodes every pixel, so truncated files fail here
    except ImageError as e:
        return str(e)
    return hashlib.sha256(data).hexdigest(), dhash(img)


def visible_files(folder: Path) -> list[Path]:
    """Every file under `folder`, archive junk (hidden files and folders, __MACOSX) left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _ignored(Path(d))]
        out += [Path(dirpath) / f for f in filenames if not _ignored(Path(f))]
    return out


def check_images(paths: list[Path], progress: bool = True) -> list[tuple[str, int] | str]:
    """(sha256, dhash) or the reason it is rejected, per path; decoded in a thread pool."""
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
        return list(progress_bar(pool.map(_check, paths), total=len(paths), desc="scanning images", unit="img",
                                 disable=not progress))


def scan(root: str | Path, progress: bool = True) -> ScanResult:
    """Decode every file under the image root in a thread pool; bad files are listed, not fatal."""
    root = find_image_root(root)
    if _is_split_root(root):
        tier_dirs = [(TIER_DIRS[d.name.lower()], d) for d in _subdirs(root)]
    else:
        tier_dirs = [(None, root)]
    todo = [(f, c.name, tier) for tier, d in tier_dirs for c in _subdirs(d) for f in visible_files(c)]
    todo.sort(key=lambda t: str(t[0]))
    results = check_images([f for f, _, _ in todo], progress)
    items, rejected = [], []
    for (f, label, tier), res in zip(todo, results, strict=True):
        if isinstance(res, str):
            rejected.append((f.resolve(), res))
        else:
            items.append(Item(f.resolve(), label, res[0], tier, res[1]))
    return ScanResult(items, rejected)


# ----------------------------------------------------------------------------- splitting

@dataclass
class Row:
    path: Path
    label: str
    tier: str  # "train", "validation" or "test"
    sha256: str


def _assign(groups: list[list[int]], tiers: tuple[str, ...], ratios: tuple[float, ...],
            rng: random.Random, fixed: dict[str, list[list[int]]] | None = None) -> dict[str, list[list[int]]]:
    """Shuffle the groups and fill the smaller tiers up to their target image count; rest goes to tiers[0].

    Groups that do not fit go on, so big groups end in the first tier; an empty tier afterwards
    borrows the smallest new group of the first tier. `fixed`: groups already placed (their tier from
    the previous manifest): they count towards the targets and never move.
    """
    groups = sorted(groups)
    rng.shuffle(groups)
    out: dict[str, list[list[int]]] = {t: list((fixed or {}).get(t, [])) for t in tiers}
    n = sum(len(g) for g in groups) + sum(len(g) for gs in out.values() for g in gs)
    total = sum(ratios)
    target = {t: max(1, round(n * r / total)) for t, r in zip(tiers, ratios, strict=True)}
    count = {t: sum(len(g) for g in out[t]) for t in tiers}
    new = []
    for g in groups:
        tier = next((t for t in tiers[1:] if count[t] + len(g) <= target[t]), tiers[0])
        out[tier].append(g)
        count[tier] += len(g)
        if tier == tiers[0]:
            new.append(g)
    for t in tiers[1:]:
        if not out[t] and len(out[tiers[0]]) > 1 and new:
            g = min(new, key=len)
            new.remove(g)
            out[tiers[0]].remove(g)
            out[t].append(g)
    return out


def previous_tiers(manifest_path: str | Path) -> dict[str, str]:
    """sha256 -> tier of the manifest about to be replaced ({} if none or unreadable): a re-split of a
    grown folder keeps every known photo in its tier, so a photo once in test stays in test and two model
    versions are compared on the same photos."""
    try:
        return {r.sha256: r.tier for r in read_manifest(manifest_path)}
    except (DataError, OSError, csv.Error, KeyError, UnicodeDecodeError):
        return {}


def split(root: str | Path, manifest_path: str | Path, ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
          seed: int = 42, near_dup_distance: int = 6, progress: bool = True, keep_tiers: bool = True) -> list[Row]:
    """Scan, group duplicates, split the groups per class (stratified, seeded), write the manifest.

    With `keep_tiers`, photos already in the manifest being replaced keep their tier (by sha256; a
    duplicate group takes its strictest known tier) and only new photos are assigned, toward the ratios.

    A given test/ (and valid/) tier is kept; validation is carved out of a given train/. A duplicate
    group never straddles tiers: a group touching a given tier goes wholly to the strictest one.
    Also writes `<manifest stem>.report.json` with rejected files and duplicate groups.
    """
    if len(ratios) != 3 or any(r <= 0 for r in ratios):
        raise DataError(f"Split ratios must be three positive numbers (train, validation, test), got {ratios}.")
    result = scan(root, progress=progress)
    items = result.items
    labels = sorted({it.label for it in items})
    if len(labels) < 2:
        raise DataError(f"Need at least 2 classes with readable images under {root}, found {len(labels)}: "
                        f"{', '.join(labels) or 'none'}.")
    groups = duplicate_groups(items, near_dup_distance)
    rank = {"test": 0, "validation": 1, "train": 2}
    before = previous_tiers(manifest_path) if keep_tiers else {}
    pinned: dict[int, str] = {}  # group head -> strictest tier its photos had in the previous manifest
    for g in groups:
        known = [before[items[i].sha256] for i in g if items[i].sha256 in before]
        if known:
            pinned[g[0]] = min(known, key=rank.__getitem__)
    by_label: dict[str, list[list[int]]] = defaultdict(list)
    layout = any(it.tier for it in items)  # train/test layout rather than a plain ImageFolder
    tier_of: dict[int, str] = {}  # group head -> strictest given tier of its members
    for g in groups:
        given = [items[i].tier for i in g if items[i].tier]
        if given:
            tier_of[g[0]] = min(given, key=rank.__getitem__)
        # a group whose members disagree on the label counts for its most common label
        by_label[Counter(items[i].label for i in g).most_common(1)[0][0]].append(g)
    rng = random.Random(seed)
    has_given_val = any(it.tier == "validation" for it in items)
    tier_groups: dict[str, dict[str, list[list[int]]]] = {}
    for label in labels:
        gs = by_label[label]
        n = sum(len(g) for g in gs)
        if not layout:  # plain ImageFolder: three-way split
            if len(gs) < 3:
                raise DataError(f"Class '{label}' has only {n} usable image(s) ({len(gs)} after merging duplicates);"
                                " it needs at least 3 to put one in each of train, validation and test.")
            kept = {t: [g for g in gs if pinned.get(g[0]) == t] for t in TIERS}
            tier_groups[label] = _assign([g for g in gs if g[0] not in pinned], ("train", "validation", "test"),
                                         ratios, rng, kept)
        else:  # train/test layout: keep given tiers, carve validation from train if absent
            fixed = {t: [g for g in gs if tier_of.get(g[0]) == t] for t in TIERS}
            if not has_given_val:
                kept = {t: [g for g in fixed["train"] if pinned.get(g[0]) == t] for t in ("train", "validation")}
                placed = {id(g) for gs_ in kept.values() for g in gs_}
                fixed.update(_assign([g for g in fixed["train"] if id(g) not in placed], ("train", "validation"),
                                     ratios[:2], rng, kept))
            tier_groups[label] = fixed
        for t in TIERS:
            if not tier_groups[label][t]:
                raise DataError(f"Class '{label}' has {n} usable image(s) but none in the {t} tier; "
                                "every class needs at least one image in train, validation and test.")
    rows = [Row(items[i].path, items[i].label, tier, items[i].sha256)
            for label in labels for tier, gs in tier_groups[label].items() for g in gs for i in g]
    rows.sort(key=lambda r: str(r.path))
    # photos whose given folder lost to a near-copy in a stricter tier (e.g. train/ copies of test/ photos)
    moved = [{"path": str(items[i].path), "from": items[i].tier, "to": tier_of[g[0]],
              "like": [str(items[j].path) for j in g if items[j].tier == tier_of[g[0]]]}
             for g in groups if g[0] in tier_of for i in g if items[i].tier and items[i].tier != tier_of[g[0]]]
    manifest_path = Path(manifest_path)
    write_manifest(rows, manifest_path)
    kept_tiers = sum(1 for r in rows if r.sha256 in before and before[r.sha256] == r.tier)
    write_report(result, report_path(manifest_path), groups=groups, moved=moved,
                 kept={"kept_tier": kept_tiers, "new": sum(1 for r in rows if r.sha256 not in before)})
    return rows


def report_path(manifest_path: str | Path) -> Path:
    """`<manifest stem>.report.json` beside the manifest."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(manifest_path.stem + ".report.json")


# ----------------------------------------------------------------------------- manifest and report

FIELDS = ["path", "label", "tier", "sha256"]


def write_manifest(rows: list[Row], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        for r in rows:
            w.writerow([str(Path(r.path).resolve()), r.label, r.tier, r.sha256])


def read_manifest(path: str | Path) -> list[Row]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Manifest {path} does not exist; create it with the split command first.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != FIELDS:
            raise DataError(f"Manifest {path} has header {reader.fieldnames}, expected {','.join(FIELDS)}.")
        rows = [Row(Path(r["path"]), r["label"], r["tier"], r["sha256"]) for r in reader]
    bad = [r for r in rows if r.tier not in TIERS]
    if bad:
        raise DataError(f"Manifest {path} has unknown tier '{bad[0].tier}' for {bad[0].path}.")
    return rows


def manifest_sha256(path: str | Path) -> str:
    """Fingerprint of the exact split a model was trained on (stored alongside the model)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def count_table(rows: list[Row]) -> str:
    """Per-class x per-tier image counts with totals, as aligned plain text."""
    counts = Counter((r.label, r.tier) for r in rows)
    labels = sorted({r.label for r in rows})
    width = max([len("class"), len("total")] + [len(x) for x in labels])
    head = f"{'class':<{width}}" + "".join(f"{t:>12}" for t in (*TIERS, "total"))
    lines = [head, "-" * len(head)]
    for name in [*labels, None]:
        nums = [sum(v for (lab, t), v in counts.items() if t == tier and name in (None, lab)) for tier in TIERS]
        lines.append(f"{name or 'total':<{width}}" + "".join(f"{v:>12}" for v in (*nums, sum(nums))))
    lines.insert(-1, "-" * len(head))
    return "\n".join(lines)


def write_report(scan_result: ScanResult, path: str | Path, near_dup_distance: int = 6,
                 groups: list[list[int]] | None = None, moved: list[dict] | None = None,
                 kept: dict[str, int] | None = None) -> None:
    """JSON of rejected files, duplicate groups (size > 1) and photos moved to a stricter tier with
    their near-copies, for the user to inspect or clean up (`format_report` prints its summary)."""
    items = scan_result.items
    if groups is None:
        groups = duplicate_groups(items, near_dup_distance)
    report = {
        "images": len(items),
        "rejected": [{"path": str(p), "reason": why} for p, why in scan_result.rejected],
        "duplicate_groups": [{
            "exact": len({items[i].sha256 for i in g}) == 1,
            "labels": sorted({items[i].label for i in g}),
            "paths": [str(items[i].path) for i in g],
        } for g in groups if len(g) > 1],
        "moved": moved or [],
        "previous_manifest": kept or {},  # photos that kept their tier from the replaced manifest, and new ones
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def format_report(report: dict, root: str | Path | None = None, limit: int = 10) -> str:
    """The report for the console: the first `limit` rejected files (with reasons), duplicate groups
    and moved photos, then counts. Paths are shown relative to `root` when they are under it."""
    def rel(p: str) -> str:
        try:
            return str(Path(p).relative_to(root)) if root else p
        except ValueError:
            return p

    def block(title: str, lines: list[str]) -> list[str]:
        more = [f"  ... and {len(lines) - limit} more"] if len(lines) > limit else []
        return [title, *(f"  {line}" for line in lines[:limit]), *more] if lines else []

    rejected = [f"{rel(r['path'])}: {r['reason']}" for r in report["rejected"]]
    groups = [(" = " if g["exact"] else " ~ ").join(map(rel, g["paths"])) + (" (exact copies)" if g["exact"] else "")
              for g in report["duplicate_groups"]]
    moved = [f"{rel(m['path'])}: {m['from']} -> {m['to']}, a near-copy of {', '.join(map(rel, m['like']))}"
             for m in report.get("moved", [])]
    n_dup = sum(len(g["paths"]) for g in report["duplicate_groups"])
    lines = block(f"rejected: {len(rejected)} file(s), skipped", rejected)
    lines += block(f"duplicate groups: {len(groups)} ({n_dup} photos, each group kept in one tier)", groups)
    lines += block(f"moved to a stricter tier with their near-copies: {len(moved)}", moved)
    return "\n".join(lines)
