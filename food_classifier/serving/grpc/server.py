"""The gRPC transport: `food_classifier.v1.Classifier`, the Open Inference Protocol's
`inference.GRPCInferenceService` (grpc/oip.py), health and reflection, on the HTTP server's loop.

A thin adapter: it turns a `ClassifyRequest` into a `PredictionService` call and the answer into a
`ClassifyResponse`. It never decodes an image or runs a model, so gRPC shares the models, batcher,
decode pool, limits, monitoring and metrics with HTTP. grpc.aio runs on the same asyncio loop as
uvicorn (started from the app's lifespan), so no thread or lock sits between the two.

Errors keep the HTTP API's messages and codes: the status maps to a gRPC code (`STATUS_CODES`) and
the HTTP error code and status travel as trailing metadata `fc-error` and `fc-status`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from food_classifier.answer import Answer, Options, OptionsError
from food_classifier.serving.auth import AUTH_MESSAGE, key_matches, presented_key
from food_classifier.serving.errors import BodyTooLarge, InvalidInput, ServiceError
from food_classifier.serving.metrics import ServingMetrics
from food_classifier.serving.service import ImageUpload, PredictionService
from food_classifier.serving.settings import ServeSettings
from food_classifier.v1 import load_stubs

pb2, pb2_grpc = load_stubs(server=True)
import grpc  # noqa: E402  (after load_stubs: a missing extra is one clear error)
from google.protobuf.struct_pb2 import Struct  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection  # noqa: E402

from food_classifier.serving.grpc import oip  # noqa: E402

log = logging.getLogger("food_classifier.serving")
SERVICE = pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
OPEN_PREFIX = f"/{health.SERVICE_NAME}/"  # health checks need no key, like /healthz
MESSAGE_OVERHEAD = 64 * 1024  # room for the other fields of a ClassifyRequest beside the image
C = grpc.StatusCode
STATUS_CODES = {400: C.INVALID_ARGUMENT, 401: C.UNAUTHENTICATED, 403: C.PERMISSION_DENIED, 404: C.NOT_FOUND,
                409: C.FAILED_PRECONDITION, 413: C.RESOURCE_EXHAUSTED, 415: C.INVALID_ARGUMENT,
                422: C.INVALID_ARGUMENT, 429: C.RESOURCE_EXHAUSTED, 503: C.UNAVAILABLE}


def _trailer(code: str, status: int) -> tuple[tuple[str, str], ...]:
    """The HTTP API's error code and status, for clients that branch on them (`client.GrpcClient`)."""
    return (("fc-error", code), ("fc-status", str(status)))


def _response(a: Answer) -> Any:
    """An `Answer` as a ClassifyResponse: the task gRPC API's one wire function."""
    return pb2.ClassifyResponse(
        label=a.label, label_idx=a.label_idx, confidence=a.confidence,
        top_k=[pb2.TopK(label=t.label, probability=t.probability) for t in a.top_k],
        abstained=a.abstained, reason=a.reason or "", stage=a.stage, model=a.model, model_version=a.model_version,
        cache=a.cache, request_id=a.request_id, timing=pb2.Timing(**a.timings.to_dict()))


def _model_info(info: dict[str, Any]) -> Any:
    metrics, prep = Struct(), Struct()
    metrics.update(info["metrics"])
    prep.update(info["preprocessing"])
    return pb2.ModelInfo(
        name=info["name"], version=info["version"], is_default=info["default"], variant=info["variant"],
        variants=info["variants"], labels=info["labels"], arch=info["arch"], created_at=info["created_at"],
        metrics=metrics, preprocessing=prep, temperature=info["temperature"],
        abstain_threshold=info["abstain_threshold"], builtin=info["builtin"], description=info["description"],
        loaded_at=info["loaded_at"])


