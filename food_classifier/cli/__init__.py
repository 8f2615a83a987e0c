"""`food-classifier` command line. Thin: every command calls one plain function.

One module per command group: `data`, `train`, `runs` (evaluate, report, export), `models`,
`predict` (predict, builtin, monitor), `serve` and `worker` (their flags built from the serving settings). Heavy
imports (torch, onnxruntime, fastapi) happen inside commands, so `--help` is instant and the serving
install works without the training extras.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module
from typing import Any

import typer

from food_classifier.cli import predict, runs
from food_classifier.cli.common import user_errors
from food_classifier.cli.models import models_app


def _single(function: Callable[..., None], name: str, short_help: str | None = None) -> Any:
    """One Typer command function as a click command (plain help, as the whole app)."""
    sub = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    sub.command(name, short_help=short_help)(function)
    return typer.main.get_command(sub)


def _serve() -> Any:
    from food_classifier.cli.serve import serve_command

    return serve_command("serve")


# Built on first use: `train` and `data` import the training side's config and sources (no torch,
# but `serve` must import nothing of the training side); `serve` builds its options from
# ServeSettings (pydantic-settings takes ~0.3 s to import) and is absent without the serve extra.
LAZY: dict[str, Callable[[], Any]] = {
    "data": lambda: typer.main.get_command(import_module("food_classifier.cli.data").data_app),
    "train": lambda: _single(import_module("food_classifier.cli.train").train, "train"),
    "serve": _serve,
    "worker": lambda: import_module("food_classifier.cli.worker").worker_command("worker"),
    # bring your own ONNX, phone-ready export (training/deploy_cli.py)
    "import-onnx": lambda: _single(import_module("food_classifier.training.deploy_cli").import_onnx_cmd, "import-onnx"),
    "export-mobile": lambda: _single(import_module("food_classifier.training.deploy_cli").export_mobile_cmd,
                                     "export-mobile", "Export what the server serves for phones (one .ort file)."),
    # the labelling page over the photos `serve --keep-photos` kept (labeling/)
    "label": lambda: _single(import_module("food_classifier.cli.label").label, "label"),
}
ORDER = ["data", "train", "evaluate", "report", "export", "models", "predict", "predict-dir", "builtin", "import-onnx",
         "export-mobile", "serve", "worker", "monitor", "label"]


class _Commands(typer.core.TyperGroup):
    """The top-level group: eager commands plus the LAZY ones, listed in ORDER."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        names = set(super().list_commands(ctx)) | set(LAZY)
        return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))

    def get_command(self, ctx: typer.Context, name: str):  # -> the click command, or None
        if name in LAZY and name not in self.commands:
            try:
                self.add_command(LAZY[name](), name)
            except ImportError:  # the extra this command needs is not installed
                return None
        return super().get_command(ctx, name)


# rich_markup_mode=None: click's plain help wraps at word boundaries; rich's tables cut defaults mid-word at 80 columns
app = typer.Typer(help="Train food-photo classifiers on a CPU and serve them over HTTP.", cls=_Commands,
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)
app.command()(runs.evaluate)
app.command()(runs.report)
app.command()(runs.export)
app.command()(predict.predict)
app.command()(predict.monitor)
app.command("builtin")(predict.builtin_cmd)
app.command("predict-dir")(predict.predict_dir_cmd)
app.add_typer(models_app, name="models")


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
