"""The FastAPI app: thin routers over `PredictionService` and `ModelRegistry`.

    app = create_app(ServeSettings(bundles=[Path("models/food")]))

Models load in the background after startup, so `/healthz` answers at once and `/readyz` turns green
when every model is loaded and warmed. SIGHUP reloads every model (when running in the main thread).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from food_classifier.serving import schemas
from food_classifier.serving.errors import ServiceError
from food_classifier.serving.inputs import read_image, read_images
from food_classifier.serving.metrics import ServingMetrics
from food_classifier.serving.middleware import ServingMiddleware
from food_classifier.serving.registry import ModelRegistry, model_sources
from food_classifier.serving.service import PredictionService
from food_classifier.serving.settings import ServeSettings

log = logging.getLogger("food_classifier.serving")
STATIC = Path(__file__).parent / "static"
TopK = Annotated[int | None, Query(ge=1, le=1000, description="How many classes to return in top_k.")]
Threshold = Annotated[float | None, Query(ge=0.0, le=1.0, description="Abstain (label 'unsure') below this "
                                                                       "confidence; default: the bundle's.")]
router = APIRouter()


def _svc(request: Request) -> PredictionService:
    return request.app.state.service


def _tag(request: Request, name: str | None) -> None:
    """Label this request's metrics with the model, only if it is a loaded one (bounded labels)."""
    reg: ModelRegistry = request.app.state.registry
    key = name or reg.default_name
    if key in reg.names():
        request.state.model = key


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict:
    """The process is alive (models may still be loading)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"], responses={503: {"model": schemas.Error}})
async def readyz(request: Request) -> JSONResponse:
    """Green only once every model is loaded and warmed up. A failing cache does not make it red (requests
    work without it): it shows as `cache.state: degraded`."""
    reg: ModelRegistry = request.app.state.registry
    if not reg.ready:
        detail = f"models are {reg.state}" + (f": {reg.error}" if reg.error else "")
        return JSONResponse({"error": "not_ready", "detail": detail}, status_code=503)
    cache = _svc(request).cache
    await asyncio.to_thread(cache.check)  # a ping (short timeout); skipped while the breaker is open
    return JSONResponse({"status": "ready", "models": {m.name: m.version for m in reg.models()},
                         "cache": cache.status()})


def _answer(body: dict) -> JSONResponse:
    """A prediction with its cache outcome also in the X-Cache header (hit-bytes, hit-pixels, miss, off)."""
    return JSONResponse(body, headers={"X-Cache": body["cache"]})


@router.get("/v1/models", tags=["models"], response_model=schemas.ModelList)
async def list_models(request: Request) -> JSONResponse:
    reg: ModelRegistry = request.app.state.registry
    models = reg.models() if reg.ready else []
    return JSONResponse({"default": reg.default_name,
                         "models": [m.info(m.name == reg.default_name) for m in models]})


@router.get("/v1/models/{name}", tags=["models"], response_model=schemas.ModelInfo, responses=schemas.ERRORS)
async def model_info(request: Request, name: str) -> JSONResponse:
    reg: ModelRegistry = request.app.state.registry
    m = reg.get(name)
    return JSONResponse(m.info(m.name == reg.default_name))


@router.post("/v1/models/{name}/predict", tags=["predict"], response_model=schemas.Prediction,
             responses=schemas.ERRORS, openapi_extra=schemas.IMAGE_BODY)
async def predict(request: Request, name: str, top_k: TopK = None, threshold: Threshold = None) -> JSONResponse:
    """Classify one image: multipart file, raw image body, or JSON `{"image": base64}`."""
    _tag(request, name)
    svc = _svc(request)
    svc.registry.get(name)  # 404/503 before reading the body
    return _answer(await svc.predict(name, await read_image(request), top_k, threshold))


@router.post("/predict", tags=["predict"], response_model=schemas.Prediction, responses=schemas.ERRORS,
             openapi_extra=schemas.IMAGE_BODY)
async def predict_default(request: Request, top_k: TopK = None, threshold: Threshold = None) -> JSONResponse:
    """Like `/v1/models/{name}/predict`, with the default model."""
    _tag(request, None)
    svc = _svc(request)
    svc.registry.get(None)
    return _answer(await svc.predict(None, await read_image(request), top_k, threshold))


@router.post("/v1/models/{name}/predict-batch", tags=["predict"], response_model=schemas.BatchPrediction,
             responses=schemas.ERRORS, openapi_extra=schemas.BATCH_BODY)
async def predict_batch(request: Request, name: str, top_k: TopK = None,
                        threshold: Threshold = None) -> JSONResponse:
    """Many images (multipart files, any field name) -> results in the same order; bad images are
    error entries."""
    _tag(request, name)
    svc = _svc(request)
    svc.registry.get(name)
    images = await read_images(request, svc.settings.max_batch_images)
    body = await svc.predict_batch(name, images, top_k, threshold)
    outcomes = {r["cache"] for r in body["results"] if "cache" in r}
    # one value when all answered images agree, else "mixed" (each result has its own `cache`)
    headers = {"X-Cache": outcomes.pop() if len(outcomes) == 1 else "mixed"} if outcomes else None
    return JSONResponse(body, headers=headers)


@router.post("/predict-batch", tags=["predict"], response_model=schemas.BatchPrediction,
             responses=schemas.ERRORS, openapi_extra=schemas.BATCH_BODY)
async def predict_batch_default(request: Request, top_k: TopK = None, threshold: Threshold = None) -> JSONResponse:
    return await predict_batch(request, None, top_k, threshold)


@router.get("/predict", tags=["predict"], response_model=schemas.SeedPrediction,
            responses={**schemas.ERRORS, 403: {"model": schemas.Error, "description": "Path outside the roots"}})
async def predict_path(request: Request, image_path: Annotated[str, Query(min_length=1)],
                       model_type: str | None = None) -> JSONResponse:
    """The seed's call: classify a server-side file under `--allow-path-root` (403 otherwise)."""
    _tag(request, model_type)
    body = await _svc(request).predict_path(model_type, image_path)
    return JSONResponse(body, headers={"X-Cache": body.pop("cache")})  # the body keeps the seed's shape


