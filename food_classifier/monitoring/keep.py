"""Kept photos: the served photos that would teach the model the most, stored for `food-classifier label`.

    keep = KeptPhotos("kept", max_bytes=1 << 30, sample=0.01, margin=0.2, data="kept/labelled")
    keep.offer(answer, jpeg_bytes, labels)     # on the event loop: a few comparisons, then a queue put
    keep.feedback(sha256, "pizza", ...)        # a label for a kept photo -> DATA/pizza/<sha256>.jpg

Why these photos: a label teaches most where the model is least sure (the smallest margin between its two
most probable classes, an abstention, a "not food" call), while a small uniform sample of everything else
keeps an unbiased estimate of live accuracy possible. Layout of the folder:

    photos/<sha256>.<ext>    the upload, byte for byte (content-addressed: one file per distinct photo)
    photos/<sha256>.json     its answer, labels, model version, request id, time, informativeness, why kept

Each file is written to a hidden temporary name and renamed, photo first, its record second: a crash leaves at
most an orphan photo (no record), which the next start removes. The folder is bounded by `max_bytes`; past it
the least informative, then the oldest, photos go first. Writing happens on one background thread: a slow,
full or read-only disk never delays or fails a prediction (failures are counted, the first one is logged).
Labels (the label page's and the feedback endpoint's) are written by `labels.LabelWriter` into the training
folder. One serving process per folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from food_classifier.answer import NOT_FOOD, Answer
from food_classifier.monitoring.labels import LabelError, LabelWriter, image_ext, utc_now, write_atomic

log = logging.getLogger("food_classifier.serving")

PHOTOS = "photos"
QUEUE_SIZE = 256  # photos waiting for the writer; more are dropped (counted), the answer never waits
QUEUE_BYTES = 64 << 20  # and at most this many bytes of them (256 uploads of 10 MB would be 2.5 GB)


@dataclass
class Kept:
    sha256: str
    ext: str
    score: float  # informativeness in [0, 1]: 1 - (top-1 minus top-2 probability)
    time: float
    size: int


def margin_score(probabilities: np.ndarray | None, confidence: float) -> float:
    """1 - (p1 - p2) of the calibrated row: 1 when the model cannot tell its two best classes apart."""
    if probabilities is None or len(probabilities) < 2:
        return 1.0 - float(confidence)
    top2 = np.partition(np.asarray(probabilities, dtype=np.float64), -2)[-2:]
    return float(1.0 - (top2[1] - top2[0]))


def why_keep(answer: Answer, margin: float) -> tuple[float, str | None]:
    """(informativeness, why the photo is worth a label or None). A not-food call is kept whole: the answer
    carries only the rule's verdict, not its score, so "near the threshold" cannot be told apart here."""
    score = margin_score(answer.probabilities, answer.confidence)
    if answer.reason == NOT_FOOD:
        return score, "not_food"
    if answer.abstained:
        return score, "abstained"
    if 1.0 - score < margin:
        return score, "uncertain"
    return score, None


