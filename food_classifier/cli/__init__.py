"""`food-classifier` command line. Thin: every command calls one plain function.

One module per command group: `data`, `train` (train, evaluate, report, export), `models`,
`predict` (predict, builtin, monitor); `serve` and `worker` come from the serving side. Heavy
imports (torch, onnxruntime, fastapi) happen inside commands, so `--help` is instant and the serving
install works without the training extras.
"""

from __future__ import annotations

import sys

import typer

from food_classifier.cli import predict, train
from food_classifier.cli.common import user_errors
from food_classifier.cli.data import data_app
from food_classifier.cli.models import models_app


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


# rich_markup_mode=None: click's plain help wraps at word boundaries; rich's tables cut defaults mid-word at 80 columns
app = typer.Typer(help="Train food-photo classifiers on a CPU and serve them over HTTP.", cls=_Commands,
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)
app.command()(train.train)
app.command()(train.evaluate)
app.command()(train.report)
app.command()(train.export)
app.command()(predict.predict)
app.command()(predict.monitor)
app.command("builtin")(predict.builtin_cmd)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")


def _register_worker() -> None:
    try:
        from food_classifier.serving.worker_cli import worker
    except ImportError:
        return
    app.command("worker", short_help="Classify images from Kafka or Redis Streams.")(worker)


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
