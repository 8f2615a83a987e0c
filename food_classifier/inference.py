"""Prediction with ONNX Runtime from a model bundle. No torch on this path.

    clf = Classifier("models/food")          # a bundle dir or a model dir (promoted, else newest version)
    clf.predict("pie.jpg").label
    clf.predict_batch([bytes1, "b.png", pil_image])
    Classifier("models/food", cache=PredictionCache())   # repeated photos skip decode and/or inference
    Classifier("models/food", variant="cascade")         # stage 1 for every photo, the rest for unsure ones

Every path (this class, the server's batcher, the cache, `predict-dir`) moves one float32 row per image
between "run the model" and "decide": `infer` returns the calibrated probabilities followed by two
columns, the cascade stage that answered and a not-food flag, so a cached answer keeps both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from food_classifier import runtime
from food_classifier.bundle import CASCADE, Bundle, BundleError, load_newest
from food_classifier.not_food import NOT_FOOD, reject
from food_classifier.preprocessing import DEFAULT_MAX_PIXELS, ImageInput, preprocess

if TYPE_CHECKING:
    from food_classifier.cache import PredictionCache

UNSURE = "unsure"
AUTO = "auto"  # the variant the bundle recommends (BundleMeta.recommended_variant)
EXTRA = 2  # columns after the probabilities in an `infer` row: stage reached (1-based), not-food flag


@dataclass
class Prediction:
    label: str
    label_idx: int
    confidence: float
    top_k: list[dict] = field(default_factory=list)
    abstained: bool = False
    cache: str = "off"  # hit-bytes, hit-pixels, miss or off (see food_classifier.cache)
    stage: int = 1      # the cascade stage that answered (1 for a single-graph variant)

    def to_dict(self) -> dict:
        return asdict(self)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class Classifier:
    """A loaded bundle + ONNX Runtime session. Thread-safe: ORT's `run` may be called concurrently.

    A path loads the promoted, else the newest valid version; `variant="auto"` takes the bundle's
    recommended one (its cascade when it ships one: see `infer`). A graph ORT cannot load, or whose
    output width is not the number of labels, is a `BundleError` naming the file (the session is the
    one place that sees it)."""

    def __init__(self, bundle: str | Path | Bundle, threads: int | None = None, variant: str = "fp32",
                 top_k: int = 5, max_pixels: int = DEFAULT_MAX_PIXELS, cache: PredictionCache | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_newest(bundle)
        self.variant = self.bundle.meta.recommended_variant() if variant == AUTO else variant
        self.top_k = top_k
        self.max_pixels = max_pixels
        self.labels = self.bundle.labels
        self.spec = self.bundle.preprocessing
        self.cache = cache
        self.cascade = self.bundle.meta.cascade if self.variant == CASCADE else None
        if self.variant == CASCADE and self.cascade is None:
            raise BundleError(f"bundle {self.bundle.name}:{self.bundle.version} has no cascade "
                              f"(has: {', '.join(sorted(self.bundle.variants))})")
        files = ([self.bundle.path / (s.int8 or s).file for s in self.cascade.stages] if self.cascade
                 else [self.bundle.model_file(self.variant)])
        self.sessions = [_session(f, threads) for f in files]
        self.session = self.sessions[0]
        shape = self.session.get_outputs()[0].shape
        width = shape[-1] if shape else None
        if isinstance(width, int) and width != len(self.bundle.labels):
            raise BundleError(f"{files[0]}: the model outputs {width} classes but {self.bundle.path / 'bundle.json'} "
                              f"lists {len(self.bundle.labels)} labels")
        # Imported models may end in a softmax (`import-onnx --outputs probs`): their log is a logit.
        self.outputs_probs = self.bundle.meta.output is not None and self.bundle.meta.output.kind == "probs"
        self.abstain_threshold = (self.cascade.abstain_threshold if self.cascade is not None
                                  else self.bundle.abstain_threshold)
        # The not-food rule reads the first graph's ImageNet output, when the bundle has a rule and the graph
        # that output (a cascade's stage 1, the built-in model; not a plain ensemble graph).
        self.not_food = self.bundle.meta.not_food
        outputs = [o.name for o in self.session.get_outputs()]
        self._imagenet = outputs.index(self.not_food.output) if self.not_food and self.not_food.output in outputs \
            else None

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    def preprocess(self, image: ImageInput) -> np.ndarray:
        return preprocess(image, self.spec, max_pixels=self.max_pixels)

    @property
    def row_width(self) -> int:
        return len(self.labels) + EXTRA

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self._as_logits(runtime.run(self.session, batch))

    def _as_logits(self, out: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(out, 1e-30)) if self.outputs_probs else out

    def every_stage(self, batch: np.ndarray) -> np.ndarray:
        """The last cascade stage's logits with every stage run on every image, whatever the thresholds
        (warm-up, and training's check that the last stage is the whole graph)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        logits, features = self.session.run(None, {"image": batch})[:2]
        for session in self.sessions[1:]:
            logits, features = session.run(None, {"image": batch, "features": features})
        return logits

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """[N, labels + 2] rows for a preprocessed batch: calibrated probabilities, stage, not-food flag."""
        n, c = len(batch), len(self.labels)
        rows = np.zeros((n, c + EXTRA), dtype=np.float32)
        rows[:, c] = 1
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        first = self.session.run(None, {self.session.get_inputs()[0].name: batch})
        if self._imagenet is not None:
            rows[:, c + 1] = reject(first[self._imagenet], self.not_food)
        if self.cascade is None:
            rows[:, :c] = softmax(self._as_logits(first[0]), self.bundle.temperature)
            return rows
        stages = self.cascade.stages
        logits, features = first[0], first[1]
        active = np.arange(n)
        for k, stage in enumerate(stages):
            if k:
                logits, features = self.sessions[k].run(None, {"image": batch[active], "features": features})
            rows[active, :c] = softmax(logits, stage.temperature)
            rows[active, c] = k + 1
            if stage.threshold is None:
                break
            unsure = rows[active, :c].max(axis=1) < stage.threshold
            active, features = active[unsure], features[unsure]
            if not len(active):
                break
        return rows

    def warm_up(self, sizes: Sequence[int] = (1,)) -> None:
        """Run every graph (each cascade stage, whatever the images) once per batch size: the first
        real request then pays no allocation or thread start-up."""
        for n in sizes:
            x = np.zeros((n, *self.spec.input_shape), dtype=np.float32)
            if self.cascade is None:
                self.infer(x)
            else:
                self.every_stage(x)

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities for a preprocessed batch ([N, *spec.input_shape])."""
        return self.infer(batch)[:, :len(self.labels)]

    def decide(self, rows: np.ndarray, top_k: int | None = None, threshold: float | None = None,
               reject_not_food: bool = True) -> list[Prediction]:
        """Turn `infer` rows (or bare probability rows) into predictions: "not_food" where the rule flagged
        the photo (unless `reject_not_food` is off), else abstaining below the threshold. Both keep top_k."""
        c = len(self.labels)
        k = min(top_k or self.top_k, c)
        thr = self.abstain_threshold if threshold is None else threshold
        out = []
        for full in rows:
            row = full[:c]
            order = np.argsort(-row)[:k]
            idx = int(order[0])
            conf = float(row[idx])
            unsure = thr is not None and conf < thr
            other = bool(reject_not_food and len(full) > c + 1 and full[c + 1] > 0.5)
            out.append(Prediction(
                label=NOT_FOOD if other else UNSURE if unsure else self.labels[idx], label_idx=idx, confidence=conf,
                top_k=[{"label": self.labels[i], "probability": float(row[i])} for i in order],
                abstained=unsure or other, stage=int(full[c]) if len(full) > c else 1))
        return out

    def predict(self, image: ImageInput, top_k: int | None = None, threshold: float | None = None,
                reject_not_food: bool = True) -> Prediction:
        if self.cache is not None:
            return self.predict_batch([image], top_k, threshold, reject_not_food=reject_not_food)[0]
        return self.decide(self.infer(self.preprocess(image)[None]), top_k, threshold, reject_not_food)[0]

    def predict_batch(self, images: Sequence[ImageInput], top_k: int | None = None,
                      threshold: float | None = None, batch_size: int = 32,
                      reject_not_food: bool = True) -> list[Prediction]:
        """Decode in a thread pool (Pillow releases the GIL), run the model in chunks."""
        if self.cache is not None:
            rows, outcomes = self.cache.proba_batch(self, images, batch_size)
            preds = self.decide(rows, top_k, threshold, reject_not_food)
            for pred, outcome in zip(preds, outcomes, strict=True):
                pred.cache = outcome
            return preds
        rows = runtime.map_batched(images, self.preprocess, self.infer, batch_size)
        return [p for chunk in rows for p in self.decide(chunk, top_k, threshold, reject_not_food)]


def _session(model: Path, threads: int | None):
    try:
        return runtime.create_session(model, threads)
    except Exception as e:  # not an ONNX graph, truncated, unsupported op...
        raise BundleError(f"{model}: ONNX Runtime cannot load it: {str(e).strip().splitlines()[0]}") from None
