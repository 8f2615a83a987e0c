"""`food-classifier` command line. Thin: every command calls one plain function.

Heavy imports (torch, onnxruntime, fastapi) happen inside commands so `--help` is instant and the
serving install works without the training extras.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from food_classifier.training.config import DEFAULT_TARGET_PRECISION, TrainConfig
from food_classifier.training.config import option as config_option
from food_classifier.training.deploy_cli import export_mobile_cmd, import_onnx_cmd
from food_classifier.training.sources import DEFAULT_SOURCE


class _Commands(typer.core.TyperGroup):
    """Adds `serve` when it is asked for: its options are built from ServeSettings (pydantic-settings
    takes ~0.3 s to import), so `train`, `predict`... do not pay for it. Absent without the serve extra."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        names = super().list_commands(ctx)
        return names if "serve" in names else [*names, "serve"]

    def get_command(self, ctx: typer.Context, name: str):  # -> the click command, or None
        if name == "serve" and name not in self.commands:
            try:
                from food_classifier.serving.cli import serve_command

                self.add_command(serve_command(name), name)
            except ImportError:  # serving extras not installed
                return None
        return super().get_command(ctx, name)


app = typer.Typer(help="Train food-photo classifiers on a CPU and serve them over HTTP.", cls=_Commands,
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Get and split datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the user gave us something wrong': shown as one line, no traceback."""
    from food_classifier.bundle import BundleError
    from food_classifier.preprocessing import ImageError

    errors: list[type[BaseException]] = [BundleError, ImageError, FileNotFoundError]
    try:
        from food_classifier.training.export import ExportError
        from food_classifier.training.models import ModelError
        from food_classifier.training.sources import DataError

        errors += [DataError, ModelError, ExportError]
    except ImportError:  # serving-only install
        pass
    return tuple(errors)


def need_training_extras() -> None:
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        fail("this command needs the training extras: pip install 'food-classifier[train]'")


# --- data -----------------------------------------------------------------------------------

@data_app.command("sources")
def data_sources() -> None:
    """List the named remote datasets."""
    from food_classifier.training.sources import SOURCES

    for name, s in SOURCES.items():
        typer.echo(f"{name}{' (default)' if name == DEFAULT_SOURCE else ''}: {s['description']}\n  {s['url']}")


@data_app.command("fetch")
def data_fetch(source: str = typer.Argument(DEFAULT_SOURCE, help="A name from `data sources`, or a URL."),
               dest: Path = typer.Option(Path("data/raw"), help="Where archives are downloaded and extracted."),
               sha256: str | None = typer.Option(None, help="Expected sha256 of the archive.")) -> None:
    """Download (resumable) and safely extract a dataset archive; prints the image folder."""
    from food_classifier.training.download import fetch

    typer.echo(fetch(source, dest, sha256=sha256))


@data_app.command("split")
def data_split(root: Path = typer.Argument(..., help="ImageFolder (one folder per class) or train/test layout."),
               manifest: Path = typer.Option(Path("data/manifest.csv"), help="Manifest CSV to write."),
               ratios: str = typer.Option("0.7,0.15,0.15", help="train,validation,test fractions."),
               seed: int = typer.Option(42)) -> None:
    """Validate images, group duplicates, split train/validation/test, write the manifest."""
    from food_classifier.training.data import count_table, find_image_root, split
    from food_classifier.training.sources import DataError

    try:
        r = tuple(float(x) for x in ratios.split(","))
    except ValueError:
        raise DataError(f"--ratios must be three numbers like 0.7,0.15,0.15, got '{ratios}'") from None
    rows = split(find_image_root(root), manifest, ratios=r, seed=seed)
    report = json.loads(manifest.with_name(manifest.stem + ".report.json").read_text())
    typer.echo(count_table(rows))
    typer.echo(f"manifest: {manifest} ({len(rows)} images; {len(report['rejected'])} rejected, "
               f"{len(report['duplicate_groups'])} duplicate groups — see {manifest.stem}.report.json)")


@data_app.command("prepare")
def data_prepare(manifest: Path = typer.Option(Path("data/manifest.csv")), seed: int = typer.Option(42),
                 source: str = typer.Option(DEFAULT_SOURCE, help="Remote source when no local folder.")) -> None:
    """Use $FOOD_CLASSIFIER_DATA (a local folder) when set, else download SOURCE; then split."""
    from food_classifier.training.download import fetch

    local = os.environ.get("FOOD_CLASSIFIER_DATA")
    root = Path(local) if local else fetch(source, manifest.parent / "raw")
    typer.echo(f"dataset: {root}")
    data_split(root, manifest=manifest, ratios="0.7,0.15,0.15", seed=seed)


# --- models, training, evaluation -----------------------------------------------------------

@app.command("models")
def models_cmd() -> None:
    """List the registered model names (any timm architecture works too)."""
    need_training_extras()
    from food_classifier.training.models import list_models

    for name, desc in list_models().items():
        typer.echo(f"{name:<20} {desc}")
    typer.echo(f"{'a+b':<20} ensemble of pretrained backbones: one input, one linear head per member, "
               f"logits averaged (default: {TrainConfig.arch})")


def _train_option(field: str, *decls: str, **kw) -> Any:
    """A `train` option whose default and help come from TrainConfig (declared there, once)."""
    default, help_text = config_option(field)
    return typer.Option(default, *decls, help=help_text, **kw)


@app.command()
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
    """Train, export the ONNX bundle, evaluate it per tier, calibrate it and publish it."""
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


@app.command()
def evaluate(run: Path = typer.Argument(..., help="A run dir (uses its bundle) or a bundle dir."),
             manifest: Path | None = typer.Option(None, help="Defaults to the run's manifest.")) -> None:
    """Per-tier accuracy, macro P/R/F1, per-class table and confusion matrix of the exported bundle."""
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


@app.command()
def report(run: Path = typer.Argument(..., help="A run dir from `train` (uses its logits.npz, bundle, history)."),
           out: Path | None = typer.Option(None, help="Output folder (default RUN/report).")) -> None:
    """Write one self-contained HTML evaluation report (images embedded) plus its PNGs."""
    try:
        from food_classifier.training.report import build_report
        from food_classifier.training.runs import LOGITS
    except ImportError as e:
        fail(f"the report needs the training extras (pip install 'food-classifier[train]'): {e}")
    if not (run / LOGITS).is_file():
        fail(f"{run} has no {LOGITS}; run `food-classifier evaluate {run}` first")
    typer.echo(build_report(run, out))


@app.command()
def export(run: Path = typer.Argument(..., help="A run dir from `train`."),
           models_dir: Path = typer.Option(Path("models")), name: str = typer.Option("food"),
           int8: bool = typer.Option(True, "--int8/--no-int8", help="Also add the quantized int8 variant.")) -> None:
    """Re-export a run's best checkpoint to a new bundle version, evaluate and publish it."""
    need_training_extras()
    from food_classifier.training import runs
    from food_classifier.training.pipeline import finalize

    if not runs.is_run(run):
        fail(f"{run} is not a run dir (no {runs.CONFIG})")
    bundle, _ = finalize(run, models_dir=models_dir, name=name, int8=int8)
    typer.echo(bundle)


@app.command()
def predict(images: list[Path] = typer.Argument(..., help="Image files."),
            model: Path = typer.Option(Path("models/food"), help="Bundle dir or model dir (newest version)."),
            top_k: int = typer.Option(3), threads: int = typer.Option(0),
            as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """Classify images with a bundle (ONNX Runtime; no torch needed)."""
    from food_classifier.inference import Classifier
    from food_classifier.preprocessing import ImageError

    clf = Classifier(model, threads=threads or None, top_k=top_k)
    for path in images:
        try:
            p = clf.predict(path)
        except ImageError as e:
            typer.secho(f"{path}: error: {e}", fg=typer.colors.RED, err=True)
            continue
        if as_json:
            typer.echo(json.dumps({"image": str(path), **p.to_dict()}))
        else:
            alts = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in p.top_k)
            typer.echo(f"{path}: {p.label} ({p.confidence:.3f})  [{alts}]")


@app.command()
def monitor(log_dir: Path = typer.Argument(..., help="A `serve --prediction-log` dir."),
            model: Path | None = typer.Option(None, help="Model dir or bundle: drift against its versions' "
                                                         "reference statistics."),
            window: str = typer.Option("auto", help="Time window: 30s, 15m, 1h, 1d, or auto (at most 12)."),
            out: Path | None = typer.Option(None, help="HTML page to write (default LOG_DIR/report.html).")) -> None:
    """Offline report over a prediction log: drift per time window, abstention, estimated vs feedback accuracy."""
    from food_classifier.monitor_report import ReportError, build_report

    try:
        table, html = build_report(log_dir, model, window, out)
    except ReportError as e:
        fail(str(e))
    typer.echo(f"{table}\nreport: {html}")


@app.command("builtin")
def builtin_cmd(labels: bool = typer.Option(False, "--labels", help="Also list its classes.")) -> None:
    """Print the path of the built-in ImageNet food model (what `serve` uses without a bundle),
    building it first if it is not cached (~30 s, needs the training extras, downloads nothing)."""
    from food_classifier.builtin import FOOD_CLASSES, builtin_bundle_path

    typer.echo(builtin_bundle_path())
    if labels:
        for index, label in FOOD_CLASSES:
            typer.echo(f"{index:>4}  {label}")


# --- deploy: bring your own ONNX, phone-ready export (training/deploy_cli.py) ----------------------
app.command("import-onnx")(import_onnx_cmd)
app.command("export-mobile")(export_mobile_cmd)


def _register_worker() -> None:
    try:
        from food_classifier.serving.worker_cli import worker
    except ImportError:
        return
    app.command("worker")(worker)


_register_worker()


def main() -> None:
    try:
        app()
    except Exception as e:  # SystemExit (e.g. --help) passes untouched, and never imports torch
        if not isinstance(e, user_errors()):
            raise
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
