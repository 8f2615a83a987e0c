"""The whole training side in order: fit -> export -> evaluate -> publish.

Each step is also a CLI command of its own; this module only chains them so `train` leaves a
served-ready bundle whose bundle.json already holds the metrics measured on that very bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from food_classifier.bundle import update_meta
from food_classifier.training.calibrate import DEFAULT_TARGET_PRECISION, calibrate_run
from food_classifier.training.evaluate import score, summary
from food_classifier.training.export import export, publish
from food_classifier.training.train import TrainConfig, fit


def finalize(run: str | Path, models_dir: str | Path | None = "models", name: str = "food",
             target_precision: float = DEFAULT_TARGET_PRECISION, int8: bool = True) -> tuple[Path, dict]:
    """Export the run's best checkpoint, measure the bundle on every tier, publish it."""
    run = Path(run)
    meta = json.loads((run / "config.json").read_text())
    bundle = export(run, name=name)
    head = run / "head_logits.npz"  # the fitted tiers' logits, left by the head path
    known = None
    if head.is_file():
        with np.load(head) as h:
            known = dict(zip(h["path"].tolist(), h["logits"], strict=True))
    metrics = score(bundle, meta["manifest"], out_dir=run, known=known)
    # temperature + abstention threshold fitted on out-of-fold (else validation) logits; metrics recomputed with T
    metrics = calibrate_run(run, bundle, target_precision=target_precision)
    update_meta(bundle, {"metrics": summary(metrics)})
    if int8:  # quantized variant, measured against fp32 on the test tier, stored in bundle.json
        from food_classifier.training.quantize import int8_step

        int8_step(bundle, meta["manifest"])
    published = publish(bundle, models_dir) if models_dir else bundle
    (run / "bundle_path.txt").write_text(str(Path(published).resolve()) + "\n")
    return published, metrics


def train_and_publish(manifest: str | Path, config: TrainConfig, runs_dir: str | Path = "runs",
                      models_dir: str | Path | None = "models", name: str = "food",
                      resume: str | Path | None = None,
                      target_precision: float = DEFAULT_TARGET_PRECISION,
                      int8: bool = True) -> tuple[Path, Path, dict]:
    run = fit(manifest, config, runs_dir=runs_dir, resume=resume)
    published, metrics = finalize(run, models_dir=models_dir, name=name, target_precision=target_precision,
                                  int8=int8)
    return run, published, metrics
