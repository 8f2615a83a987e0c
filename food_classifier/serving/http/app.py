"""The FastAPI app: thin routers over `PredictionService` and `ModelRegistry`.

    app = create_app(ServeSettings(bundles=[Path("models/food")]))

Models load in the background after startup, so `/healthz` answers at once and `/readyz` turns green
when every model is loaded and warmed (both answer HEAD too: load balancers probe with it). If loading
fails (no valid version of a model), the real server exits with status 3 instead of staying alive and
unready. SIGHUP reloads every model (when running in the main thread); reload over HTTP needs the admin key.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Protocol

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from food_classifier.answer import Options, OptionsError
from food_classifier.serving.errors import InvalidInput, NotReady, ServiceError
from food_classifier.serving.http import routes_feedback, routes_oip, schemas
from food_classifier.serving.http.inputs import read_image, read_images
from food_classifier.serving.http.middleware import ServingMiddleware
from food_classifier.serving.http.paths import PathGuard
from food_classifier.serving.metrics import ServingMetrics
from food_classifier.serving.registry import LoadedModel, ModelRegistry
from food_classifier.serving.service import ImageUpload, PredictionService, build_service
from food_classifier.serving.settings import ServeSettings

log = logging.getLogger("food_classifier.serving")
STATIC = Path(__file__).parent / "static"
EXIT_NO_MODEL = 3  # the server started but no model could be loaded (as uvicorn's own startup failure)
TopK, Threshold, NotFood = schemas.TopKQuery, schemas.ThresholdQuery, schemas.NotFoodQuery
MODEL_ERRORS = schemas.AUTH | schemas.errors({404: "Unknown model", 503: "Models still loading"})
router = APIRouter()


def _svc(request: Request) -> PredictionService:
    return request.app.state.service


def _info(reg: ModelRegistry, model: LoadedModel) -> schemas.ModelInfo:
    return schemas.ModelInfo.model_validate(model.info(model.name == reg.default_name))


def _rid(request: Request) -> str | None:
    """The request id the middleware gave this request (also its X-Request-ID header)."""
    return getattr(request.state, "request_id", None)


def _tag(request: Request, name: str | None) -> None:
    """Label this request's metrics with the model, only if it is a loaded one (bounded labels)."""
    reg: ModelRegistry = request.app.state.registry
    key = name or reg.default_name
    if key in reg.names():
        request.state.model = key


@router.get("/healthz", tags=["ops"])
@router.head("/healthz", include_in_schema=False)
async def healthz() -> schemas.Health:
    """The process is alive (models may still be loading)."""
    return schemas.Health(status="ok")


@router.get("/readyz", tags=["ops"], responses=schemas.errors({503: "Models still loading or failed"}),
            response_model_exclude_none=True)
@router.head("/readyz", include_in_schema=False)
async def readyz(request: Request) -> schemas.Ready:
    """Green only once every model is loaded and warmed up. A failing cache does not make it red (requests
    work without it): it shows as `cache.state: degraded`."""
    reg: ModelRegistry = request.app.state.registry
    if not reg.ready:
        raise NotReady(f"models are {reg.state}" + (f": {reg.error}" if reg.error else ""))
    cache = _svc(request).cache
    await asyncio.to_thread(cache.check)  # a ping (short timeout); skipped while the breaker is open
    return schemas.Ready(status="ready", models={m.name: m.version for m in reg.models()},
                         cache=schemas.CacheStatus.model_validate(cache.status()))


def _x_cache(response: Response, outcome: str) -> None:
    """The cache outcome (hit-bytes, hit-pixels, miss, off) also in the X-Cache header."""
    response.headers["X-Cache"] = outcome


@router.get("/v1/models", tags=["models"], responses=schemas.AUTH)
async def list_models(request: Request) -> schemas.ModelList:
    reg: ModelRegistry = request.app.state.registry
    models = reg.models() if reg.ready else []
    return schemas.ModelList(default=reg.default_name, models=[_info(reg, m) for m in models])


@router.get("/v1/models/{name}", tags=["models"], responses=MODEL_ERRORS)
async def model_info(request: Request, name: str) -> schemas.ModelInfo:
    reg: ModelRegistry = request.app.state.registry
    return _info(reg, reg.get(name))


