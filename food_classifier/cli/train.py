"""`food-classifier train | evaluate | report | export`: the training side (torch imported inside)."""

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


def evaluate(run: Path = typer.Argument(..., help="A run dir (uses its bundle) or a bundle dir."),
             manifest: Path | None = typer.Option(None, help="Defaults to the run's manifest.")) -> None:
    """Score a bundle per tier. Accuracy, macro P/R/F1, per-class table and confusion matrix of the
    exported bundle."""
    from food_classifier.training import runs
    from food_classifier.training.evaluate import format_table, score

    if not runs.is_run(run):  # a bundle or model dir
        if manifest is None:
            fail(f"{run} is not a run dir; pass --manifest")
        typer.echo(format_table(score(run, manifest)))
        return
    bundle = runs.bundle_dir(run)
    if bundle is None:
        fail(f"{run} has no bundle; run `food-classifier export {run}` first")
    metrics = score(bundle, manifest or runs.read_meta(run).manifest, out_dir=run)
    typer.echo(format_table(metrics))


def report(run: Path = typer.Argument(..., help="A run dir from `train` (uses its logits.npz, bundle, history)."),
           out: Path | None = typer.Option(None, help="Output folder (default RUN/report).")) -> None:
    """Write a run's HTML report. One self-contained file (images embedded) plus its PNGs."""
    try:
        from food_classifier.training.report import build_report
        from food_classifier.training.runs import LOGITS
    except ImportError as e:
        fail(f"the report needs the training extras (pip install 'food-classifier[train]'): {e}")
    if not (run / LOGITS).is_file():
        fail(f"{run} has no {LOGITS}; run `food-classifier evaluate {run}` first")
    typer.echo(build_report(run, out))


def export(run: Path = typer.Argument(..., help="A run dir from `train`."),
           models_dir: Path = typer.Option(Path("models")), name: str = typer.Option("food"),
           int8: bool = typer.Option(True, "--int8/--no-int8", help="Also add the quantized int8 variant.")) -> None:
    """Re-export a run to a new bundle version. Exports the run's best checkpoint, evaluates and
    publishes it."""
    need_training_extras()
    from food_classifier.training import runs
    from food_classifier.training.pipeline import finalize

    if not runs.is_run(run):
        fail(f"{run} is not a run dir (no {runs.CONFIG})")
    bundle, _ = finalize(run, models_dir=models_dir, name=name, int8=int8)
    typer.echo(bundle)
