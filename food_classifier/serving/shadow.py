"""Shadow mode: a second version of a served model answers a sampled share of live photos, off the hot path.

    serve models/food --shadow 20260301T120000-abc --shadow-sample 0.1 --keep-photos kept/

Why: `models compare` judges a challenger on labelled photos; live traffic is what it will really see. The
shadow's answers are never returned: `submit` is a sample draw and a non-blocking queue put on the event loop,
after the served answer exists; one background thread decodes and runs the shadow (ONNX Runtime releases the
GIL). A full queue drops the photo (counted), a shadow failure is counted and logged: the answer is never
delayed or failed. Agreement (same best class) and per-class disagreement are Prometheus counters; a
disagreement is offered to the kept photos (monitoring/keep.py) as the most informative photo of all.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from food_classifier.answer import Answer, Options
from food_classifier.bundle import META_FILE, BundleError
from food_classifier.inference import Classifier

if TYPE_CHECKING:
    from food_classifier.monitoring.keep import KeptPhotos

log = logging.getLogger("food_classifier.serving")

QUEUE_SIZE = 64  # photos waiting for the shadow; more are dropped (counted)
NO_NOT_FOOD = Options(reject_not_food=False)  # compare the two versions' best food class


def resolve(version: str, sources: list[Path]) -> Path:
    """The shadow's bundle dir: VERSION of one of the served model dirs, or a bundle dir path."""
    for source in sources:
        if (source / version / META_FILE).is_file() and not version.startswith("."):
            return source / version
    if (Path(version) / META_FILE).is_file():
        return Path(version)
    raise BundleError(f"--shadow {version}: no such version in {', '.join(map(str, sources))} and not a bundle "
                      "dir (`food-classifier models list` shows the versions)")


class Shadow:
    def __init__(self, bundle: Path, sample: float, keep: KeptPhotos | None = None, threads: int = 1,
                 seed: int | None = None):
        self.classifier = Classifier(bundle, threads=threads, variant="auto")
        self.name, self.version = self.classifier.name, self.classifier.version
        self.sample = sample
        self.keep = keep
        self._random = random.Random(seed)
        self.agree = self.disagree = self.dropped = self.errors = self.served = 0
        self.by_class: Counter[tuple[str, str]] = Counter()  # (served class, shadow class) -> disagreements
        self._queue: queue.Queue[tuple[Answer, bytes, list[str]] | None] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    def submit(self, model: str, answer: Answer, data: bytes, labels: list[str]) -> bool:
        """On the event loop, after the answer: maybe queue the photo for the shadow. Never raises, never blocks."""
        if model != self.name or not data or self._random.random() >= self.sample:
            return False
        if answer.model_version == self.version:  # promoted and reloaded: comparing it with itself says nothing
            self.served += 1
            if self.served == 1:
                log.warning("shadow %s is now the served version of %s: its photos are no longer compared; "
                            "restart with another --shadow VERSION, or without it", self.version, self.name)
            return False
        try:
            self._queue.put_nowait((answer, data, labels))
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._compare(*item)
            except Exception as exc:  # an undecodable photo, a shadow graph error: counted, never raised
                self.errors += 1
                if self.errors == 1 or self.errors % 1000 == 0:
                    log.warning("shadow %s: %d failure(s), last: %s", self.version, self.errors, exc)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _compare(self, answer: Answer, data: bytes, labels: list[str]) -> None:
        theirs = self.classifier.predict(data, NO_NOT_FOOD)
        served, shadow = labels[answer.label_idx], self.classifier.labels[theirs.label_idx]
        if served == shadow:
            self.agree += 1
            return
        self.disagree += 1
        self.by_class[(served, shadow)] += 1
        if self.keep is not None:
            self.keep.offer(answer, data, labels, why="shadow_disagrees",
                            note={"version": self.version, "label": shadow, "confidence": round(theirs.confidence, 6)})

    def wait(self) -> None:
        """Until every queued photo is compared (tests, shutdown)."""
        self._queue.join()

    def close(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
