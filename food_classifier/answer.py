"""What every way in asks (`Options`) and gets back (`Answer`): one typed request and one typed result.

The prediction core (`Classifier.decide`, used by `Classifier.predict*`, the server's `PredictionService`,
`predict-dir` and every transport on top of them) turns a model's row into an `Answer`; each transport has
exactly one function from `Answer` to its wire format. `Options` is validated here, once, so every transport
gives the same error for the same bad value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # numpy is not imported here: the CLI reads AUTO without loading it
    import numpy as np

AUTO = "auto"  # the variant the bundle recommends (BundleMeta.recommended_variant): declared once, here
UNSURE = "unsure"  # the label of an answer below the abstention threshold
NOT_FOOD = "not_food"  # the label of a photo the bundle's not-food rule rejected
MAX_TOP_K = 1000
Reason = Literal["unsure", "not_food"] | None


class OptionsError(ValueError):
    """A bad request option: the message names the option and what it accepts (transports map it to 4xx)."""


@dataclass(frozen=True, slots=True)
class Options:
    """How to answer: `top_k` classes (None: the model's default), abstain below `threshold` (None: the
    bundle's), answer "not_food" when the bundle's rule says so, and which `variant` (None or "auto": the one
    loaded). Invalid values raise `OptionsError` at construction: a bad value never silently means "default"."""

    top_k: int | None = None
    threshold: float | None = None
    reject_not_food: bool = True
    variant: str | None = None

    def __post_init__(self) -> None:
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, Integral)
                                       or not 1 <= self.top_k <= MAX_TOP_K):
            raise OptionsError(f"top_k must be a whole number from 1 to {MAX_TOP_K} (or unset), got {self.top_k!r}")
        if self.threshold is not None and (isinstance(self.threshold, bool)
                                           or not isinstance(self.threshold, Real)
                                           or not math.isfinite(self.threshold) or not 0 <= self.threshold <= 1):
            raise OptionsError(f"threshold must be a number from 0 to 1 (or unset), got {self.threshold!r}")
        if not (isinstance(self.reject_not_food, bool) or getattr(getattr(self.reject_not_food, "dtype", None),
                                                                  "kind", None) == "b"):
            raise OptionsError(f"reject_not_food must be true or false, got {self.reject_not_food!r}")
        if self.variant is not None and (not isinstance(self.variant, str) or not self.variant):
            raise OptionsError(f"variant must be a variant name or '{AUTO}', got {self.variant!r}")

    def check_variant(self, loaded: str) -> None:
        """A request may name the variant it expects; a server answers only with the one it loaded."""
        if self.variant not in (None, AUTO, loaded):
            raise OptionsError(f"variant {self.variant!r} is not served here: this model serves {loaded!r} "
                               f"(start it with --variant {self.variant}, or ask for '{AUTO}')")


DEFAULT_OPTIONS = Options()


@dataclass(frozen=True, slots=True)
class TopK:
    label: str
    probability: float


@dataclass(frozen=True, slots=True)
class Timings:
    """Milliseconds spent per step (zero where a step did not run, e.g. inference on a cache hit)."""

    total_ms: float = 0.0
    preprocess_ms: float = 0.0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"total_ms": self.total_ms, "preprocess_ms": self.preprocess_ms, "queue_ms": self.queue_ms,
                "inference_ms": self.inference_ms, "batch_size": self.batch_size}


@dataclass(frozen=True, slots=True)
class Answer:
    """One image's answer. `label` is a class, "unsure" or "not_food"; `reason` says why it abstained (None when
    it did not); `label_idx`/`confidence`/`top_k` are always the model's best food class, so an abstained answer
    still shows what the model thought. `stage`: the cascade stage that answered (1 for a single graph);
    `cache`: hit-bytes, hit-pixels, miss or off. `probabilities`: the whole calibrated row (tensor protocols)."""

    label: str
    label_idx: int
    confidence: float
    top_k: tuple[TopK, ...]
    abstained: bool
    reason: Reason
    stage: int = 1
    cache: str = "off"
    model: str = ""
    model_version: str = ""
    request_id: str | None = None
    timings: Timings = field(default_factory=Timings)
    probabilities: np.ndarray | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape shared by the HTTP body, the worker's result and the CLI (`timing` as on the wire)."""
        return {"label": self.label, "label_idx": self.label_idx, "confidence": self.confidence,
                "top_k": [{"label": t.label, "probability": t.probability} for t in self.top_k],
                "abstained": self.abstained, "reason": self.reason, "stage": self.stage, "cache": self.cache,
                "model": self.model, "model_version": self.model_version, "request_id": self.request_id,
                "timing": self.timings.to_dict()}
