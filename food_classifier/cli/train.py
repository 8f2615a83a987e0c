"""`food-classifier train`: its options come from TrainConfig, so this module imports training.config
(no torch); the group loads it only when `train` is asked for, so `serve` never imports the training side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from food_classifier.cli.common import fail, need_training_extras
from food_classifier.training.config import DEFAULT_TARGET_PRECISION, TrainConfig
from food_classifier.training.config import option as config_option


def _train_option(field: str, *decls: str, **kw) -> Any:
    """A `train` option whose default and help come from TrainConfig (declared there, once)."""
    default, help_text = config_option(field)
    return typer.Option(default, *decls, help=help_text, **kw)


def train(manifest: Path = typer.Option(Path("data/manifest.csv"), help="From `data split`."),
          arch: str = _train_option("arch"),
          weights: Path | None = _train_option("weights"),
          epochs: int = _train_option("epochs"),
          lr: float = _train_option("lr"),
          batch_size: int = _train_option("batch_size"),
          fine_tune: bool = _train_option("fine_tune", "--fine-tune"),
          aug_views: int = _train_option("aug_views"),
          image_size: int = _train_option("image_size"),
          refit: bool = _train_option("refit", "--refit/--no-refit"),
          label_smoothing: float = _train_option("label_smoothing"),
          patience: int = _train_option("patience"),
          seed: int = _train_option("seed"),
          runs_dir: Path = typer.Option(Path("runs")),
          models_dir: Path = typer.Option(Path("models"), help="Bundles are published to MODELS_DIR/NAME/VERSION."),
          name: str = typer.Option("food", help="Model name in the bundle and the server."),
          resume: Path | None = typer.Option(None, help="Continue an interrupted run dir."),
          target_precision: float = typer.Option(
              DEFAULT_TARGET_PRECISION, min=0.0, max=1.0,
              help="Abstention: lowest threshold whose kept validation predictions reach this precision."),
          cv: int = typer.Option(0, "--cv", min=0, metavar="K",
                                 help="Also retrain on K folds of train+validation (test untouched) and report "
                                      "accuracy / macro-F1 mean ± std; writes RUN/cv.json."),
          int8: bool = typer.Option(True, "--int8/--no-int8",
                                    help="Also add a quantized int8 variant (~20 s), with its test accuracy and "
                                         "speed vs fp32 in bundle.json.")) -> None:
    """Train a model and publish its bundle. Fits, exports the ONNX bundle, evaluates it per tier,
    calibrates it and publishes it to MODELS_DIR/NAME/VERSION."""
    need_training_extras()
    if cv == 1:
        fail("--cv needs K >= 2 folds (0 = off)")
    from food_classifier.training import runs
    from food_classifier.training.calibrate import format_calibration
    from food_classifier.training.evaluate import format_table
    from food_classifier.training.pipeline import train_and_publish

    if resume:
        if not runs.is_run(resume):
            fail(f"{resume} is not a run dir (no {runs.CONFIG})")
        saved = runs.read_meta(resume)
        config, manifest = saved.config, Path(saved.manifest)
    else:
        config = TrainConfig(arch=arch, weights=str(weights) if weights else None, epochs=epochs, lr=lr,
                             batch_size=batch_size, fine_tune=fine_tune, aug_views=aug_views, refit=refit,
                             label_smoothing=label_smoothing, patience=patience, seed=seed,
                             image_size=image_size)
    run, bundle, metrics = train_and_publish(manifest, config, runs_dir, models_dir, name, resume=resume,
                                             target_precision=target_precision, int8=int8)
    typer.echo(format_table(metrics))
    typer.echo(format_calibration(run))
    if cv:
        from food_classifier.training.cv import cross_validate, format_cv

        typer.echo(format_cv(cross_validate(manifest, config, k=cv, out_dir=run)))
    typer.echo(f"run: {run}\nbundle: {bundle}")
