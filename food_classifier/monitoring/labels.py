"""Labelled photos, written where `train --data` reads them, with one provenance line per label.

    DATA/<class>/<sha256>.<ext>   the photo (the ImageFolder layout training scans; .jpg for a JPEG)
    DATA/.not_food/<sha256>.<ext> photos a person called "not food" (hidden: training skips them)
    DATA/.labels.jsonl            one JSON line per label or undo: sha256, label, previous answer, model version,
                                  request id, time, source ("label page" or "feedback")

The label page and the server's feedback endpoint both write here, so a photo labelled either way lands in the
same place; the latest label of a photo wins (its other copies are removed). Photos are written to a hidden
temporary and renamed; provenance lines are appended with one write each and fsynced. Reading the provenance
skips a corrupt line (a crash mid-line, a hand edit) and says which, never rewriting the file: nothing is lost.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROVENANCE = ".labels.jsonl"
NOT_FOOD_DIR = ".not_food"
NOT_FOOD_LABEL = "not_food"
IMAGE_TYPES = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"RIFF", "webp"), (b"GIF8", "gif"), (b"BM", "bmp"))
CLASS_NAME = re.compile(r"\w[\w -]{0,63}")  # any script's letters and digits, "_", "-", " "
SHA256 = re.compile(r"[0-9a-f]{64}")


class LabelError(ValueError):
    """A label that cannot be written (bad class name): the message says what is accepted."""


def image_ext(data: bytes) -> str:
    return next((ext for magic, ext in IMAGE_TYPES if data.startswith(magic)), "bin")


def utc_now(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def check_class_name(label: str) -> str:
    """A class becomes a folder name: letters, digits, '_', '-', ' ', at most 64, not hidden, no path."""
    if label != NOT_FOOD_LABEL and not CLASS_NAME.fullmatch(label or ""):
        shown = label if len(label) <= 80 else label[:80] + "..."
        raise LabelError(f"class name {shown!r} cannot be a folder: use letters, digits, '_', '-' or spaces "
                         f"(at most 64, starting with a letter or digit)")
    return label


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a hidden temporary beside `path`, fsync, rename: readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class Provenance:
    labels: dict[str, str] = field(default_factory=dict)  # sha256 -> latest label (undone ones removed)
    lines: int = 0
    problems: list[str] = field(default_factory=list)  # one message per skipped line


def read_provenance(data: str | Path) -> Provenance:
    """The latest label of every photo, from DATA/.labels.jsonl; corrupt lines are skipped and named."""
    out = Provenance()
    path = Path(data) / PROVENANCE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return out
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            sha, label = rec["sha256"], rec["label"]
            if not isinstance(sha, str) or not (label is None or isinstance(label, str)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            out.problems.append(f"{path} line {n} is not a label record; skipped (the file is left as it is)")
            continue
        out.lines += 1
        if label is None:
            out.labels.pop(sha, None)
        else:
            out.labels[sha] = label
    return out


class LabelWriter:
    def __init__(self, data: str | Path):
        self.data = Path(data)

    @staticmethod
    def relative(label: str, sha256: str, ext: str) -> str:
        folder = NOT_FOOD_DIR if label == NOT_FOOD_LABEL else label
        return f"{folder}/{sha256}.{ext}"

    def copies(self, sha256: str) -> list[Path]:
        """Every copy of this photo in the folder (normally at most one)."""
        if not self.data.is_dir():
            return []
        return [p for d in self.data.iterdir() if d.is_dir() for p in d.glob(f"{sha256}.*")
                if not p.name.startswith(".")]

    def write(self, sha256: str, image: bytes, label: str, *, previous: dict[str, Any] | None,
              model_version: str | None, request_id: str | None, source: str) -> Path:
        """Put the photo under its class (replacing another label's copy) and append the provenance line."""
        check_class_name(label)
        target = self.data / self.relative(label, sha256, image_ext(image))
        target.parent.mkdir(parents=True, exist_ok=True)
        existed = target.exists()
        write_atomic(target, image)
        try:
            self._append({"sha256": sha256, "label": label, "previous": previous, "model_version": model_version,
                          "request_id": request_id, "time": utc_now(), "source": source})
        except OSError:  # no provenance, no new photo: the folder stays as it was
            if not existed:
                target.unlink(missing_ok=True)
            raise
        for other in self.copies(sha256):
            if other != target:
                other.unlink(missing_ok=True)
        return target

    def remove(self, sha256: str, *, source: str, restore: tuple[str, bytes] | None = None) -> None:
        """Undo: take the photo out of its class (or put it back under `restore`'s label) and say so."""
        for p in self.copies(sha256):
            p.unlink(missing_ok=True)
        if restore is not None:
            label, image = restore
            self.write(sha256, image, label, previous=None, model_version=None, request_id=None,
                       source=f"{source} (undo)")
            return
        self._append({"sha256": sha256, "label": None, "undo": True, "time": utc_now(), "source": source})

    def _append(self, record: dict[str, Any]) -> None:
        """One write per line; a torn last line (a crash) gets a newline first, so it stays one bad line."""
        self.data.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False) + "\n"
        fd = os.open(self.data / PROVENANCE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(self.data / PROVENANCE, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        line = "\n" + line
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