def _options(top_k: int | None, threshold: float | None, reject_not_food: bool) -> Options:
    try:
        return Options(top_k=top_k, threshold=threshold, reject_not_food=reject_not_food)
    except OptionsError as e:
        raise InvalidInput(str(e)) from None


@router.post("/v1/models/{name}/predict", tags=["predict"], responses=schemas.ERRORS,
             openapi_extra=schemas.IMAGE_BODY)
async def predict(request: Request, response: Response, name: str | None, top_k: TopK = None,
                  threshold: Threshold = None, reject_not_food: NotFood = True) -> schemas.Prediction:
    """Classify one image: multipart file, raw image body, or JSON `{"image": base64}`."""
    _tag(request, name)
    svc = _svc(request)
    options = _options(top_k, threshold, reject_not_food)
    svc.registry.get(name)  # 404/503 before reading the body
    body = schemas.prediction(await svc.predict(name, await read_image(request), options, _rid(request)))
    _x_cache(response, body.cache)
    return body


@router.post("/predict", tags=["predict"], responses=schemas.ERRORS, openapi_extra=schemas.IMAGE_BODY)
async def predict_default(request: Request, response: Response, top_k: TopK = None,
                          threshold: Threshold = None, reject_not_food: NotFood = True) -> schemas.Prediction:
    """Like `/v1/models/{name}/predict`, with the default model."""
    return await predict(request, response, None, top_k, threshold, reject_not_food)


@router.post("/v1/models/{name}/predict-batch", tags=["predict"], responses=schemas.ERRORS,
             openapi_extra=schemas.BATCH_BODY)
async def predict_batch(request: Request, response: Response, name: str | None, top_k: TopK = None,
                        threshold: Threshold = None, reject_not_food: NotFood = True) -> schemas.BatchPrediction:
    """Many images (multipart files, any field name) -> results in the same order; bad images are
    error entries."""
    _tag(request, name)
    svc = _svc(request)
    options = _options(top_k, threshold, reject_not_food)
    svc.registry.get(name)
    images = await read_images(request, svc.settings.max_batch_images)
    answer = await svc.predict_batch(name, images, options, _rid(request))
    body = schemas.batch(answer, [img.filename for img in images])
    outcomes = {r.cache for r in body.results if isinstance(r, schemas.BatchResult)}
    if outcomes:  # one value when all answered images agree, else "mixed" (each result has its own `cache`)
        _x_cache(response, outcomes.pop() if len(outcomes) == 1 else "mixed")
    return body


@router.post("/predict-batch", tags=["predict"], responses=schemas.ERRORS, openapi_extra=schemas.BATCH_BODY)
async def predict_batch_default(request: Request, response: Response, top_k: TopK = None,
                                threshold: Threshold = None,
                                reject_not_food: NotFood = True) -> schemas.BatchPrediction:
    return await predict_batch(request, response, None, top_k, threshold, reject_not_food)


@router.get("/predict", tags=["predict"],
            responses=schemas.ERRORS | schemas.errors({403: "Path access off or outside the roots",
                                                       404: "Unknown model or no such file"}))
async def predict_path(request: Request, response: Response,
                       image_path: Annotated[str, Query(min_length=1, pattern=r"^[^\x00]+$")],
                       model_type: str | None = None) -> schemas.SeedPrediction:
    """The seed's call: classify a server-side file under `--allow-path-root` (403 otherwise)."""
    _tag(request, model_type)
    svc, guard = _svc(request), request.app.state.paths
    svc.registry.get(model_type)
    path = guard.resolve(image_path)
    data = await asyncio.to_thread(guard.read, path, svc.settings.max_body_bytes)
    answer = await svc.predict(model_type, ImageUpload(data), request_id=_rid(request))
    _x_cache(response, answer.cache)  # the body keeps the seed's shape
    return schemas.SeedPrediction(label=answer.label, label_idx=answer.label_idx, confidence=answer.confidence)


