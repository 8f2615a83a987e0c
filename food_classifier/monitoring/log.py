"""The prediction log: one JSON line per prediction (and per feedback), rotated by size.

    log = PredictionLog("logs/predictions", max_bytes=64 << 20, images_sample=0.01, keep=100)
    log.write({"kind": "prediction", ...}, image=jpeg_bytes)
    bad = BadLines()
    for record in read_log("logs/predictions", bad): ...   # bad.count: lines that were not a record

The current file is `predictions.jsonl`; a full one is fsynced, then renamed `predictions-000001.jsonl`
(numbers grow); with `keep`, only the newest `keep` rotated files stay. Each line goes to the file in
one unbuffered write, so a crash of the process loses nothing that was written (an OS crash may lose
the lines of the current file since its last rotation). A write that failed part-way (a full disk)
leaves a torn line: the next record starts on a fresh line, so only the torn one is lost. A sampled
image is stored as `images/<sha256>.<ext>` for later labelling. One process per directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from food_classifier.defaults import PREDICTION_LOG_MAX_BYTES

CURRENT = "predictions.jsonl"
ROTATED = re.compile(r"predictions-(\d{6,})\.jsonl")
IMAGE_TYPES = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"RIFF", "webp"), (b"GIF8", "gif"), (b"BM", "bmp"))
MAX_LINE = 1 << 20  # a longer "line" is not a record (a binary file has few newlines): skipped unread


def rotated_files(directory: str | Path) -> list[Path]:
    """Rotated files, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("predictions-*.jsonl")
             if (m := ROTATED.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def log_files(directory: str | Path) -> list[Path]:
    """Every file of the log in write order (rotated ones, then the current one)."""
    current = Path(directory) / CURRENT
    return rotated_files(directory) + ([current] if current.is_file() else [])


@dataclass
class BadLines:
    """Lines of a log that are not a record (garbage, not UTF-8, binary, not a JSON object, wrong fields)."""
    count: int = 0
    examples: list[str] = field(default_factory=list)  # the first few, "where: why"

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {why}")


def read_log(directory: str | Path, bad: BadLines | None = None) -> Iterator[dict[str, Any]]:
    """Every record (a JSON object per line), in write order. A line that is not one is skipped and counted
    in `bad`; so is nothing else: a torn last line (the process died mid-write, or is writing it now) and
    blank lines are skipped silently. Field types are the reader's to check (monitor_report.py)."""
    bad = bad if bad is not None else BadLines()
    for path in log_files(directory):
        with open(path, "rb") as f:
            for number, raw in enumerate(_lines(f), 1):
                if raw is None:
                    bad.add(f"{path.name}:{number}", f"longer than {MAX_LINE} bytes")
                    continue
                if not raw.endswith(b"\n") or not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
                    bad.add(f"{path.name}:{number}", "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not JSON")
                    continue
                if not isinstance(record, dict):
                    bad.add(f"{path.name}:{number}", f"a JSON {type(record).__name__}, not an object")
                    continue
                yield record


def _lines(f: Any) -> Iterator[bytes | None]:
    """The file's lines; None for one longer than MAX_LINE (read past in chunks, never held whole)."""
    while raw := f.readline(MAX_LINE + 1):
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            while (rest := f.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield raw


def _image_ext(data: bytes) -> str:
    return next((ext for magic, ext in IMAGE_TYPES if data.startswith(magic)), "bin")


class PredictionLog:
    def __init__(self, directory: str | Path, max_bytes: int = PREDICTION_LOG_MAX_BYTES, images_sample: float = 0.0,
                 seed: int | None = None, keep: int | None = None):
        """`keep`: rotated files kept (the oldest beyond it are deleted at each rotation); None keeps all."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.keep = keep
        self.images_sample = images_sample
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        existing = rotated_files(self.dir)
        self._seq = int(ROTATED.fullmatch(existing[-1].name).group(1)) if existing else 0
        self.lines = self.rotations = self.images = self.deleted = 0
        self._file = self._open()

    def _open(self):  # noqa: ANN202 (a raw binary file)
        path = self.dir / CURRENT
        with open(path, "a+b") as probe:  # does the file end mid-line (a crash, a full disk)?
            size = probe.seek(0, os.SEEK_END)
            self._torn = size > 0 and probe.seek(size - 1) >= 0 and probe.read(1) != b"\n"
        f = open(path, "ab", buffering=0)  # noqa: SIM115 (kept open)
        self._size = f.seek(0, os.SEEK_END)
        return f

    def write(self, record: dict[str, Any], image: bytes | None = None) -> str | None:
        """Append one record; with `image`, store it too at the sampling rate (the record then names
        it). Returns the image's path relative to the log dir, if it was stored. Raises OSError."""
        saved = None
        if image is not None and self.images_sample > 0 and self._random.random() < self.images_sample:
            saved = self._save_image(image, record.get("sha256") or "unknown")
            record = {**record, "image": saved}
        line = (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if self._size > 0 and self._size + len(line) > self.max_bytes:
                self._rotate()
            self._append(b"\n" + line if self._torn else line)
            self.lines += 1
        return saved

    def _append(self, data: bytes) -> None:
        """Write all of `data`; if that fails part-way, remember the file ends mid-line."""
        view = memoryview(data)
        try:
            while view:
                n = self._file.write(view)
                self._size += n
                view = view[n:]
        except OSError:
            self._torn = True
            raise
        self._torn = False

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
        os.fsync(self._file.fileno())
        self._file.close()
        self._seq += 1
        os.replace(self.dir / CURRENT, self.dir / f"predictions-{self._seq:06d}.jsonl")
        _fsync_dir(self.dir)
        self.rotations += 1
        self._file = self._open()
        if self.keep is not None:
            for old in rotated_files(self.dir)[:-self.keep or None]:
                old.unlink(missing_ok=True)
                self.deleted += 1

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
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
