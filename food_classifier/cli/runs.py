"""`food-classifier evaluate | report | export`: commands on a finished run dir (training imported inside)."""

from __future__ import annotations

from pathlib import Path

import typer

from food_classifier.cli.common import fail, need_training_extras
from food_classifier.defaults import MODEL_NAME, MODELS_DIR


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
           models_dir: Path = typer.Option(MODELS_DIR), name: str = typer.Option(MODEL_NAME),
           int8: bool | None = typer.Option(None, "--int8/--no-int8", show_default="auto",
                                            help="Also add the quantized int8 variant (auto: unless the bundle "
                                                 "is a cascade).")) -> None:
    """Re-export a run to a new bundle version. Exports the run's best checkpoint, evaluates and
    publishes it."""
    need_training_extras()
    from food_classifier.training import runs
    from food_classifier.training.pipeline import finalize

    if not runs.is_run(run):
        fail(f"{run} is not a run dir (no {runs.CONFIG})")
    bundle, _ = finalize(run, models_dir=models_dir, name=name, int8=int8)
    typer.echo(bundle)
