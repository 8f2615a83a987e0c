"""`food-classifier train`: its options come from TrainConfig, so this module imports training.config
(no torch); the group loads it only when `train` is asked for, so `serve` never imports the training side."""

from __future__ import annotations

import inspect
import shlex
import time
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from food_classifier.cli.common import fail, need_training_extras
from food_classifier.defaults import MODEL_NAME, MODELS_DIR
from food_classifier.training.config import DEVICES, QUALITIES, TrainConfig, abstention_check
from food_classifier.training.config import options as config_options


def _config_params() -> list[inspect.Parameter]:
    """Every TrainConfig field that is a `train` option, as a keyword parameter: its default, help and flag come
    from the field (training/config.py), so adding a field there adds the option here."""
    hints = typing.get_type_hints(TrainConfig)
    params = []
    for name, default, help_text, cli in config_options():
        flag = cli.pop("flag", None)
        info = typer.Option(default, *([flag] if flag else []), help=help_text, **cli)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=hints[name]))
    return params


def train(data: Path | None = typer.Option(None, "--data", metavar="FOLDER",
                                          help="Your photos (one folder per class, or train/ and test/): split "
                                               "them into --manifest first, as `data split` does."),
          manifest: Path = typer.Option(Path("data/manifest.csv"), help="From `data split` (written by --data)."),
          runs_dir: Path = typer.Option(Path("runs")),
          models_dir: Path = typer.Option(MODELS_DIR, help="Bundles are published to MODELS_DIR/NAME/VERSION."),
          name: str = typer.Option(MODEL_NAME, help="Model name in the bundle and the server."),
          resume: Path | None = typer.Option(None, help="Continue an interrupted run dir."),
          cv: int = typer.Option(0, "--cv", min=0, metavar="K",
                                 help="Also retrain on K folds of train+validation (test untouched) and report "
                                      "accuracy / macro-F1 mean ± std; writes RUN/cv.json."),
          int8: bool | None = typer.Option(None, "--int8/--no-int8", show_default="auto",
                                           help="Also add a quantized int8 variant of the whole graph (~1 min), "
                                                "with its test accuracy and speed vs fp32 in bundle.json; auto: "
                                                "yes, unless the bundle is a cascade (served instead)."),
          cascade: bool = typer.Option(True, "--cascade/--no-cascade",
                                       help="An ensemble also becomes a cascade (served by default): its first "
                                            "backbone answers the photos it is sure of, the rest go on."),
          **options: Any) -> None:
    """Train a model and publish its bundle. Fits, exports the ONNX bundle, evaluates it per tier,
    calibrates it and publishes it to MODELS_DIR/NAME/VERSION; ends with the time per stage and the
    command that serves it."""
    started = time.monotonic()
    quality, device = options["quality"], options["device"]
    target_precision, target_coverage = options["target_precision"], options["target_coverage"]
    need_training_extras()
    if cv == 1:
        fail("--cv needs K >= 2 folds (0 = off)")
    if quality not in QUALITIES:
        fail(f"--quality {quality}: choose one of {', '.join(QUALITIES)}")
    if device not in DEVICES:
        fail(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda: PyTorch sees no CUDA GPU here; use --device auto (a GPU when there is one) or cpu")
    if data and resume:
        fail("--data starts a new run; --resume continues one on its own manifest: pass one of them")
    if options["unlabeled"] and not Path(options["unlabeled"]).is_dir():
        fail(f"--unlabeled {options['unlabeled']}: no such folder (a folder of photos without labels, any layout)")
    if options["unlabeled"] and quality == "best":
        fail("--unlabeled self-trains the linear heads of --quality fast; --quality best tunes the backbones "
             "on labelled photos only: pass one of them")
    if problem := abstention_check(target_precision, target_coverage):
        fail(problem)
    from food_classifier.training import runs
    from food_classifier.training.calibrate import format_calibration
    from food_classifier.training.evaluate import format_table
    from food_classifier.training.features import STATS
    from food_classifier.training.pipeline import format_timings, stage, train_and_publish

    seconds: dict[str, float] = {}
    if data:
        from food_classifier.cli.data import split_and_report

        with stage(seconds, "prepare"):
            split_and_report(data, manifest)
    if resume:
        if not runs.is_run(resume):
            fail(f"{resume} is not a run dir (no {runs.CONFIG})")
        saved = runs.read_meta(resume)
        config, manifest = saved.config, Path(saved.manifest)
        if target_precision is not None or target_coverage is not None:  # a post-fit choice: may change on resume
            config = replace(config, target_precision=target_precision, target_coverage=target_coverage)
    else:
        config = TrainConfig(**options)
    STATS.reset()
    run, bundle, metrics = train_and_publish(manifest, config, runs_dir, models_dir, name, resume=resume,
                                             int8=int8, seconds=seconds, cascade=cascade)
    if STATS.summary():  # what an incremental retrain reused (photos are cached by sha256)
        typer.echo(STATS.summary())
    typer.echo(format_table(metrics))
    typer.echo(format_calibration(run))
    if cascade and "+" in config.arch:
        from food_classifier.training.cascade import format_cascade

        typer.echo(format_cascade(bundle))
    from food_classifier.bundle import read_meta
    from food_classifier.training.calibrate import served_tradeoff

    typer.echo(served_tradeoff(read_meta(bundle)))
    if cv:
        from food_classifier.training.cv import cross_validate, format_cv

        with stage(seconds, "cv"):
            typer.echo(format_cv(cross_validate(manifest, config, k=cv, out_dir=run)))
        runs.write_json(run, runs.TIMES, seconds)
    typer.echo("\n" + format_timings(seconds, total=time.monotonic() - started))
    typer.echo("\n" + next_steps(run, bundle, models_dir / name))


def next_steps(run: Path, bundle: Path, model_dir: Path) -> str:
    """Where the run and the bundle went, and the exact command that serves this bundle (the model dir,
    unless another version is promoted there: then this version's own dir, and how to promote it)."""
    from food_classifier.bundle import load_bundle, promoted_version
    from food_classifier.versions import size_bytes

    meta = load_bundle(bundle).meta
    variant = meta.recommended_variant()
    lines = [f"run:    {run}  (HTML report: food-classifier report {shlex.quote(str(run))})",
             f"bundle: {bundle}  ({size_bytes(bundle) / 1e6:.1f} MB; `serve` will use its {variant} variant, "
             "the one training recommends)"]
    promoted = promoted_version(model_dir)
    if promoted and promoted != bundle.name:
        lines += [f"note: {model_dir} serves its promoted version {promoted}, not this one",
                  f"serve this one:  food-classifier serve {shlex.quote(str(bundle))}",
                  f"or promote it:   food-classifier models promote {shlex.quote(model_dir.name)} {bundle.name} "
                  f"--models-dir {shlex.quote(str(model_dir.parent))}"]
    else:
        lines.append(f"serve it:  food-classifier serve {shlex.quote(str(model_dir))}   (then open "
                     "http://localhost:8383/)")
    return "\n".join(lines)


_own = [p for p in inspect.signature(train).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
train.__signature__ = inspect.Signature(_own + _config_params(), return_annotation=None)  # type: ignore[attr-defined]
