"""The whole training side in order, in memory: fit -> export -> evaluate -> calibrate -> quantize
-> publish.

One `Run` carries each stage's typed result to the next; no stage re-reads what another wrote.
The run dir keeps the record (runs.py) for `evaluate RUN`, `report RUN`, `export RUN`, `--resume`;
the bundle is written once, at the end, with the metrics measured on that very graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from food_classifier.bundle import Bundle, BundleMeta
from food_classifier.training import runs
from food_classifier.training.calibrate import Calibrated, calibrate
from food_classifier.training.config import DEFAULT_TARGET_PRECISION, TrainConfig
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
    int8: dict | None = None             # the measured int8 variant, if it was made (quantize)
    bundle: Path | None = None           # where it was published (publish)

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
        return BundleMeta.model_validate(data)


def finalize(run: str | Path | Fitted, models_dir: str | Path | None = "models", name: str = "food",
             target_precision: float = DEFAULT_TARGET_PRECISION, int8: bool = True) -> tuple[Path, dict]:
    """Export a fitted run (in memory, or read back from its dir), measure it on every tier,
    calibrate it, add the int8 variant, publish it: to `models_dir/name/version`, or with no
    models dir to `<run>/bundle` (replaced). Returns the bundle dir and the per-tier metrics."""
    r = Run(run if isinstance(run, Fitted) else load_fitted(run))
    rows = read_manifest(r.fitted.meta.manifest)
    r.exported = export_model(r.fitted, name)
    r.scores = evaluate_bundle(r.exported, rows, known=r.fitted.head_logits)
    runs.write_scores(r.dir, r.scores)
    # temperature + abstention threshold fitted on out-of-fold (else validation) logits; metrics with T
    r.calibrated = calibrate(r.scores, r.fitted.oof, r.fitted.meta.fit_tiers, name, r.exported.meta.version,
                             target_precision=target_precision)
    runs.write_json(r.dir, runs.METRICS, r.calibrated.metrics)
    runs.write_json(r.dir, runs.CALIBRATION, r.calibrated.detail)
    if int8:  # quantized variant, measured against fp32 on the test tier
        from food_classifier.training.quantize import try_int8

        r.int8 = try_int8(r.exported, rows)
    meta = r.final_meta()
    files = {v.file: r.dir / v.file for v in meta.variants.values()}
    target = Path(models_dir) / name / meta.version if models_dir else r.dir / runs.BUNDLE_DIR
    r.bundle = publish(meta, files, target, move=True, replace=not models_dir)
    runs.write_bundle_path(r.dir, r.bundle)
    return r.bundle, r.calibrated.metrics


def train_and_publish(manifest: str | Path, config: TrainConfig, runs_dir: str | Path = "runs",
                      models_dir: str | Path | None = "models", name: str = "food",
                      resume: str | Path | None = None,
                      target_precision: float = DEFAULT_TARGET_PRECISION,
                      int8: bool = True) -> tuple[Path, Path, dict]:
    fitted = fit_run(manifest, config, runs_dir=runs_dir, resume=resume)
    published, metrics = finalize(fitted, models_dir=models_dir, name=name, target_precision=target_precision,
                                  int8=int8)
    return fitted.dir, published, metrics
