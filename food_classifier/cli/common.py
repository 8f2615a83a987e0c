"""What every command module shares: one-line failures, which exceptions are the user's, the extras check."""

from __future__ import annotations

import sys
import typing

import typer


def fail(message: str) -> typing.NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the user gave us something wrong': shown as one line, no traceback.
    Training modules count only once imported (an error of theirs cannot be raised before), so an
    error path never pays for importing torch."""
    from food_classifier.bundle import BundleError
    from food_classifier.preprocessing import ImageError

    errors: list[type[BaseException]] = [BundleError, ImageError, FileNotFoundError]
    training = {"sources": "DataError", "export": "ExportError", "models": "ModelError"}
    for module, name in training.items():
        if f"food_classifier.training.{module}" in sys.modules:
            errors.append(getattr(sys.modules[f"food_classifier.training.{module}"], name))
    return tuple(errors)


def need_training_extras() -> None:
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        fail("this command needs the training extras: pip install 'food-classifier[train]'")