def read_record(path: Path) -> dict[str, Any] | None:
    """A kept photo's record, or None when it is unreadable (a torn or foreign file)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("sha256"), str) else None


class KeptPhotos:
    def __init__(self, directory: str | Path, max_bytes: int, sample: float = 0.01, margin: float = 0.2,
                 data: str | Path | None = None, seed: int | None = None):
        self.dir = Path(directory)
        self.photos = self.dir / PHOTOS
        self.max_bytes = max_bytes
        self.sample = sample
        self.margin = margin
        self.data = Path(data) if data is not None else self.dir / "labelled"
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._index: dict[str, Kept] = {}
        self.bytes = 0
        self._queued_bytes = 0
        self._qlock = threading.Lock()  # the event loop's side: never held while the writer scans the index
        self.kept = self.duplicates = self.evicted = self.errors = self.dropped = self.labels = 0
        self.broken: str | None = None  # why nothing can be kept (said once, at start)
        try:
            self.photos.mkdir(parents=True, exist_ok=True)
            self._load()
            write_atomic(self.photos / ".probe", b"")  # a read-only folder shows itself now, not on photo 1
            (self.photos / ".probe").unlink()
        except OSError as exc:
            self.broken = f"{self.dir}: {exc.strerror or exc}"
            log.warning("kept photos: cannot write to %s (%s): no photo will be kept (counted in "
                        "food_classifier_kept_photos_errors); predictions are not affected", self.dir,
                        exc.strerror or exc)
        self._writer = LabelWriter(self.data)
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="kept-photos", daemon=True)
        self._thread.start()

    # --- start-up: what is already there ---------------------------------------------------------------
    def _load(self) -> None:
        records = {p.stem: p for p in self.photos.glob("*.json") if not p.name.startswith(".")}
        for path in self.photos.iterdir():
            if path.name.startswith("."):  # a temporary of a write a crash interrupted
                path.unlink(missing_ok=True)
            elif path.suffix != ".json" and path.stem not in records:  # photo renamed, record never was
                path.unlink(missing_ok=True)
        for sha, path in records.items():
            rec = read_record(path)
            photo = self.photos / f"{sha}.{rec.get('ext', '')}" if rec else None
            if rec is None or photo is None or not photo.is_file():
                path.unlink(missing_ok=True)
                continue
            size = photo.stat().st_size + path.stat().st_size
            self._index[sha] = Kept(sha, rec["ext"], float(rec.get("informativeness", 0.0)),
                                    float(rec.get("kept_at", 0.0)), size)
            self.bytes += size

    # --- the event loop's side: decide, enqueue -------------------------------------------------------------
    def offer(self, answer: Answer, data: bytes, labels: list[str], sha256: str | None = None,
              why: str | None = None, note: dict[str, Any] | None = None) -> bool:
        """Queue `data` for keeping when it is informative or drawn in the random sample (or always, with a `why`:
        e.g. "shadow_disagrees", whose `note` goes into the record). Never raises, never blocks: returns whether
        the photo was queued."""
        score, reason = why_keep(answer, self.margin)
        if why is not None:  # a reason from outside (the shadow disagreed): as informative as it gets
            score = 1.0
        else:
            why = reason
        if why is None:
            if not (self.sample > 0 and self._random.random() < self.sample):
                return False
            why = "random"
        if sha256 is not None and sha256 in self._index:
            self.duplicates += 1
            return False
        job = (data, sha256, answer, labels, score, why, time.time(), note)  # the record is built on the writer
        with self._qlock:
            if self._queued_bytes + len(data) > QUEUE_BYTES:
                self.dropped += 1
                return False
            self._queued_bytes += len(data)
        if not self._put(("keep", job)):
            with self._qlock:
                self._queued_bytes -= len(data)
            return False
        return True

    def feedback(self, sha256: str, label: str, previous: dict[str, Any], model_version: str,
                 request_id: str | None) -> str | None:
        """A label for a kept photo (from the feedback endpoint): queued for the training folder. Returns its
        path relative to the folder, or None when the photo is not (or no longer) kept."""
        kept = self._index.get(sha256)
        if kept is None or self.broken:
            return None
        self._put(("label", (kept, label, previous, model_version, request_id)))
        return LabelWriter.relative(label, sha256, kept.ext)

    def _put(self, item: tuple[str, Any]) -> bool:
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    # --- the writer thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, args = item
            if kind == "keep":
                with self._qlock:
                    self._queued_bytes -= len(args[0])
            try:
                if self.broken:
                    raise OSError(self.broken)
                if kind == "keep":
                    self._keep(*args)
                else:
                    self._label(*args)
            except OSError as exc:  # full or read-only disk: counted, said once (then every 1000th)
                self.errors += 1
                if self.errors == 1 or self.errors % 1000 == 0:
                    log.warning("kept photos: write failed (%d so far): %s", self.errors, exc)
            except LabelError as exc:  # a model label that cannot be a folder name
                self.errors += 1
                log.warning("kept photos: feedback label not written: %s", exc)
            except Exception:  # a bug here must not kill the thread (and with it, keeping)
                self.errors += 1
                log.exception("kept photos: unexpected error")
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _keep(self, data: bytes, sha256: str | None, answer: Answer, labels: list[str], score: float, why: str,
              kept_at: float, note: dict[str, Any] | None = None) -> None:
        sha = sha256 or hashlib.sha256(data).hexdigest()
        if sha in self._index:
            self.duplicates += 1
            return
        record = {"kept_at": kept_at, "time": utc_now(kept_at), "why": why, "informativeness": round(score, 6),
                  "model": answer.model, "model_version": answer.model_version, "request_id": answer.request_id,
                  "answer": {"label": answer.label, "confidence": round(answer.confidence, 6),
                             "abstained": answer.abstained, "reason": answer.reason,
                             "top_k": [[t.label, round(t.probability, 6)] for t in answer.top_k]},
                  "labels": labels,
                  "probabilities": ([round(float(p), 6) for p in answer.probabilities]
                                    if answer.probabilities is not None else None)}
        if note:
            record["shadow"] = note
        ext = image_ext(data)
        body = json.dumps({"sha256": sha, "ext": ext, **record}, ensure_ascii=False).encode("utf-8")
        photo, meta = self.photos / f"{sha}.{ext}", self.photos / f"{sha}.json"
        write_atomic(photo, data)
        try:
            write_atomic(meta, body)
        except OSError:
            photo.unlink(missing_ok=True)
            raise
        kept = Kept(sha, ext, float(record["informativeness"]), float(record["kept_at"]), len(data) + len(body))
        with self._lock:
            self._index[sha] = kept
            self.bytes += kept.size
            self.kept += 1
        self._evict()

    def _evict(self) -> None:
        """Least informative (to 0.1) first, the oldest of those first, until the folder fits again."""
        while self.bytes > self.max_bytes and self._index:
            victim = min(self._index.values(), key=lambda k: (round(k.score, 1), k.time))  # only this thread writes
            with self._lock:
                del self._index[victim.sha256]
                self.bytes -= victim.size
            (self.photos / f"{victim.sha256}.json").unlink(missing_ok=True)  # record first: never a photo-less one
            (self.photos / f"{victim.sha256}.{victim.ext}").unlink(missing_ok=True)
            self.evicted += 1

    def _label(self, kept: Kept, label: str, previous: dict[str, Any], model_version: str,
               request_id: str | None) -> None:
        photo = self.photos / f"{kept.sha256}.{kept.ext}"
        try:
            data = photo.read_bytes()
        except FileNotFoundError:
            log.warning("kept photos: feedback label %r for %s came after the photo was evicted; not written to "
                        "%s", label, kept.sha256, self.data)
            return
        record = read_record(self.photos / f"{kept.sha256}.json") or {}
        previous = {**previous, **record.get("answer", {})}
        self._writer.write(kept.sha256, data, label, previous=previous, model_version=model_version,
                           request_id=request_id, source="feedback")
        self.labels += 1

    # --- tests and shutdown -----------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every queued photo and label is written (tests; shutdown)."""
        self._queue.join()

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._index

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)
