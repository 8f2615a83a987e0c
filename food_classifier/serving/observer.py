"""The service's quality hook: drift windows, feedback, and the prediction log.

`PredictionService` calls `observe` once per answered image, whatever the transport. It costs a
sha256 of the upload (~0.1 ms for a 200 kB photo) and a few dict operations; the statistics are
computed only when /metrics is scraped. Cache hits stay out of the drift window (a photo sent a
thousand times is one photo, not a shift), but are counted.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from food_classifier.answer import Answer
from food_classifier.defaults import MiB
from food_classifier.monitoring.keep import KeptPhotos
from food_classifier.monitoring.log import PredictionLog
from food_classifier.monitoring.statistics import RollingWindow, drift, entropy
from food_classifier.serving.errors import InvalidInput, NotFound
from food_classifier.serving.settings import ServeSettings

log = logging.getLogger("food_classifier.serving")


class Served(Protocol):
    """What the monitor reads of a `registry.LoadedModel` (no import of the registry: it imports us)."""

    name: str
    version: str
    labels: list[str]
    classifier: Any


class UnknownPrediction(NotFound):
    code = "unknown_prediction"


@dataclass(frozen=True)
class _Remembered:
    model: str
    version: str
    label_idx: int
    sha256: str
    labels: list[str]  # of the version that predicted (shared, not copied)


@dataclass
class _ModelState:
    window: RollingWindow
    reference: dict[str, Any] | None
    cache_hits: int = 0


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class ServingMonitor:
    def __init__(self, settings: ServeSettings):
        self.window_size = settings.monitor_window
        self.memory = settings.feedback_memory
        self._models: dict[str, _ModelState] = {}
        self._recent: OrderedDict[str, _Remembered] = OrderedDict()  # request_id -> what was predicted
        self._by_sha: dict[tuple[str, str], str] = {}  # (model, sha256) -> latest request_id
        # model -> (version, image sha256) -> (label given, correct), rolling: one vote per image per version
        self._feedback: dict[str, OrderedDict[tuple[str, str], tuple[str, bool]]] = {}
        self.feedback_counts: Counter[tuple[str, str]] = Counter()  # (model, correct|wrong)
        self.log_errors = 0
        self._lock = threading.Lock()
        self.log = None
        if settings.prediction_log is not None:
            self.log = PredictionLog(settings.prediction_log, settings.prediction_log_max_bytes,
                                     settings.log_images_sample, keep=settings.prediction_log_keep)
        self.keep = None  # the photos worth a label (monitoring/keep.py): written off the event loop
        if settings.keep_photos is not None:
            self.keep = KeptPhotos(settings.keep_photos, settings.keep_max_mb * MiB, settings.keep_sample,
                                   settings.keep_margin, settings.keep_data)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.keep is not None:
            self.keep.close()

    # --- predictions ---------------------------------------------------------------------------------
    def observe(self, model: Served, answer: Answer, data: bytes, sha256: str | None = None) -> None:
        """One answered image (its `Answer` carries the whole probability row, the request id, cache, timings)."""
        cache, probs = answer.cache, answer.probabilities
        state = self._state(model)
        if cache.startswith("hit"):
            state.cache_hits += 1
        else:
            state.window.add(probs, answer.abstained)
        keep = self.keep is not None and not cache.startswith("hit")  # a cache hit's photo was offered already
        if not self.memory and self.log is None:
            if keep:
                self.keep.offer(answer, data, model.labels)  # hashed on the writer thread, if kept
            return
        sha = sha256 or hashlib.sha256(data).hexdigest()
        if keep:
            self.keep.offer(answer, data, model.labels, sha)
        rid = answer.request_id or ""
        if self.memory:
            with self._lock:
                self._recent[rid] = _Remembered(model.name, model.version, answer.label_idx, sha, model.labels)
                self._by_sha[(model.name, sha)] = rid
                while len(self._recent) > self.memory:
                    _, old = self._recent.popitem(last=False)
                    self._by_sha.pop((old.model, old.sha256), None)
        if self.log is not None:
            self._write(log_record(answer, sha, float(entropy(probs[None])[0])), data)

    def _state(self, model: Served) -> _ModelState:
        state = self._models.get(model.name)
        if state is None or state.window.version != model.version:  # a new version starts a new window
            ref = model.classifier.bundle.meta.reference
            state = _ModelState(RollingWindow(self.window_size, model.version),
                                ref.model_dump() if ref is not None else None)
            self._models[model.name] = state
        return state

    def _write(self, record: dict[str, Any], image: bytes | None = None) -> None:
        assert self.log is not None
        try:
            self.log.write(record, image)
        except OSError as exc:  # a full disk must not fail predictions: counted and logged
            self.log_errors += 1
            if self.log_errors == 1 or self.log_errors % 1000 == 0:
                log.warning("prediction log write failed (%d so far): %s", self.log_errors, exc)

    # --- feedback ------------------------------------------------------------------------------------
    def feedback(self, model: str, label: str, request_id: str | None = None,
                 sha256: str | None = None) -> dict[str, Any]:
        """Record the true label of an earlier prediction of `model` (by its request_id, or the latest
        prediction of the image with this sha256). One vote per image (sha256) per model version, so
        feedback on many requests for one photo (cache hits) or many posts on one request count once:
        `vote` says "new", "replaced" (another label for the same image) or "unchanged" (a repeat, which
        changes nothing and is not logged again)."""
        with self._lock:
            rid = request_id if request_id is not None else self._by_sha.get((model, (sha256 or "").lower()))
            seen = self._recent.get(rid) if rid is not None else None
        if seen is None or seen.model != model:
            what = f"request_id {request_id!r}" if request_id is not None else f"sha256 {sha256!r}"
            raise UnknownPrediction(f"no recent prediction of model {model!r} with {what} (the server remembers "
                                    f"the last {self.memory} predictions)")
        if label not in seen.labels:
            shown = label if len(label) <= 100 else f"{label[:100]}... ({len(label):,} characters)"
            raise InvalidInput(f"label {shown!r} is not a label of {model}:{seen.version} "
                               f"({', '.join(seen.labels)})", code="unknown_label")
        correct = seen.labels.index(label) == seen.label_idx
        key = (seen.version, seen.sha256)
        with self._lock:
            window = self._feedback.setdefault(model, OrderedDict())
            before = window.get(key)
            vote = "new" if before is None else "unchanged" if before[0] == label else "replaced"
            if vote != "unchanged":
                window.pop(key, None)  # another label for the same image replaces the earlier vote
                window[key] = (label, correct)
                while len(window) > self.window_size:
                    window.popitem(last=False)
                self.feedback_counts[(model, "correct" if correct else "wrong")] += 1
        answer = {"request_id": rid, "model": model, "model_version": seen.version, "label": label,
                  "predicted": seen.labels[seen.label_idx], "correct": correct, "vote": vote}
        if self.keep is not None and vote != "unchanged":  # a kept photo's label lands in the training folder
            answer["training_photo"] = self.keep.feedback(
                seen.sha256, label, {"label": seen.labels[seen.label_idx]}, seen.version, rid)
        if self.log is not None and vote != "unchanged":
            self._write({"kind": "feedback", "time": _now(), "sha256": seen.sha256, **answer})
        return answer

    # --- what /metrics shows ---------------------------------------------------------------------------
    def snapshot(self) -> list[dict[str, Any]]:
        """Per model: window statistics (drift against the reference when the bundle has one), the
        reference's own rates, cache hits kept out of the window, and live accuracy from feedback."""
        out = []
        for name, state in list(self._models.items()):
            stats = drift(state.reference, *state.window.arrays())
            ref = state.reference
            if ref is not None:
                stats["reference_abstention_rate"] = ref["abstention_rate"]
                if ref.get("mean_confidence") is not None:
                    stats["reference_estimated_accuracy"] = ref["mean_confidence"]
            with self._lock:
                fb = [correct for _, correct in self._feedback.get(name, {}).values()]
            if fb:
                stats["live_accuracy"] = float(np.mean(fb))
            stats["feedback_window"] = float(len(fb))
            out.append({"model": name, "cache_hits": state.cache_hits, "stats": stats})
        return out


def log_record(answer: Answer, sha256: str, entropy_: float) -> dict[str, Any]:
    """An `Answer` as a prediction-log line (the log's one wire format; `monitor` reads it back)."""
    return {"kind": "prediction", "time": _now(), "request_id": answer.request_id, "model": answer.model,
            "version": answer.model_version, "sha256": sha256, "label": answer.label, "label_idx": answer.label_idx,
            "confidence": round(answer.confidence, 6), "abstained": answer.abstained, "reason": answer.reason,
            "stage": answer.stage, "entropy": round(entropy_, 6),
            "top_k": [[t.label, round(t.probability, 6)] for t in answer.top_k],
            "cache": answer.cache, "latency_ms": answer.timings.total_ms}
