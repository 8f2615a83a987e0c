"""The prediction log: one JSON line per prediction (and per feedback), rotated by size.

    log = PredictionLog("logs/predictions", max_bytes=64 << 20, images_sample=0.01)
    log.write({"kind": "prediction", ...}, image=jpeg_bytes)
    for record in read_log("logs/predictions"): ...

The current file is `predictions.jsonl`; a full one is fsynced, then renamed `predictions-000001.jsonl`
(numbers grow). Lines are written line-buffered, so a crash of the process loses nothing that was
written (an OS crash may lose the lines of the current file since its last rotation). A sampled
image is stored as `images/<sha256>.<ext>` for later labelling. One process per directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from food_classifier.defaults import PREDICTION_LOG_MAX_BYTES

CURRENT = "predictions.jsonl"
ROTATED = re.compile(r"predictions-(\d{6,})\.jsonl")
IMAGE_TYPES = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"RIFF", "webp"), (b"GIF8", "gif"), (b"BM", "bmp"))


def rotated_files(directory: str | Path) -> list[Path]:
    """Rotated files, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("predictions-*.jsonl")
             if (m := ROTATED.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def log_files(directory: str | Path) -> list[Path]:
    """Every file of the log in write order (rotated ones, then the current one)."""
    current = Path(directory) / CURRENT
    return rotated_files(directory) + ([current] if current.is_file() else [])


def read_log(directory: str | Path) -> Iterator[dict[str, Any]]:
    """Every record, in write order. A torn last line (the process died mid-write) is skipped."""
    for path in log_files(directory):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):
                    yield json.loads(line)


def _image_ext(data: bytes) -> str:
    return next((ext for magic, ext in IMAGE_TYPES if data.startswith(magic)), "bin")


class PredictionLog:
    def __init__(self, directory: str | Path, max_bytes: int = PREDICTION_LOG_MAX_BYTES, images_sample: float = 0.0,
                 seed: int | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.images_sample = images_sample
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        existing = rotated_files(self.dir)
        self._seq = int(ROTATED.fullmatch(existing[-1].name).group(1)) if existing else 0
        self.lines = self.rotations = self.images = 0
        self._file = self._open()

    def _open(self):  # noqa: ANN202 (a text file)
        f = open(self.dir / CURRENT, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (kept open)
        self._size = f.tell()
        return f

    def write(self, record: dict[str, Any], image: bytes | None = None) -> str | None:
        """Append one record; with `image`, store it too at the sampling rate (the record then names
        it). Returns the image's path relative to the log dir, if it was stored. Raises OSError."""
        saved = None
        if image is not None and self.images_sample > 0 and self._random.random() < self.images_sample:
            saved = self._save_image(image, record.get("sha256") or "unknown")
            record = {**record, "image": saved}
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
        size = len(line.encode("utf-8"))
        with self._lock:
            if self._size > 0 and self._size + size > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._size += size
            self.lines += 1
        return saved

    def _save_image(self, data: bytes, sha256: str) -> str:
        rel = f"images/{sha256}.{_image_ext(data)}"
        path = self.dir / rel
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            self.images += 1
        return rel

    def _rotate(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._seq += 1
        os.replace(self.dir / CURRENT, self.dir / f"predictions-{self._seq:06d}.jsonl")
        _fsync_dir(self.dir)
        self.rotations += 1
        self._file = self._open()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
