"""`food-classifier data ...`: find, download and split a photo folder into a manifest. Imports the
training side's sources module, so the group loads it only when `data` is asked for."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from food_classifier.cli.common import fail
from food_classifier.training.sources import DEFAULT_SOURCE

data_app = typer.Typer(help="Get and split datasets.", no_args_is_help=True, rich_markup_mode=None)

LOCAL_DATA_HINT = ("hint: no internet? Train on a folder of your own photos (one subfolder per class): "
                   "`make demo DATA=~/my_photos`, or `FOOD_CLASSIFIER_DATA=~/my_photos food-classifier data prepare`"
                   " (README: Your photos)")


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
    """Download and extract a dataset archive. Resumable, sha256-checked, safe extraction; prints the
    image folder."""
    from food_classifier.training.download import fetch

    typer.echo(fetch(source, dest, sha256=sha256))


@data_app.command("split")
def data_split(root: Path = typer.Argument(..., help="ImageFolder (one folder per class) or train/test layout."),
               manifest: Path = typer.Option(Path("data/manifest.csv"), help="Manifest CSV to write."),
               ratios: str = typer.Option("0.7,0.15,0.15", help="train,validation,test fractions."),
               seed: int = typer.Option(42),
               fresh: bool = typer.Option(False, "--fresh",
                                          help="Ignore the manifest being replaced: re-split every photo (by "
                                               "default photos already in it keep their tier).")) -> None:
    """Split a photo folder into train/validation/test. Validates images, groups duplicates, writes the
    manifest, prints what it skipped, grouped and moved. Re-splitting a grown folder onto the same
    manifest keeps every known photo in its tier (a test photo stays in test)."""
    split_and_report(root, manifest, ratios, seed, keep_tiers=not fresh)


def split_and_report(root: Path, manifest: Path, ratios: str = "0.7,0.15,0.15", seed: int = 42,
                     keep_tiers: bool = True) -> list:
    """`data split`, also for `data prepare` and `train --data`: the counts per class and tier, then the
    first rejected files, duplicate groups and moved photos with their reasons (all in the report)."""
    from food_classifier.training.data import count_table, find_image_root, format_report, report_path, split
    from food_classifier.training.sources import DataError

    try:
        r = tuple(float(x) for x in ratios.split(","))
    except ValueError:
        raise DataError(f"--ratios must be three numbers like 0.7,0.15,0.15, got '{ratios}'") from None
    image_root = find_image_root(root)
    rows = split(image_root, manifest, ratios=r, seed=seed, keep_tiers=keep_tiers)
    report = json.loads(report_path(manifest).read_text())
    typer.echo(count_table(rows))
    details = format_report(report, image_root)
    if details:
        typer.echo(details)
    kept = report.get("previous_manifest") or {}
    if kept.get("kept_tier"):
        typer.echo(f"previous manifest: {kept['kept_tier']:,} photos kept their tier, {kept['new']:,} new "
                   "(test photos stay in test across retrains; `data split --fresh` re-splits)")
    typer.echo(f"manifest: {manifest} ({len(rows)} images; {len(report['rejected'])} rejected, "
               f"{len(report['duplicate_groups'])} duplicate groups, {len(report['moved'])} moved — "
               f"details in {report_path(manifest)})")
    return rows


@data_app.command("prepare")
def data_prepare(manifest: Path = typer.Option(Path("data/manifest.csv")), seed: int = typer.Option(42),
                 source: str = typer.Option(DEFAULT_SOURCE, help="Remote source when no local folder.")) -> None:
    """Split $FOOD_CLASSIFIER_DATA, or download a dataset first. Uses the local folder when the variable
    is set, else downloads SOURCE; then splits it like `data split`."""
    from food_classifier.training.download import fetch
    from food_classifier.training.sources import DataError

    local = os.environ.get("FOOD_CLASSIFIER_DATA")
    try:
        root = Path(local).expanduser() if local else fetch(source, manifest.parent / "raw")
    except DataError as e:  # offline, most likely: say how to use the photos the user has
        fail(f"{e}\n{LOCAL_DATA_HINT}")
    typer.echo(f"dataset: {root}")
    split_and_report(root, manifest, seed=seed)
