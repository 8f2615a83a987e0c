"""`food-classifier predict | builtin | monitor`: models at work, no torch needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import typer

from food_classifier.answer import AUTO
from food_classifier.cli.common import fail
from food_classifier.defaults import MODEL_DIR


def predict(images: list[Path] = typer.Argument(..., help="Image files.", metavar="IMAGE..."),
            model: Path = typer.Option(MODEL_DIR,
                                       help="Bundle dir or model dir (its promoted, else newest version)."),
            top_k: int = typer.Option(3), threads: int = typer.Option(0),
            variant: str = typer.Option(AUTO, help="auto (the bundle's recommended one, as `serve`), cascade, fp32 "
                                                   "or int8."),
            as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """Classify images with a bundle (no torch needed). Uses ONNX Runtime; exits 1 when any image could
    not be read (the others are still classified)."""
    from food_classifier.inference import Classifier
    from food_classifier.preprocessing import ImageError

    clf = Classifier(model, threads=threads or None, top_k=top_k, variant=variant)
    failed = 0
    for path in images:
        try:
            p = clf.predict(path)
        except ImageError as e:
            typer.secho(f"{path}: error: {e}", fg=typer.colors.RED, err=True)
            failed += 1
            continue
        if as_json:  # UTF-8 bytes whatever the terminal's encoding: JSON is UTF-8 (RFC 8259)
            line = json.dumps({"image": str(path), **p.to_dict()}, ensure_ascii=False)
            typer.echo(line.encode("utf-8", "surrogateescape"))
        else:
            alts = ", ".join(f"{t.label} {t.probability:.3f}" for t in p.top_k)
            typer.echo(f"{path}: {p.label} ({p.confidence:.3f})  [{alts}]")
    if failed:
        typer.secho(f"{failed} of {len(images)} image(s) could not be read", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def monitor(log_dir: Path = typer.Argument(..., help="A `serve --prediction-log` dir."),
            model: Path | None = typer.Option(None, help="Model dir or bundle: drift against its versions' "
                                                         "reference statistics."),
            window: str = typer.Option("auto", help="Time window: 30s, 15m, 1h, 1d, or auto (at most 12)."),
            out: Path | None = typer.Option(None, help="HTML page to write (default LOG_DIR/report.html).")) -> None:
    """Report on a prediction log, offline. Drift per time window, abstention, estimated vs feedback
    accuracy."""
    from food_classifier.monitoring.report import ReportError, build_report

    try:
        table, html = build_report(log_dir, model, window, out)
    except ReportError as e:
        fail(str(e))
    typer.echo(f"{table}\nreport: {html}")


def builtin_cmd(labels: bool = typer.Option(False, "--labels", help="Also list its classes.")) -> None:
    """Print the built-in food model's path. It is what `serve` uses without a bundle; built first if it
    is not cached (~30 s, needs the training extras, downloads nothing)."""
    from food_classifier.builtin import FOOD_CLASSES, builtin_bundle_path

    typer.echo(builtin_bundle_path())
    if labels:
        for index, label in FOOD_CLASSES:
            typer.echo(f"{index:>4}  {label}")


def predict_dir_cmd(
        source: Path = typer.Argument(..., help="A folder (searched recursively for images; subfolders = classes), "
                                                "a manifest CSV (a 'path' column, optional 'label') or a text file "
                                                "of paths."),
        model: Path = typer.Option(MODEL_DIR, help="Bundle dir or model dir (newest version)."),
        out: Path = typer.Option(..., help="Results file; a rerun resumes it (skips images already scored by "
                                           "this model version)."),
        engine: Literal["local", "ray"] = typer.Option(
            "local", help="local: this process; ray: a Ray Data actor pool (the 'ray' extra)."),
        ray_address: str | None = typer.Option(None, help="With --engine ray: auto (the Ray that `ray start` runs "
                                                          "here) or ray://HOST:10001; default: a local Ray."),
        batch_size: int = typer.Option(64, min=1, help="Images per written batch (what a killed job can lose); "
                                                        "the model runs them in calls of at most 4 images."),
        fmt: Literal["parquet", "jsonl"] | None = typer.Option(
            None, "--format", help="Default: jsonl for an --out ending in .jsonl, else parquet."),
        variant: str = typer.Option(AUTO, help="auto (the bundle's recommended one, as `serve` and `predict`), "
                                               "cascade, fp32 or int8."),
        threads: int = typer.Option(0, min=0, help="Local engine: decode and ONNX Runtime threads (0 = all "
                                                   "usable CPUs, at most 4).")) -> None:
    """Score a folder of photos into a results file.

    Every image of a folder, manifest or path list becomes one row of a Parquet or JSONL file."""
    from food_classifier.batch.job import BatchError, local_engine, predict_dir
    from food_classifier.bundle import BundleError
    from food_classifier.ray_env import RayError

    if engine == "ray":
        from food_classifier.batch.ray_engine import RayEngine

        runner = RayEngine(ray_address, variant=variant)
    else:
        runner = local_engine(threads or None, variant=variant)
    try:
        summary = predict_dir(source, model, out, fmt, batch_size, runner)
    except (BatchError, BundleError, RayError) as e:  # here, not in main(): its check imports torch
        fail(str(e))
    if summary.accuracy:
        typer.echo(summary.accuracy)
    typer.echo(summary.text())
