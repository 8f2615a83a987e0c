"""`food-classifier serve`: the Typer command. Imports only typer at module level.

The main CLI registers it with `app.command()(serve)`, so importing this module must stay cheap:
FastAPI, uvicorn and ONNX Runtime are imported inside `serve` when the command actually runs.
Flags left out fall back to `FOOD_CLASSIFIER_*` environment variables, then to the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

_ENV = "env FOOD_CLASSIFIER_"


def _opt(help_text: str, env: str, *names: str) -> object:
    return typer.Option(*names, help=f"{help_text} [{_ENV}{env}]", show_default=False)


def serve(
    bundles: Annotated[list[Path] | None, typer.Argument(
        help="Bundle dir, model dir (serves its newest version) or dir of model dirs; several allowed. "
             "The first model is the default. [env FOOD_CLASSIFIER_BUNDLES]", show_default=False)] = None,
    host: Annotated[str | None, _opt("Interface to bind (default 0.0.0.0).", "HOST", "--host")] = None,
    port: Annotated[int | None, _opt("Port (default 8383).", "PORT", "--port", "-p")] = None,
    default_model: Annotated[str | None, _opt("Model behind /predict (default: the first).", "DEFAULT_MODEL",
                                              "--default-model")] = None,
    variant: Annotated[list[str] | None, _opt(
        "Model variant: fp32 (default), int8, auto (int8 when the bundle has it), or NAME=VARIANT for one "
        "model; repeatable.", "VARIANT", "--variant")] = None,
    api_key: Annotated[str | None, _opt("Require this key (X-API-Key or Bearer) on all but /healthz, /readyz; "
                                        "prefer the env var, flags show up in `ps`.", "API_KEY", "--api-key")] = None,
    allow_path_root: Annotated[list[Path] | None, _opt(
        "Enable the seed's GET /predict?image_path=... for files under this dir; repeatable.", "ALLOW_PATH_ROOT",
        "--allow-path-root")] = None,
    max_body_bytes: Annotated[int | None, _opt("Request body limit (default 10 MiB).", "MAX_BODY_BYTES",
                                               "--max-body-bytes")] = None,
    max_batch_body_bytes: Annotated[int | None, _opt("Body limit for predict-batch (default 64 MiB).",
                                                     "MAX_BATCH_BODY_BYTES", "--max-batch-body-bytes")] = None,
    max_batch_images: Annotated[int | None, _opt("Images per predict-batch request (default 64).",
                                                 "MAX_BATCH_IMAGES", "--max-batch-images")] = None,
    max_pixels: Annotated[int | None, _opt("Pixels per image (default 40M; more is a 413).", "MAX_PIXELS",
                                           "--max-pixels")] = None,
    top_k: Annotated[int | None, _opt("Default top-k length (default 5).", "TOP_K", "--top-k")] = None,
    ort_threads: Annotated[int | None, _opt("ONNX Runtime intra-op threads.", "ORT_THREADS", "--ort-threads")] = None,
    inference_workers: Annotated[int | None, _opt("Model calls that may run at once.", "INFERENCE_WORKERS",
                                                  "--inference-workers")] = None,
    decode_threads: Annotated[int | None, _opt("Image decode/preprocess threads.", "DECODE_THREADS",
                                               "--decode-threads")] = None,
    batch_max_size: Annotated[int | None, _opt("Micro-batch size limit.", "BATCH_MAX_SIZE",
                                               "--batch-max-size")] = None,
    batch_max_wait_ms: Annotated[float | None, _opt("Longest wait for images still decoding (ms); 0 = never wait.",
                                                    "BATCH_MAX_WAIT_MS", "--batch-max-wait-ms")] = None,
    warmup: Annotated[bool | None, _opt("Warm each model up before /readyz turns green (default on).", "WARMUP",
                                        "--warmup/--no-warmup")] = None,
    cache_bytes: Annotated[int | None, _opt("In-process prediction cache in bytes (default 64 MiB; 0 = off).",
                                            "CACHE_BYTES", "--cache-bytes")] = None,
    cache_url: Annotated[str | None, _opt("Redis URL of a shared prediction cache (redis://host:6379/0).",
                                          "CACHE_URL", "--cache-url")] = None,
    cache_ttl: Annotated[float | None, _opt("Seconds a cached prediction lives (default 86400).", "CACHE_TTL",
                                            "--cache-ttl")] = None,
    log_level: Annotated[str | None, _opt("debug, info, warning, error (default info).", "LOG_LEVEL",
                                          "--log-level")] = None,
    access_log: Annotated[bool | None, _opt("Log every request (default off: it costs throughput).",
                                            "ACCESS_LOG", "--access-log/--no-access-log")] = None,
) -> None:
    """Serve model bundles over HTTP (FastAPI + uvicorn, ONNX Runtime; no torch)."""
    import logging

    from pydantic import ValidationError

    from food_classifier.serving.settings import ServeSettings

    given = {k: v for k, v in locals().items() if k not in ("logging", "ValidationError", "ServeSettings")
             and v not in (None, [])}
    try:
        settings = ServeSettings(**given)
    except ValidationError as e:
        first = e.errors()[0]
        _fail(f"invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}")
    if not settings.bundles:
        settings = settings.model_copy(update={"bundles": [_builtin_bundle()]})

    import uvicorn

    from food_classifier.bundle import BundleError
    from food_classifier.cache import CacheError
    from food_classifier.serving import memory
    from food_classifier.serving.app import create_app

    memory.limit_arenas(2)  # before any worker thread allocates: keeps RSS from creeping (memory.py)

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)
    except (BundleError, CacheError) as e:
        _fail(str(e))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                access_log=settings.access_log, timeout_graceful_shutdown=10)


def _builtin_bundle() -> Path:
    try:
        from food_classifier.builtin import builtin_bundle_path

        return Path(builtin_bundle_path())
    except Exception as e:  # missing module or no built-in model on this install
        _fail(f"no bundle given and no built-in model available ({e.__class__.__name__}: {e}); "
              "pass one, e.g. `food-classifier serve models/food`")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
