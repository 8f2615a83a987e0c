"""`food-classifier serve`: a Typer command whose options are built from `ServeSettings`.

`ServeSettings` (settings.py) is the one declaration of each setting: every field becomes a flag
`--kebab-name` (or the positional argument, for a field marked `Cli(positional=True)`), with the
field's description as help, its default and its `FOOD_CLASSIFIER_<NAME>` env var shown, and a flag
left out falls back to the env var, then to the default, because only the given flags are passed on.
Adding a field adds the flag. Importing this module stays cheap (typer only): the command is built
on first use, since pydantic-settings alone takes ~0.3 s to import, and FastAPI, uvicorn and ONNX
Runtime are imported only when `serve` runs.

    from food_classifier.cli.serve import serve        # the function, for typer.run / app.command
    from food_classifier.cli.serve import serve_command   # a ready click command
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import typer

from food_classifier.defaults import MiB

SERVE_HELP = ("Serve bundles over HTTP (FastAPI + ONNX Runtime; no torch).\n\nThe same app runs on Ray Serve "
              "with --engine ray. Opens a web page at /.")


def _cli_type(annotation: Any) -> Any:
    """The type Typer parses a field's flag as; pydantic does the real validation afterwards."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _cli_type(rest[0]) if len(rest) == 1 else str
    if origin is list:
        return list[_cli_type(args[0])]
    return annotation if annotation in (str, int, float, bool, Path) else str  # SecretStr, Literal...: text


def _shown_default(field: Any) -> str | None:
    """The default as help shows it; None when there is none to show (computed, empty or unset)."""
    if field.default_factory is not None or field.default in (None, [], ()):
        return None
    value = field.default
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int) and value >= MiB and value % MiB == 0:
        return f"{value} = {value // MiB} MiB"
    return str(value)


def _metavar(annotation: Any, kind: Any) -> str:
    """INT, PATH, a|b|c for a Literal..., for the help's option column."""
    inner = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
    literal = [a for a in (annotation, *typing.get_args(annotation)) if typing.get_origin(a) is typing.Literal]
    if literal:
        return "|".join(map(str, typing.get_args(literal[0])))
    return {int: "INT", float: "FLOAT", Path: "PATH"}.get(inner, "TEXT")


def _field_param(name: str, field: Any, env_prefix: str) -> inspect.Parameter:
    """One settings field as a keyword parameter carrying its Typer option (or argument)."""
    from food_classifier.serving.settings import Cli

    cli = next((m for m in field.metadata if isinstance(m, Cli)), Cli())
    kind = _cli_type(field.annotation)
    is_list = typing.get_origin(kind) is list
    notes = [f"env var: {env_prefix}{name.upper()}" + ("=a,b" if is_list else "")]
    if is_list and not cli.positional:
        notes.insert(0, "repeatable")
    default = _shown_default(field)
    if default is not None:
        notes.append(f"default: {default}")
    help_text = f"{field.description or ''} [{'; '.join(notes)}]".strip()
    if cli.positional:
        info: Any = typer.Argument(help=help_text, show_default=False, metavar=name.upper())
    elif kind is bool:
        flag = name.replace("_", "-")
        info = typer.Option(f"--{flag}/--no-{flag}", help=help_text, show_default=False)
    else:
        decls = ["--" + name.replace("_", "-"), *([cli.short] if cli.short else [])]
        info = typer.Option(*decls, help=help_text, show_default=False, metavar=_metavar(field.annotation, kind))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, info])


def command_for(settings_cls: type, run: Callable[[Any], None], doc: str,
                fields: Sequence[str] | None = None) -> Callable[..., None]:
    """A Typer command function whose parameters are `settings_cls`'s fields (or only `fields`, in that order);
    it builds the settings from the flags that were given (env vars and defaults fill the rest) and calls
    `run(settings)`."""
    from pydantic import ValidationError

    prefix = settings_cls.model_config.get("env_prefix", "")
    names = fields or list(settings_cls.model_fields)
    params = [_field_param(n, settings_cls.model_fields[n], prefix) for n in names]

    def command(**flags: Any) -> None:
        given = {k: v for k, v in flags.items() if v is not None and v != []}
        try:
            settings = settings_cls(**given)
        except ValidationError as e:
            first = e.errors()[0]
            where, msg = ".".join(map(str, first["loc"])), first["msg"].removeprefix("Value error, ")
            _fail(f"invalid setting {where}: {msg}" if where else msg)
        run(settings)

    command.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    command.__doc__ = doc
    return command


def run_server(settings: Any) -> None:
    """Start uvicorn with the app for `settings` (the built-in bundle when none is given)."""
    import logging

    if not settings.bundles:
        settings = settings.model_copy(update={"bundles": [_builtin_bundle()]})

    import uvicorn

    from food_classifier.bundle import BundleError
    from food_classifier.cache import CacheError
    from food_classifier.serving import memory
    from food_classifier.serving.compose import build_app
    from food_classifier.serving.http.protocol import protocol_class
    from food_classifier.v1 import GrpcMissing

    memory.limit_arenas(2)  # before any worker thread allocates: keeps RSS from creeping (memory.py)
    memory.mmap_large_blocks()  # decoded large images go back to the OS when freed (memory.py)

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.engine == "ray":
        _run_ray(settings)
    try:
        app = build_app(settings)
    except (BundleError, CacheError, GrpcMissing, OSError) as e:  # OSError: a taken gRPC port, an unwritable log dir
        _fail(str(e))
    s = settings
    uvicorn.run(app, host=s.host, port=s.port, log_level=s.log_level, access_log=s.access_log,
                http=protocol_class(s.header_timeout, s.max_header_bytes),
                h11_max_incomplete_event_size=s.max_header_bytes,
                limit_concurrency=s.limit_concurrency, timeout_keep_alive=s.keep_alive_timeout,
                timeout_graceful_shutdown=s.shutdown_timeout)


def _run_ray(settings: Any) -> typing.NoReturn:
    """`--engine ray`: the same app in Ray Serve replicas (serving/ray_serve.py); exits with its status."""
    from food_classifier.bundle import BundleError, model_sources
    from food_classifier.ray_env import RayError
    from food_classifier.serving.ray_serve import run

    try:
        model_sources(settings.bundles)  # a wrong path fails here, not in every replica
        code = run(settings.model_copy(update={"bundles": [p.absolute() for p in settings.bundles],
                                               "allow_path_root": [p.absolute() for p in settings.allow_path_root]}))
    except (BundleError, RayError) as e:
        _fail(str(e))
    raise typer.Exit(code)


@cache
def _serve() -> Callable[..., None]:
    from food_classifier.serving.settings import ServeSettings

    fn = command_for(ServeSettings, run_server, SERVE_HELP)
    fn.__name__ = fn.__qualname__ = "serve"
    fn.__module__ = __name__
    return fn


def serve_command(name: str = "serve") -> Any:
    """`serve` as a click command with plain help (rich's 80-column table cuts long flags and words)."""
    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command(name)(_serve())
    return typer.main.get_command(app)


def __getattr__(name: str) -> Any:
    """`serve` is built on first access, so importing this module does not import pydantic."""
    if name == "serve":
        return _serve()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _builtin_bundle() -> Path:
    try:
        from food_classifier.builtin import builtin_bundle_path

        return Path(builtin_bundle_path())
    except Exception as e:  # missing module or no built-in model on this install
        _fail(f"no bundle given and no built-in model available ({e.__class__.__name__}: {e}); "
              "pass one, e.g. `food-classifier serve models/food`")
    raise AssertionError  # unreachable: _fail exits


def _fail(message: str) -> typing.NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
