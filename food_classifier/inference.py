"""Prediction with ONNX Runtime from a model bundle: the one decode -> cache -> infer -> decide path.

    clf = Classifier("models/food")          # a bundle or model dir; the bundle's recommended variant
    clf.predict("pie.jpg").label             # an `Answer` (food_classifier/answer.py)
    clf.predict_batch([bytes1, "b.png", pil_image], Options(top_k=3))
    Classifier("models/food", cache=PredictionCache())   # repeated photos skip decode and/or inference
    Classifier("models/food", variant="fp32")            # the whole graph instead of the cascade

Every way in (this class, the server's `PredictionService`, `predict-dir`, the stream worker, Ray) runs
the same steps: `lookup` (the cache: bytes, decode, pixels) -> `infer` (a float32 row per image) ->
`decide` (an `Answer`). A row is the calibrated probabilities followed by `EXTRA` columns, the cascade
stage that answered (`STAGE_COL`) and the not-food flag (`NOT_FOOD_COL`), so a cached row keeps both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from food_classifier import runtime
from food_classifier.answer import AUTO, DEFAULT_OPTIONS, NOT_FOOD, UNSURE, Answer, Options, TopK
from food_classifier.bundle import CASCADE, Bundle, BundleError, load_newest
from food_classifier.cache import OFF, Lookup, PredictionCache
from food_classifier.not_food import reject
from food_classifier.preprocessing import DEFAULT_MAX_PIXELS, ImageInput, preprocess

__all__ = ["AUTO", "EXTRA", "NOT_FOOD", "UNSURE", "Answer", "Classifier", "Options", "softmax"]
EXTRA = 2  # columns after the probabilities in an `infer` row:
STAGE_COL, NOT_FOOD_COL = 0, 1  # ... offsets past the labels: stage reached (1-based), not-food flag (0/1)


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

    def __init__(self, bundle: str | Path | Bundle, threads: int | None = None, variant: str = AUTO,
                 top_k: int = 5, max_pixels: int = DEFAULT_MAX_PIXELS, cache: PredictionCache | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_newest(bundle)
        self.variant = self.bundle.meta.recommended_variant() if variant == AUTO else variant
        self.top_k = top_k
        self.max_pixels = max_pixels
        self.labels = self.bundle.labels
        self.spec = self.bundle.preprocessing
        self.cache = cache if cache is not None else PredictionCache(memory_bytes=0)  # off: decode, no keys
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
        rows[:, c + STAGE_COL] = 1
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        first = self.session.run(None, {self.session.get_inputs()[0].name: batch})
        if self._imagenet is not None:
            rows[:, c + NOT_FOOD_COL] = reject(first[self._imagenet], self.not_food)
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
            rows[active, c + STAGE_COL] = k + 1
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

    def decide(self, rows: np.ndarray, options: Options | None = None, outcomes: Sequence[str] | None = None,
               **kw: Any) -> list[Answer]:
        """`infer` rows (or bare probability rows) -> answers: "not_food" where the rule flagged the photo (unless
        `reject_not_food` is off), else "unsure" below the threshold; both keep the best class and top_k.
        `outcomes`: each row's cache outcome. Keyword arguments are `Options` fields (`top_k=3`)."""
        opts = _options(options, kw)
        opts.check_variant(self.variant)
        c = len(self.labels)
        k = min(opts.top_k or self.top_k, c)
        thr = self.abstain_threshold if opts.threshold is None else opts.threshold
        extra = rows.shape[1] - c if rows.ndim == 2 else 0
        out = []
        for i, full in enumerate(rows):
            row = full[:c]
            order = np.argsort(-row)[:k]
            idx = int(order[0])
            conf = float(row[idx])
            other = bool(opts.reject_not_food and extra > NOT_FOOD_COL and full[c + NOT_FOOD_COL] > 0.5)
            unsure = thr is not None and conf < thr
            reason = NOT_FOOD if other else UNSURE if unsure else None
            out.append(Answer(
                label=reason or self.labels[idx], label_idx=idx, confidence=conf,
                top_k=tuple(TopK(self.labels[j], float(row[j])) for j in order), abstained=reason is not None,
                reason=reason, stage=int(full[c + STAGE_COL]) if extra > STAGE_COL else 1,
                cache=outcomes[i] if outcomes is not None else OFF, model=self.name, model_version=self.version,
                probabilities=row))
        return out

    def lookup(self, image: ImageInput) -> Lookup:
        """The cache's look at one image (bytes, then decode, then pixels): a known row, or the array to run."""
        return self.cache.lookup(self, image)

    def predict(self, image: ImageInput, options: Options | None = None, **kw: Any) -> Answer:
        """One image. Keyword arguments are `Options` fields: `clf.predict("pie.jpg", top_k=3)`."""
        return self.predict_batch([image], options, **kw)[0]

    def predict_batch(self, images: Sequence[ImageInput], options: Options | None = None, batch_size: int = 32,
                      **kw: Any) -> list[Answer]:
        """Look up (decode in a thread pool: Pillow releases the GIL), run the misses in chunks, decide."""
        opts = _options(options, kw)
        opts.check_variant(self.variant)
        rows, outcomes = self.cache.rows_batch(self, images, batch_size)
        return self.decide(rows, opts, outcomes)


def _options(options: Options | None, kw: dict[str, Any]) -> Options:
    if options is not None and kw:
        raise TypeError("pass either an Options or its fields as keyword arguments, not both")
    return Options(**kw) if kw else options or DEFAULT_OPTIONS


def _session(model: Path, threads: int | None):
    try:
        return runtime.create_session(model, threads)
    except Exception as e:  # not an ONNX graph, truncated, unsupported op...
        raise BundleError(f"{model}: ONNX Runtime cannot load it: {str(e).strip().splitlines()[0]}") from None
