"""The labelling queue: kept photos in the order a person's time teaches the model most.

Order: informativeness (1 - the margin of the two most probable classes); near-duplicates (the training side's
dHash, the same grouping that keeps them out of different tiers) collapse to their most informative photo; and
the predicted classes take turns, the most informative first, so a hundred unsure "pizza" photos do not hide
every other class's mistakes. Scores come from the answer kept with the photo, or, with a model, from
re-running that model on every photo (the kept answer may be from an older version).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from food_classifier.monitoring.keep import PHOTOS, margin_score, read_record


@dataclass
class Item:
    sha256: str
    photo: Path
    score: float  # informativeness in [0, 1]
    predicted: str  # the model's best class (also when it abstained)
    top: list[tuple[str, float]]  # the model's classes, most probable first
    record: dict[str, Any] = field(repr=False)
    near_duplicates: int = 0  # other kept photos this one stands for

    def previous(self) -> dict[str, Any]:
        """The answer this photo got, as the provenance line stores it."""
        return {**self.record.get("answer", {}), "model": self.record.get("model")}


def load(keep_dir: Path, classifier: Any = None) -> tuple[list[Item], list[str]]:
    """Every kept photo with its record (re-scored by `classifier`, an `inference.Classifier`, when given), and
    a message per record that could not be read (skipped, left on disk)."""
    items, problems = [], []
    folder = Path(keep_dir) / PHOTOS
    for meta in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if meta.name.startswith("."):
            continue
        rec = read_record(meta)
        photo = folder / f"{meta.stem}.{rec.get('ext')}" if rec else None
        if rec is None or photo is None or not photo.is_file():
            problems.append(f"{meta}: not a readable kept-photo record with its photo; skipped")
            continue
        if classifier is not None:
            try:
                answer = classifier.predict(photo, top_k=len(classifier.labels))
            except Exception as exc:  # noqa: BLE001 (an undecodable photo must not stop the page)
                problems.append(f"{photo}: the model could not read it ({exc}); skipped")
                continue
            top = [(t.label, t.probability) for t in answer.top_k]
            score = margin_score(answer.probabilities, answer.confidence)
        else:
            probs, labels = rec.get("probabilities"), rec.get("labels") or []
            if probs and len(probs) == len(labels):
                top = sorted(zip(labels, map(float, probs), strict=True), key=lambda t: -t[1])
            else:
                top = [(str(label), float(p)) for label, p in rec.get("answer", {}).get("top_k", [])]
            score = float(rec.get("informativeness", 0.0))
        predicted = top[0][0] if top else "?"
        items.append(Item(meta.stem, photo, score, predicted, top, rec))
    return items, problems


def _dhashes(items: list[Item]) -> list[int]:
    from food_classifier.preprocessing import ImageError, open_image
    from food_classifier.training.duplicates import dhash

    out = []
    for it in items:
        try:
            out.append(dhash(open_image(it.photo.read_bytes())))
        except (OSError, ImageError):
            out.append(0)  # unreadable: grouped with other zeros at worst, still shown
    return out


def order(items: list[Item], near_dup_distance: int = 6, hashes: list[int] | None = None) -> list[Item]:
    """Near-duplicates collapsed, then classes in turn by informativeness (see the module docstring).
    `hashes`: the items' dHashes when the caller has them (bench/bench_active.py re-orders the same photos
    every round), else read from the photos."""
    from food_classifier.training.data import Item as DataItem
    from food_classifier.training.duplicates import duplicate_groups

    hashes = _dhashes(items) if hashes is None else hashes
    groups = duplicate_groups([DataItem(it.photo, it.predicted, it.sha256, dhash=h)
                               for it, h in zip(items, hashes, strict=True)], near_dup_distance)
    heads = []
    for group in groups:
        best = max((items[i] for i in group), key=lambda it: (it.score, it.sha256))
        best.near_duplicates = len(group) - 1
        heads.append(best)
    by_class: dict[str, list[Item]] = defaultdict(list)
    for it in sorted(heads, key=lambda it: (-it.score, it.sha256)):
        by_class[it.predicted].append(it)
    # round r takes each class's r-th most informative photo; within a round, the most informative first
    ranked = [(rank, -it.score, it.sha256, it) for lst in by_class.values() for rank, it in enumerate(lst)]
    return [it for *_, it in sorted(ranked, key=lambda t: t[:3])]
