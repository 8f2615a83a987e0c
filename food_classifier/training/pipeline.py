"""The whole training side in order, in memory: fit -> export -> evaluate -> calibrate -> quantize
-> publish.

One `Run` carries each stage's typed result to the next; no stage re-reads what another wrote.
The run dir keeps the record (runs.py) for `evaluate RUN`, `report RUN`, `export RUN`, `--resume`;
the bundle is written once, at the end, with the metrics measured on that very graph.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from food_classifier.bundle import Bundle, BundleMeta
from food_classifier.training import runs
from food_classifier.training.calibrate import AbstentionRule, Calibrated, calibrate
from food_classifier.training.config import TrainConfig
from food_classifier.training.data import read_manifest
from food_classifier.training.evaluate import evaluate_bundle
from food_classifier.training.export import export_model
from food_classifier.training.metrics import summary
from food_classifier.training.publish import publish
from food_classifier.training.runs import Scores
from food_classifier.training.train import Fitted, fit_run, load_fitted


@dataclass
class Run:
    """A training run in memory, filled stage by stage."""

    fitted: Fitted
    exported: Bundle | None = None       # the graph in the run dir + its metadata (export)
    scores: Scores | None = None         # its logits on every manifest image (evaluate)
    calibrated: Calibrated | None = None  # temperature, abstention, metrics with T (calibrate)
    cascade: dict | None = None          # an ensemble's stages, thresholds and measurements (cascade)
    not_food: dict | None = None         # the rule on stage 1's ImageNet output (cascade)
    int8: dict | None = None             # the measured int8 variant, if it was made (quantize)
    bundle: Path | None = None           # where it was published (publish)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage, in order (timings.json)

    @property
    def dir(self) -> Path:
        return self.fitted.dir

    def final_meta(self) -> BundleMeta:
        """The exported metadata with every later stage's section in place."""
        assert self.exported is not None and self.calibrated is not None
        c = self.calibrated
        data = self.exported.meta.to_json_dict() | {
            "calibration": c.calibration, "abstention": c.abstention, "metrics": summary(c.metrics),
            "reference": c.reference}
        if self.int8:
            data["variants"] = data["variants"] | {"int8": self.int8}
        if self.cascade:
            data["cascade"] = self.cascade
        if self.not_food:
            data["not_food"] = self.not_food
        return BundleMeta.model_validate(data)


@contextmanager
def stage(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to `seconds[name]`."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - t0, 1)


def format_timings(seconds: dict[str, float], total: float | None = None) -> str:
    """The per-stage summary `train` ends with; `total` is the whole command's wall time."""
    rows = dict(seconds)
    if total is None:
        total = sum(rows.values())
    elif total - sum(rows.values()) >= 0.05:
        rows["other"] = total - sum(rows.values())  # start-up, imports, printing
    width = max(len("total"), *map(len, rows))
    lines = ["time per stage (wall clock):", f"{'stage':<{width}}  {'seconds':>8}  share"]
    lines += [f"{k:<{width}}  {v:>8.1f}  {100 * v / total:4.0f} %" for k, v in rows.items() if total]
    m, s = divmod(round(total), 60)
    return "\n".join([*lines, f"{'total':<{width}}  {total:>8.1f}  ({m} min {s:02d} s)"])


def finalize(run: str | Path | Fitted, models_dir: str | Path | None = "models", name: str = "food",
             int8: bool | None = None, seconds: dict[str, float] | None = None,
             cascade: bool = True) -> tuple[Path, dict]:
    """Export a fitted run (in memory, or read back from its dir), measure it on every tier,
    calibrate it, add the int8 variant, publish it: to `models_dir/name/version`, or with no
    models dir to `<run>/bundle` (replaced). Returns the bundle dir and the per-tier metrics.
    Each stage's wall time is added to `seconds` (earlier stages, e.g. fit, may be in it already)
    and the whole dict written to the run's timings.json. The abstention rule is the run's TrainConfig's."""
    r = Run(run if isinstance(run, Fitted) else load_fitted(run), seconds=seconds if seconds is not None else {})
    rows = read_manifest(r.fitted.meta.manifest)
    rule = AbstentionRule.of(r.fitted.meta.config)
    with stage(r.seconds, "export"):
        r.exported = export_model(r.fitted, name)
    with stage(r.seconds, "evaluate"):
        r.scores = evaluate_bundle(r.exported, rows, known=r.fitted.head_logits)
        runs.write_scores(r.dir, r.scores)
    with stage(r.seconds, "calibrate"):
        # temperature + abstention threshold fitted on out-of-fold (else validation) logits; metrics with T
        r.calibrated = calibrate(r.scores, r.fitted.oof, r.fitted.meta.fit_tiers, name, r.exported.meta.version,
                                 rule=rule)
        runs.write_json(r.dir, runs.METRICS, r.calibrated.metrics)
        runs.write_json(r.dir, runs.CALIBRATION, r.calibrated.detail)
    oof = r.fitted.oof
    if cascade and oof is not None and oof.members is not None:  # an ensemble's head: stages that stop early
        from food_classifier.training.cascade import build_cascade

        with stage(r.seconds, "cascade"):
            r.cascade, r.not_food = build_cascade(r.fitted, r.exported, rows, rule)
            runs.write_json(r.dir, "cascade.json", {"cascade": r.cascade, "not_food": r.not_food})
    # int8 (None = auto): a cascade is what gets served, so its whole-graph int8 is made only when asked
    if int8 or (int8 is None and r.cascade is None):  # quantized variant, measured against fp32 on test
        from food_classifier.training.quantize import try_int8

        with stage(r.seconds, "int8"):
            r.int8 = try_int8(r.exported, rows)
    with stage(r.seconds, "publish"):
        meta = r.final_meta()
        listed = list(meta.variants.values()) + (meta.cascade.files() if meta.cascade else [])
        files = {v.file: r.dir / v.file for v in listed}
        target = Path(models_dir) / name / meta.version if models_dir else r.dir / runs.BUNDLE_DIR
        r.bundle = publish(meta, files, target, move=True, replace=not models_dir)
        runs.write_bundle_path(r.dir, r.bundle)
    runs.write_json(r.dir, runs.TIMES, r.seconds)
    return r.bundle, r.calibrated.metrics


def train_and_publish(manifest: str | Path, config: TrainConfig, runs_dir: str | Path = "runs",
                      models_dir: str | Path | None = "models", name: str = "food",
                      resume: str | Path | None = None, int8: bool | None = None,
                      seconds: dict[str, float] | None = None, cascade: bool = True) -> tuple[Path, Path, dict]:
    """Fit, then `finalize`; `seconds` (stage -> wall time) gets "fit" and the later stages."""
    seconds = seconds if seconds is not None else {}
    with stage(seconds, "fit"):
        fitted = fit_run(manifest, config, runs_dir=runs_dir, resume=resume)
    published, metrics = finalize(fitted, models_dir=models_dir, name=name, int8=int8, seconds=seconds, cascade=cascade)
    return fitted.dir, published, metrics