@router.post("/v1/models/{name}/reload", tags=["models"], response_model=schemas.Reloaded,
             responses={**schemas.ERRORS, 409: {"model": schemas.Error, "description": "Reload failed"}})
async def reload_model(request: Request, name: str) -> JSONResponse:
    """Load the newest bundle version and swap it in; requests in flight finish on the old one."""
    _tag(request, name)
    return JSONResponse(await request.app.state.registry.reload(name))


@router.get("/metrics", tags=["ops"])
async def metrics(request: Request) -> Response:
    m: ServingMetrics = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def _error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, as `{"error": code, "detail": message}`."""

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "path", "body"))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return _error_response(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(500, "internal_error", exc.__class__.__name__)


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the app; nothing heavy happens until the lifespan starts (model loading)."""
    settings = settings or ServeSettings()
    metrics = ServingMetrics()
    registry = ModelRegistry(model_sources(settings.bundles), settings, metrics)
    service = PredictionService(registry, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        loading = asyncio.create_task(registry.load_all(warm=service.warm_up))
        loading.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged by load_all
        hup = False
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(registry.reload_all()))
            hup = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (e.g. TestClient)
            pass
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            loading.cancel()
            service.close()
            registry.close()

    # /docs and /redoc with their JS/CSS served from the fastapi-offline package, not a CDN:
    # the service must be browsable on a machine without internet access
    app = FastAPIOffline(title="food-classifier", version="1", lifespan=lifespan, static_url="/docs-assets",
                         description="Classify food photos with ONNX Runtime model bundles.")
    app.state.settings, app.state.metrics = settings, metrics
    app.state.registry, app.state.service = registry, service
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _install_error_handlers(app)
    app.add_middleware(ServingMiddleware, metrics=metrics, api_key=settings.api_key_value(),
                       max_body=settings.max_body_bytes, max_batch_body=settings.max_batch_body_bytes,
                       routes=router.routes)
    return app
