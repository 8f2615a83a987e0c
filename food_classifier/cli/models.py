"""`food-classifier models ...`: architectures and published versions. A thin layer over versions.py."""

from __future__ import annotations

from pathlib import Path

import typer

from food_classifier.defaults import MODELS_DIR as DEFAULT_MODELS_DIR

MODELS_DIR = typer.Option(DEFAULT_MODELS_DIR, "--models-dir", help="Holds one dir per model: MODELS_DIR/NAME/VERSION.")
models_app = typer.Typer(help="Published model versions and architectures. list, promote, rm, gc, archs.",
                         no_args_is_help=True, rich_markup_mode=None)


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@models_app.command("archs")
def archs() -> None:
    """List the architectures for `train --arch`. Any timm architecture works too."""
    from food_classifier.training.config import DEFAULT_ARCH

    try:
        from food_classifier.training.models import list_models
    except ImportError:
        typer.secho("error: this command needs the training extras: pip install 'food-classifier[train]'",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    for name, desc in list_models().items():
        typer.echo(f"{name:<20} {desc}")
    typer.echo(f"{'a+b':<20} ensemble of pretrained backbones: one input, one linear head per member, "
               f"logits averaged (default: {DEFAULT_ARCH})")


@models_app.command("list")
def list_cmd(models_dir: Path = MODELS_DIR) -> None:
    """List every version of every model, newest first. Marks the version `serve` loads."""
    from food_classifier.versions import list_versions, model_dirs

    dirs = model_dirs(models_dir)
    if not dirs:
        typer.echo(f"no models in {models_dir} yet: `food-classifier train` publishes there")
    for d in dirs:
        infos = list_versions(d)
        served = next((i.version for i in infos if i.served), None)
        total = sum(i.size_bytes for i in infos)
        typer.echo(f"{d.name}  ({d}: {len(infos)} version(s), {megabytes(total)})"
                   + ("" if served else "  no version loads: `serve` would fail"))
        for i in infos:
            marks = [m for m, on in (("served", i.served), ("promoted", i.promoted)) if on]
            typer.echo(f"  {i.version}" + (f"  [{', '.join(marks)}]" if marks else ""))
            if i.error:
                typer.echo(f"      broken: {i.error}")
                continue
            meta = i.meta
            assert meta is not None
            facts = [(meta.created_at or "?")[:16].replace("T", " ")]
            if i.test_accuracy is not None:
                facts.append(f"test {i.test_accuracy:.3f}")
            facts.append("variants " + ",".join(sorted(meta.variants)) + f" (serves {meta.recommended_variant()})")
            facts.append(megabytes(i.size_bytes))
            typer.echo("      " + " · ".join(facts))


DATA_OPTION = typer.Option(None, "--data", metavar="DIR",
                           help="Also score labelled photos in DIR/<class>/ (the label page's folder); photos "
                                "the manifest puts in train or validation are left out.")
MARGIN_OPTION = typer.Option(0.02, "--margin", min=0.0, max=1.0,
                             help="Largest accuracy drop (a fraction) tolerated when it is not significant.")


@models_app.command("compare", short_help="Champion vs challenger on the same labelled photos.")
def compare_cmd(name: str = typer.Argument(..., help="Model name (a dir in --models-dir)."),
                a: str | None = typer.Argument(None, help="Champion version (default: the promoted one, else the "
                                                          "newest before B)."),
                b: str | None = typer.Argument(None, help="Challenger version (default: the newest)."),
                data: Path | None = DATA_OPTION, margin: float = MARGIN_OPTION,
                models_dir: Path = MODELS_DIR) -> None:
    """Score two versions on the same labelled photos: the test tier of the manifest the newer one was trained
    on, plus --data. Prints each one's accuracy, the paired difference with a bootstrap 95 % interval,
    McNemar's exact p-value, per-class deltas, and coverage/accuracy at each one's threshold."""
    from food_classifier.compare import compare_versions, format_comparison, verdict

    c = compare_versions(models_dir, name, a, b, data)
    typer.echo(format_comparison(c))
    typer.echo("\n" + verdict(c, margin)[1])


@models_app.command("promote")
def promote_cmd(name: str = typer.Argument(..., help="Model name (a dir in --models-dir)."),
                version: str = typer.Argument(..., help="Version dir name, from `models list`."),
                if_better: bool = typer.Option(False, "--if-better",
                                               help="Promote only if VERSION is not worse than the version it "
                                                    "replaces (the promoted one, else the newest before it) on the "
                                                    "same labelled photos (`models compare`)."),
                data: Path | None = DATA_OPTION, margin: float = MARGIN_OPTION,
                models_dir: Path = MODELS_DIR) -> None:
    """Serve VERSION of NAME from now on, over newer versions. New servers, reloads and `Classifier`
    load it until another is promoted or `models unpromote` clears it."""
    from food_classifier.versions import model_dir, promote

    if if_better:
        from food_classifier.bundle import promoted_version
        from food_classifier.compare import champion, compare_versions, format_comparison, verdict

        current = champion(model_dir(models_dir, name), version)
        if promoted_version(model_dir(models_dir, name)) == version:
            typer.echo(f"{name} {version} is promoted already")
            return
        if current is None:
            typer.echo(f"{name} has no other version: nothing to compare {version} with")
        else:
            c = compare_versions(models_dir, name, current, version, data)
            typer.echo(format_comparison(c) + "\n")
            ok, why = verdict(c, margin)
            if not ok:
                typer.secho(f"not promoted: {why}", fg=typer.colors.RED, err=True)
                raise typer.Exit(1)
            typer.echo(why)
    path = promote(models_dir, name, version)
    typer.echo(f"promoted {name} {version} ({path}); a running server takes it on reload (SIGHUP, or "
               f"`POST /v1/models/{name}/reload` with the admin key) or restart")


@models_app.command("unpromote")
def unpromote_cmd(name: str = typer.Argument(..., help="Model name."), models_dir: Path = MODELS_DIR) -> None:
    """Clear the promotion: the newest valid version is served again."""
    from food_classifier.versions import unpromote

    was = unpromote(models_dir, name)
    typer.echo(f"{name}: {'unpromoted ' + was if was else 'nothing was promoted'}; serve loads the newest "
               "valid version")


@models_app.command("rm")
def rm_cmd(name: str = typer.Argument(..., help="Model name."),
           version: str = typer.Argument(..., help="Version dir name, from `models list`."),
           models_dir: Path = MODELS_DIR) -> None:
    """Delete one version (refused for the promoted one)."""
    from food_classifier.versions import remove

    freed = remove(models_dir, name, version)
    typer.echo(f"removed {name} {version} ({megabytes(freed)} freed)")


@models_app.command("gc")
def gc_cmd(keep: int = typer.Option(3, "--keep", min=0, metavar="N", help="Newest versions to keep per model."),
           models_dir: Path = MODELS_DIR,
           runs_dir: Path = typer.Option(Path("runs"), help="Training runs; a run whose bundle is gone is removed."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Only print what would be removed.")) -> None:
    """Delete old versions and their runs. Always kept: the N newest, the promoted and the served
    version of each model (a server started earlier keeps its version in memory until reloaded).
    Also removes temporaries of crashed publishes."""
    from food_classifier.versions import gc

    result = gc(models_dir, keep, runs_dir=runs_dir, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for p in result.removed_versions + result.removed_runs:
        typer.echo(f"{verb} {p}")
    for model, kept in result.kept.items():
        typer.echo(f"{model}: kept {', '.join(kept) or 'nothing'}")
    typer.echo(f"{verb} {len(result.removed_versions)} version(s) and {len(result.removed_runs)} run(s): "
               f"{megabytes(result.freed_bytes)}")
