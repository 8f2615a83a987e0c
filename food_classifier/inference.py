"""Prediction with ONNX Runtime from a model bundle. No torch on this path.

    clf = Classifier("models/food")          # a bundle dir or a model dir (promoted, else newest version)
    clf.predict("pie.jpg").label
    clf.predict_batch([bytes1, "b.png", pil_image])
    Classifier("models/food", cache=PredictionCache())   # repeated photos skip decode and/or inference
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from food_classifier import runtime
from food_classifier.bundle import Bundle, BundleError, load_newest
from food_classifier.preprocessing import DEFAULT_MAX_PIXELS, ImageInput, preprocess

if TYPE_CHECKING:
    from food_classifier.cache import PredictionCache

UNSURE = "unsure"
AUTO = "auto"  # the variant the bundle recommends (BundleMeta.recommended_variant)


@dataclass
class Prediction:
    label: str
    label_idx: int
    confidence: float
    top_k: list[dict] = field(default_factory=list)
    abstained: bool = False
    cache: str = "off"  # hit-bytes, hit-pixels, miss or off (see food_classifier.cache)

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
    recommended one. A graph ORT cannot load, or whose output width is not the
    number of labels, is a `BundleError` naming the file (the session is the one place that sees it)."""

    def __init__(self, bundle: str | Path | Bundle, threads: int | None = None, variant: str = "fp32",
                 top_k: int = 5, max_pixels: int = DEFAULT_MAX_PIXELS, cache: PredictionCache | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_newest(bundle)
        self.variant = self.bundle.meta.recommended_variant() if variant == AUTO else variant
        self.top_k = top_k
        self.max_pixels = max_pixels
        model = self.bundle.model_file(self.variant)
        try:
            self.session = runtime.create_session(model, threads)
        except Exception as e:  # not an ONNX graph, truncated, unsupported op...
            raise BundleError(f"{model}: ONNX Runtime cannot load it: {str(e).strip().splitlines()[0]}") from None
        shape = self.session.get_outputs()[0].shape
        width = shape[-1] if shape else None
        if isinstance(width, int) and width != len(self.bundle.labels):
            raise BundleError(f"{model}: the model outputs {width} classes but {self.bundle.path / 'bundle.json'} "
                              f"lists {len(self.bundle.labels)} labels")
        self.labels = self.bundle.labels
        self.spec = self.bundle.preprocessing
        self.cache = cache
        # Imported models may end in a softmax (`import-onnx --outputs probs`): their log is a logit.
        self.outputs_probs = self.bundle.meta.output is not None and self.bundle.meta.output.kind == "probs"

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    def preprocess(self, image: ImageInput) -> np.ndarray:
        return preprocess(image, self.spec, max_pixels=self.max_pixels)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        out = runtime.run(self.session, batch)
        return np.log(np.maximum(out, 1e-30)) if self.outputs_probs else out

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities for a preprocessed batch ([N, *spec.input_shape])."""
        return softmax(self.logits(batch), self.bundle.temperature)

    def decide(self, probs: np.ndarray, top_k: int | None = None,
               threshold: float | None = None) -> list[Prediction]:
        """Turn probability rows into predictions, abstaining below the threshold."""
        k = min(top_k or self.top_k, len(self.labels))
        thr = self.bundle.abstain_threshold if threshold is None else threshold
        out = []
        for row in probs:
            order = np.argsort(-row)[:k]
            idx = int(order[0])
            conf = float(row[idx])
            unsure = thr is not None and conf < thr
            out.append(Prediction(
                label=UNSURE if unsure else self.labels[idx], label_idx=idx, confidence=conf,
                top_k=[{"label": self.labels[i], "probability": float(row[i])} for i in order],
                abstained=unsure))
        return out

    def predict(self, image: ImageInput, top_k: int | None = None, threshold: float | None = None) -> Prediction:
        if self.cache is not None:
            return self.predict_batch([image], top_k, threshold)[0]
        return self.decide(self.predict_proba(self.preprocess(image)[None]), top_k, threshold)[0]

    def predict_batch(self, images: Sequence[ImageInput], top_k: int | None = None,
                      threshold: float | None = None, batch_size: int = 32) -> list[Prediction]:
        """Decode in a thread pool (Pillow releases the GIL), run the model in chunks."""
        if self.cache is not None:
            probs, outcomes = self.cache.proba_batch(self, images, batch_size)
            preds = self.decide(probs, top_k, threshold)
            for pred, outcome in zip(preds, outcomes, strict=True):
                pred.cache = outcome
            return preds
        probs = runtime.map_batched(images, self.preprocess, self.predict_proba, batch_size)
        return [p for chunk in probs for p in self.decide(chunk, top_k, threshold)]