class ClassifierServicer(pb2_grpc.ClassifierServicer):
    def __init__(self, service: PredictionService, metrics: ServingMetrics | None = None):
        self.service = service
        self.metrics = metrics
        self.limit = service.settings.max_body_bytes
        self.stream_window = service.settings.max_batch_images  # answers in flight per stream

    def _observe(self, method: str, code: grpc.StatusCode, start: float) -> None:
        if self.metrics:
            name = code.name
            self.metrics.grpc_requests.labels(method, name).inc()
            self.metrics.grpc_latency.labels(method, name).observe(time.perf_counter() - start)

    async def _predict(self, req: Any) -> Answer:
        try:
            options = Options(top_k=req.top_k if req.HasField("top_k") else None,
                              threshold=req.threshold if req.HasField("threshold") else None,
                              reject_not_food=req.reject_not_food if req.HasField("reject_not_food") else True)
        except OptionsError as e:
            raise InvalidInput(str(e)) from None
        if len(req.image) > self.limit:
            raise BodyTooLarge(f"request body is {len(req.image)} bytes, limit is {self.limit}")
        return await self.service.predict(req.model or None, ImageUpload(req.image), options)

    async def Classify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        start = time.perf_counter()
        try:
            res = await self._predict(request)
        except ServiceError as exc:
            code = STATUS_CODES.get(exc.status, C.UNKNOWN)
            self._observe("Classify", code, start)
            await context.abort(code, exc.detail, trailing_metadata=_trailer(exc.code, exc.status))
        self._observe("Classify", C.OK, start)
        return _response(res)

    async def _answer(self, req: Any) -> Any:
        try:
            return _response(await self._predict(req))
        except ServiceError as exc:  # one failed image is an answer, the stream goes on
            return pb2.ClassifyResponse(error=pb2.Error(error=exc.code, detail=exc.detail, status=exc.status))

    async def ClassifyStream(self, request_iterator: AsyncIterator[Any],  # noqa: N802
                             context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """Answers in request order; up to `stream_window` images of one stream are in the service at
        once, so they share micro-batches while the client keeps sending."""
        start, code = time.perf_counter(), C.CANCELLED
        pending: asyncio.Queue = asyncio.Queue(self.stream_window)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await pending.put(asyncio.ensure_future(self._answer(req)))
            except Exception as exc:  # the client went away mid-stream
                await pending.put(exc)
                return
            await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await pending.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield await item
            code = C.OK
        finally:
            reader.cancel()
            while not pending.empty():
                item = pending.get_nowait()
                if isinstance(item, asyncio.Future):
                    item.cancel()
            self._observe("ClassifyStream", code, start)

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        start = time.perf_counter()
        reg = self.service.registry
        models = reg.models() if reg.ready else []
        answer = pb2.ListModelsResponse(default_model=reg.default_name or "",
                                        models=[_model_info(m.info(m.name == reg.default_name)) for m in models])
        self._observe("ListModels", C.OK, start)
        return answer


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call (UNAUTHENTICATED)."""

    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(C.UNAUTHENTICATED, AUTH_MESSAGE, trailing_metadata=_trailer("unauthorized", 401))

    make: Callable[..., grpc.RpcMethodHandler] = {
        (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """The HTTP API's key rules on `authorization` (Bearer or Basic) or `x-api-key` metadata: the API key,
    or the admin key, which passes wherever the API key does (as over HTTP)."""

    def __init__(self, key: str, admin_key: str | None = None):
        self.key = key.encode()
        self.admin_key = admin_key.encode() if admin_key else None

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIX) or details.method in oip.OPEN_METHODS:
            return handler
        headers = {k.encode(): v.encode() for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        if key_matches(presented_key(headers), self.key, self.admin_key):
            return handler
        return _denied(handler)


def _address(settings: ServeSettings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{host}:{settings.grpc_port}"


def check_port(settings: ServeSettings) -> None:
    """Fail before the server starts (a one-line error, not a lifespan traceback) if the port is taken."""
    if not settings.grpc_port:
        return
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no conflict
        try:
            s.bind((settings.host, settings.grpc_port))
        except OSError as e:
            raise OSError(f"cannot listen for gRPC on {_address(settings)}: {e.strerror or e}") from None


class GrpcServer:
    """The running server; `serving` flips the health status, `stop` drains calls in flight."""

    def __init__(self, server: grpc.aio.Server, health_servicer: Any, port: int):
        self.server, self.health, self.port = server, health_servicer, port

    @classmethod
    async def start(cls, service: PredictionService, settings: ServeSettings,
                    metrics: ServingMetrics | None = None) -> GrpcServer:
        key = settings.api_key_value()
        options = [("grpc.max_receive_message_length", settings.max_body_bytes + MESSAGE_OVERHEAD),
                   ("grpc.so_reuseport", 0)]  # a port in use is an error, not a second silent listener
        interceptors = [ApiKeyInterceptor(key, settings.admin_key_value())] if key else []
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(service, metrics), server)
        oip.pb2_grpc.add_GRPCInferenceServiceServicer_to_server(  # the Open Inference Protocol, same core
            oip.OipServicer(service, STATUS_CODES, _trailer, metrics), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection([SERVICE, oip.SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            server)
        try:
            port = server.add_insecure_port(_address(settings))
        except RuntimeError as e:  # taken since check_port
            raise OSError(f"cannot listen for gRPC on {_address(settings)}: {e}") from None
        self = cls(server, health_servicer, port)
        await self.serving(False)
        await server.start()
        log.info("gRPC listening on %s (port %d)", _address(settings), port)
        return self

    async def serving(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace: float = 10.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


class GrpcTransport:
    """gRPC beside HTTP (serving/compose.py hands it to `create_app` as a sibling): the port is checked when it is
    built, so a taken port or a missing extra is a one-line startup error, not a lifespan traceback."""

    def __init__(self, settings: ServeSettings):
        check_port(settings)
        self.settings = settings
        self.server: GrpcServer | None = None

    @property
    def port(self) -> int | None:
        return self.server.port if self.server else None

    async def start(self, service: PredictionService) -> None:
        self.server = await GrpcServer.start(service, self.settings, service.metrics)

    async def ready(self, ready: bool) -> None:
        if self.server is not None:
            await self.server.serving(ready)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=10.0)
