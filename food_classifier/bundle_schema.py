"""The typed schema of `bundle.json` (format food_classifier.bundle/2). Import it from `bundle`.

Every field any code reads is declared and typed here, once. Sections holding measurements keep keys
they do not declare (`extra="allow"`), so details flow through unchanged; the top level forbids
unknown keys, so a new section is declared here before anything writes it. Format /1 had the same
fields without the reserved sections, so a /1 bundle validates as is. Only pydantic: serving imports it.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from food_classifier.preprocessing import PreprocessSpec

FORMAT = "food_classifier.bundle/2"
READABLE_FORMATS = ("food_classifier.bundle/1", FORMAT)
_DEFAULT = PreprocessSpec()
CASCADE = "cascade"  # the variant name of a bundle's cascade (its stages are files of their own)


class Section(BaseModel):
    """A section whose detail keys may grow: unknown keys are kept, declared ones typed."""

    model_config = ConfigDict(extra="allow")


class Preprocessing(Section):
    """`PreprocessSpec.to_dict()`; new spec fields (e.g. layout, scale) flow through as extra keys."""

    resize: int = _DEFAULT.resize
    crop: int = _DEFAULT.crop
    mean: list[float] = Field(default_factory=lambda: list(_DEFAULT.mean))
    std: list[float] = Field(default_factory=lambda: list(_DEFAULT.std))
    interpolation: str = _DEFAULT.interpolation

    @model_validator(mode="after")
    def _sane(self) -> Preprocessing:
        if self.crop <= 0:
            raise ValueError(f"crop must be > 0 (got {self.crop})")
        if self.resize < self.crop:
            raise ValueError(f"resize ({self.resize}) must be >= crop ({self.crop})")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs 3 values, one per RGB channel (got {getattr(self, name)})")
        if min(self.std) <= 0:
            raise ValueError(f"std values must be > 0 (got {self.std})")
        return self

    @classmethod
    def from_spec(cls, spec: PreprocessSpec) -> Preprocessing:
        return cls.model_validate(spec.to_dict())

    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.model_dump())


class Variant(Section):
    """A model file of the bundle; the int8 entry carries its measurement (training/quantize.py)."""

    file: str
    sha256: str | None = None
    size_bytes: int | None = None
    method: str | None = None
    recommended: bool | None = None  # False: measured worse or slower than fp32; `auto` then serves fp32
    not_recommended_because: list[str] | None = None
    accuracy_tier: str | None = None
    test_accuracy: float | None = None
    fp32_test_accuracy: float | None = None
    accuracy_delta_points: float | None = None
    n_test: int | None = None
    top1_agreement: dict[str, float] | None = None
    verdict: dict[str, Any] | None = None  # the rule that decided `recommended`, with its checks (quantize.py)
    ms_per_image_batch1: float | None = None
    ms_per_image_batch32: float | None = None
    fp32_ms_per_image_batch1: float | None = None
    fp32_ms_per_image_batch32: float | None = None
    speedup: dict[str, float] | None = None
    speed_measured: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    step_seconds: dict[str, float] | None = None

    @field_validator("file")
    @classmethod
    def _inside(cls, v: str) -> str:
        p = PurePosixPath(v)
        if not v or p.is_absolute() or ".." in p.parts or "\\" in v:
            raise ValueError(f"variant file {v!r} must be a relative path inside the bundle")
        return v


class Calibration(Section):
    """Temperature scaling (training/calibrate.py): probabilities = softmax(logits / temperature)."""

    temperature: float = Field(1.0, gt=0)
    fitted: bool = False
    method: str | None = None
    fitted_on: str | None = None
    n_fit: int | None = None
    accuracy_fit: float | None = None
    at_bound: bool | None = None
    n_validation: int | None = None
    ece_bins: int | None = None
    nll_fit_before: float | None = None
    nll_fit_after: float | None = None
    nll_validation_before: float | None = None
    nll_validation_after: float | None = None
    ece_validation_before: float | None = None
    ece_validation_after: float | None = None
    nll_test_before: float | None = None
    nll_test_after: float | None = None
    ece_test_before: float | None = None
    ece_test_after: float | None = None
    ece_test_floor: float | None = None


class Abstention(Section):
    """Answer "unsure" below `threshold` (None: never), chosen for `target_precision`."""

    threshold: float | None = Field(None, ge=0, le=1)
    target_precision: float | None = None
    target_met: bool | None = None
    chosen_on: str | None = None
    fit_coverage: float | None = None
    fit_precision: float | None = None
    validation_coverage: float | None = None
    validation_precision: float | None = None
    test_coverage: float | None = None
    test_accuracy_covered: float | None = None
    test_accuracy_all: float | None = None


class TierMetrics(Section):
    """`evaluate.summary` of one tier; `held_out: false` marks a tier the model was fitted on."""

    n: int | None = None
    accuracy: float | None = None
    accuracy_ci95: list[float] | None = None
    macro_f1: float | None = None
    nll: float | None = None
    ece: float | None = None
    held_out: bool | None = None


class Training(Section):
    """The TrainConfig of the run (its fields as keys) plus what the run measured."""

    arch: str | None = None
    fit_tiers: list[str] = Field(default_factory=lambda: ["train"])
    train_seconds: float | None = None
    seed: int | None = None


class Dataset(Section):
    manifest: str | None = None
    manifest_sha256: str | None = None


class Parity(Section):
    """ONNX Runtime vs PyTorch on real images at export."""

    n_images: int | None = None
    max_abs_prob_diff: float | None = None
    top1_agreement: float | None = None
    tolerance: float | None = None


class InputSpec(Section):
    name: str = "image"
    shape: list[int | str] | None = None
    dtype: str | None = None


class OutputSpec(Section):
    name: str = "logits"
    softmax: str | None = None
    kind: Literal["logits", "probs"] = "logits"  # probs: the graph ends in a softmax (import-onnx)


class Stage(Variant):
    """One cascade stage: a graph that adds `members[-1]`'s backbone to the features of the stages before.

    Stage 1 maps image -> (logits, features, imagenet_logits); stage k > 1 maps (image, features) ->
    (logits, features), so no backbone runs twice. Its logits are calibrated with its own temperature."""

    members: list[str] = Field(min_length=1)
    temperature: float = Field(default=1.0, gt=0)
    threshold: float | None = Field(default=None, ge=0)  # escalate when confidence < it (> 1: all); None: last
    int8: Variant | None = None  # the same stage quantized, served instead when present (training measured it)


class Cascade(Section):
    """Ordered stages: every image runs stage 1, and only the unsure ones go on (training/cascade.py).

    `abstain_threshold` replaces the bundle's one for cascade answers: they mix stages, so it is
    chosen on the mixed out-of-fold answers. `measured`: what the training run found (OOF and test)."""

    stages: list[Stage] = Field(min_length=2)
    abstain_threshold: float | None = None
    measured: dict[str, Any] = Field(default_factory=dict)

    def files(self) -> list[Variant]:
        """Every file of the stages (each stage's graph and its int8 twin), for checks and publishing."""
        return [v for s in self.stages for v in (s, s.int8) if v is not None]

    @model_validator(mode="after")
    def _thresholds(self) -> Cascade:
        if any(s.threshold is None for s in self.stages[:-1]):
            raise ValueError("every cascade stage but the last needs a threshold")
        return self


class NotFood(Section):
    """Answer "not_food" when the ImageNet head puts less than `threshold` on food-ish classes (not_food.py).

    `food_classes` are ImageNet-1k indices (foods, tableware, cookware, kitchens); the score is their
    softmax mass at `temperature` over the 1000 logits of graph output `output`. `measured` holds what
    `training/not_food.fit_rule` measured: false rejections of food photos, catches of non-food ones."""

    output: str = "imagenet_logits"
    food_classes: list[int] = Field(min_length=1)
    threshold: float = Field(ge=0, le=1)
    temperature: float = Field(1.0, gt=0)
    max_false_reject: float | None = None
    chosen_on: str | None = None
    measured: dict[str, Any] = Field(default_factory=dict)

    @field_validator("food_classes")
    @classmethod
    def _indices(cls, v: list[int]) -> list[int]:
        if min(v) < 0 or len(set(v)) != len(v):
            raise ValueError("food_classes must be distinct non-negative class indices")
        return v


class Histogram(Section):
    edges: list[float] = Field(min_length=2)
    counts: list[int]

    @model_validator(mode="after")
    def _sizes(self) -> Histogram:
        if len(self.counts) != len(self.edges) - 1:
            raise ValueError(f"a histogram needs one count per bin: {len(self.edges)} edges, {len(self.counts)} counts")
        return self


class Reference(Section):
    """Held-out predictions the server compares live traffic with (`monitoring.reference_stats`)."""

    source: str | None = None
    n: int = Field(gt=0)
    class_counts: list[int]
    class_fractions: list[float] | None = None
    confidence_hist: Histogram
    entropy_hist: Histogram
    abstain_threshold: float | None = None
    abstention_rate: float = 0.0
    mean_confidence: float | None = None
    accuracy: float | None = None


class BundleMeta(BaseModel):
    """Everything `bundle.json` holds. Owns the reading policy (temperature, threshold, variant)."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    created_at: str | None = None
    arch: str | None = None
    builtin: bool = False
    description: str | None = None
    labels: list[str] = Field(min_length=1)
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    input: InputSpec | None = None
    output: OutputSpec | None = None
    variants: dict[str, Variant]
    calibration: Calibration = Field(default_factory=Calibration)
    abstention: Abstention = Field(default_factory=Abstention)
    metrics: dict[str, TierMetrics] = Field(default_factory=dict)
    metrics_note: str | None = None
    training: Training | None = None
    dataset: Dataset | None = None
    parity: Parity | None = None
    source: dict[str, Any] | None = None  # where a built-in model's weights and classes came from
    build_seconds: float | None = None
    cascade: Cascade | None = None
    not_food: NotFood | None = None  # reject photos that are clearly not food (not_food.py)
    reference: Reference | None = None  # drift monitoring: statistics of held-out predictions

    @model_validator(mode="before")
    @classmethod
    def _default_variants(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("variants"):  # as format /1: one fp32 model.onnx
            data = {**data, "variants": {"fp32": {"file": "model.onnx"}}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> BundleMeta:
        if "fp32" not in self.variants:
            raise ValueError(f"variants must include fp32 (has: {', '.join(sorted(self.variants))})")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        if self.reference is not None and len(self.reference.class_counts) != len(self.labels):
            raise ValueError(f"reference.class_counts has {len(self.reference.class_counts)} entries for "
                             f"{len(self.labels)} labels")
        return self

    @property
    def spec(self) -> PreprocessSpec:
        return self.preprocessing.spec()

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    @property
    def abstain_threshold(self) -> float | None:
        return self.abstention.threshold

    @property
    def fit_tiers(self) -> list[str]:
        """Tiers the model was fitted on (train, and validation for a refitted head)."""
        return list(self.training.fit_tiers) if self.training else ["train"]

    @property
    def input_name(self) -> str:
        return self.input.name if self.input else "image"

    def recommended_variant(self) -> str:
        """The cascade when shipped; else int8 when shipped, unless its own measurement said
        `recommended: false`; else fp32."""
        if self.cascade is not None:
            return CASCADE
        int8 = self.variants.get("int8")
        return "int8" if int8 is not None and int8.recommended is not False else "fp32"

    def to_json_dict(self) -> dict[str, Any]:
        """What bundle.json holds: the keys that were given (defaults are the readers' business)."""
        return self.model_dump(mode="json", exclude_unset=True)