@router.post("/v1/models/{name}/reload", tags=["admin"],
             responses=MODEL_ERRORS | schemas.errors({401: "Admin key missing or wrong",
                                                      403: "No admin key configured: reload over HTTP is off",
                                                      409: "Reload failed; the old version keeps serving"}))
async def reload_model(request: Request, name: str) -> schemas.Reloaded:
    """Load the newest bundle version and swap it in; requests in flight finish on the old one.
    Needs the admin key (FOOD_CLASSIFIER_ADMIN_KEY); without one configured it answers 403."""
    _tag(request, name)
    return schemas.Reloaded.model_validate(await request.app.state.registry.reload(name))


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse, responses={401: {  # JSON, unlike the 200
    "description": "API key missing or wrong",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}})
async def metrics(request: Request) -> Response:
    m: ServingMetrics = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


router.include_router(routes_feedback.router)
router.include_router(routes_oip.router)  # the Open Inference Protocol (/v2), same core


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def _error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(schemas.error_body(code, detail), status_code=status, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (several routes may share it)."""
    methods = {m for r in router.routes if getattr(r, "methods", None)
               and r.matches(request.scope)[0] != Match.NONE for m in r.methods}
    return sorted(methods)


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
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette lists only the first route's methods: GET /predict hid POST
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return _error_response(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(500, "internal_error", exc.__class__.__name__)


class Sibling(Protocol):
    """Another transport served beside HTTP on the same loop and service (the gRPC server): started before the
    models load, told when they are ready, stopped (drained) before the service closes."""

    async def start(self, service: PredictionService) -> None: ...
    async def ready(self, ready: bool) -> None: ...
    async def stop(self) -> None: ...


def create_app(settings: ServeSettings | None = None, service: PredictionService | None = None,
               siblings: Sequence[Sibling] = ()) -> FastAPI:
    """Build the HTTP transport over `service` (default: `build_service(settings)`); nothing heavy happens until
    the lifespan starts (model loading). `siblings` share its lifespan (serving/compose.py adds gRPC)."""
    settings = settings or ServeSettings()
    service = service or build_service(settings)
    registry, metrics, monitor = service.registry, service.metrics, service.monitor

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        hup = False  # True when this app owns the process's main thread (the real server, not TestClient)
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(registry.reload_all()))
            hup = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (e.g. TestClient)
            pass
        fatal: list[str] = []

        def loaded(task: asyncio.Task) -> None:
            if task.cancelled() or task.exception() is None:
                return  # (a failure is logged by load_all)
            if hup:  # no model can be served: exit non-zero so an orchestrator restarts or alerts
                fatal.append(registry.error or "model loading failed")
                log.critical("cannot serve, shutting down with exit status %d: %s", EXIT_NO_MODEL, fatal[0])
                signal.raise_signal(signal.SIGTERM)  # uvicorn's graceful shutdown, then the exit below

        for sibling in siblings:
            await sibling.start(service)
        loading = asyncio.create_task(registry.load_all(warm=service.warm_up))
        loading.add_done_callback(loaded)
        for sibling in siblings:  # e.g. gRPC health turns SERVING once every model is loaded and warm
            loading.add_done_callback(lambda _, s=sibling: loop.create_task(s.ready(registry.ready)))
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            loading.cancel()
            for sibling in siblings:
                await sibling.stop()  # calls in flight finish on the service
            service.shutdown()
            if fatal:  # uvicorn would exit 0 after a shutdown; the lifespan is its last step
                logging.shutdown()
                sys.stderr.flush()
                os._exit(EXIT_NO_MODEL)

    # /docs and /redoc with their JS/CSS served from the fastapi-offline package, not a CDN:
    # the service must be browsable on a machine without internet access
    app = FastAPIOffline(title="food-classifier", version="1", lifespan=lifespan, static_url="/docs-assets",
                         description="Classify food photos with ONNX Runtime model bundles.")
    app.state.settings, app.state.metrics = settings, metrics
    app.state.registry, app.state.service, app.state.monitor = registry, service, monitor
    app.state.paths = PathGuard(settings.allow_path_root)  # the seed's GET /predict: HTTP only
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _install_error_handlers(app)
    app.add_middleware(ServingMiddleware, metrics=metrics, settings=settings, routes=router.routes)
    return app
