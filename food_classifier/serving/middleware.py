"""One pure-ASGI layer in front of the app: metrics, API key, body-size limit, request id.

Pure ASGI (not BaseHTTPMiddleware) because it runs on every request and must stay cheap. The body
limit is enforced twice: a declared Content-Length over the limit is refused before a byte is read,
and a chunked body is counted as it streams in, so an oversized upload is never held in memory.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.routing import BaseRoute, Match

from food_classifier.serving.errors import BodyTooLarge, ServiceError, Unauthorized
from food_classifier.serving.metrics import ServingMetrics
from food_classifier.serving.schemas import Error
from food_classifier.serving.service import new_request_id
from food_classifier.serving.settings import ServeSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})  # probes need no key
AUTH_CHALLENGE = 'Basic realm="food-classifier", charset="UTF-8"'
AUTH_MESSAGE = "missing or wrong API key (send X-API-Key or Authorization: Bearer)"  # also the gRPC message


async def send_error(send: Send, exc: ServiceError, headers: dict[str, str] | None = None) -> None:
    """The error as the app would send it (a validated `schemas.Error`), from outside the app."""
    body = Error(error=exc.code, detail=exc.detail).model_dump_json().encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The key from `X-API-Key`, `Authorization: Bearer KEY` or Basic auth (password = key)."""
    if b"x-api-key" in headers:
        return headers[b"x-api-key"].decode("latin-1")
    auth = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


class ServingMiddleware:
    """Reads its limits and the API key from the same `ServeSettings` as the rest of the app."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics, settings: ServeSettings,
                 routes: list[BaseRoute] | None = None):
        self.app = app
        self.routes = routes or []  # to name the endpoint of requests refused before routing (401, 413)
        self.metrics = metrics
        key = settings.api_key_value()
        self.api_key = key.encode() if key else None
        self.max_body = settings.max_body_bytes
        self.max_batch_body = settings.max_batch_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False
        request_id = new_request_id()  # every response carries it (X-Request-ID); predictions in their body too
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self._handle(scope, receive, send_wrapper)
        except ServiceError as exc:  # raised by the counting receive after routing
            if started:
                raise
            await send_error(send_wrapper, exc, exc.headers)
        finally:
            self.metrics.in_flight.dec()
            model = (scope.get("state") or {}).get("model", "-")
            self.metrics.observe_request(model, self._endpoint(scope), status, time.perf_counter() - start)

    def _endpoint(self, scope: Scope) -> str:
        """The route template (bounded label values), never the raw path."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "unmatched"

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            key = presented_key(headers)
            if key is None or not hmac.compare_digest(key.encode(), self.api_key):
                exc = Unauthorized(AUTH_MESSAGE, headers={"WWW-Authenticate": AUTH_CHALLENGE})
                await send_error(send, exc, exc.headers)
                return
        limit = self.max_batch_body if scope["path"].endswith("/predict-batch") else self.max_body
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False
            if too_big:
                exc = BodyTooLarge(f"request body is {int(declared)} bytes, limit is {limit}")
                await send_error(send, exc, {"Connection": "close"})
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)
