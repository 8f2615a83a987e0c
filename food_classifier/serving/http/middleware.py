"""One pure-ASGI layer in front of the app: metrics, keys, body limits, request id, and the last line of defence.

Pure ASGI (not BaseHTTPMiddleware) because it runs on every request and must stay cheap. The body
limit is enforced twice: a declared Content-Length over the limit is refused before a byte is read,
and a chunked body is counted as it streams in, so an oversized upload is never held in memory.
Reading the body also has a deadline per part (`body_timeout`, then 408), and a client that hangs up
mid-upload is a 499 and one log line, not an error. Whatever still escapes the app becomes one logged
traceback and a JSON 500 on a connection that stays usable; a request still running when the
graceful-shutdown timeout cancels it gets a JSON 503 (uvicorn's own answers were plain text).

Keys are compared as bytes: the header's raw bytes (or the Basic password's) against the key's UTF-8,
so a non-ASCII key works the same through X-API-Key, Bearer and Basic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.routing import BaseRoute, Match

from food_classifier.serving.auth import AUTH_CHALLENGE, AUTH_MESSAGE, key_matches, presented_key
from food_classifier.serving.errors import (
    AdminDisabled,
    BodyTooLarge,
    ClientDisconnected,
    RequestTimeout,
    ServiceError,
    ShuttingDown,
    Unauthorized,
)
from food_classifier.serving.http.schemas import Error
from food_classifier.serving.metrics import ServingMetrics
from food_classifier.serving.service import new_request_id
from food_classifier.serving.settings import ServeSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("food_classifier.serving")
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})  # probes need no key
ADMIN_TAG = "admin"  # routes tagged so need the admin key


async def send_error(send: Send, exc: ServiceError, headers: dict[str, str] | None = None) -> None:
    """The error as the app would send it (a validated `schemas.Error`), from outside the app."""
    body = Error(error=exc.code, detail=exc.detail).model_dump_json().encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class ServingMiddleware:
    """Reads its limits and the API key from the same `ServeSettings` as the rest of the app."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics, settings: ServeSettings,
                 routes: list[BaseRoute] | None = None):
        self.app = app
        self.routes = routes or []  # to name the endpoint of requests refused before routing (401, 413)
        self.admin_routes = [r for r in self.routes if ADMIN_TAG in (getattr(r, "tags", None) or [])]
        self.metrics = metrics
        key, admin = settings.api_key_value(), settings.admin_key_value()
        self.api_key = key.encode() if key else None
        self.admin_key = admin.encode() if admin else None
        self.max_body = settings.max_body_bytes
        self.max_batch_body = settings.max_batch_body_bytes
        self.body_timeout = settings.body_timeout

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
            if not started:
                await send_error(send_wrapper, exc, exc.headers)
        except asyncio.CancelledError:  # uvicorn's graceful-shutdown timeout cancels what still runs
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if not started:
                exc = ShuttingDown("the server is shutting down and could not finish this request in time")
                await send_error(send_wrapper, exc, {"Connection": "close", "Retry-After": "1"})
        except Exception:  # a bug: one traceback, a JSON 500, and the connection stays usable
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await send_error(send_wrapper, ServiceError("internal error", status=500, code="internal_error"))
        finally:
            self.metrics.in_flight.dec()
            model = (scope.get("state") or {}).get("model", "-")
            if status == ClientDisconnected.status:
                log.info("client disconnected during the request body: %s %s", scope.get("method"),
                         scope.get("path"))
            self.metrics.observe_request(model, self._endpoint(scope), status, time.perf_counter() - start)

    def _endpoint(self, scope: Scope) -> str:
        """The route template (bounded label values), never the raw path."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "unmatched"

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> ServiceError | None:
        """401/403 before the app sees the request, or None."""
        if any(r.matches(scope)[0] == Match.FULL for r in self.admin_routes):
            if self.admin_key is None:
                return AdminDisabled("management endpoints are off: start the server with FOOD_CLASSIFIER_ADMIN_KEY "
                                     "(without it, reload with SIGHUP: kill -HUP <pid>)")
            if not key_matches(presented_key(headers), self.admin_key):
                return Unauthorized("missing or wrong admin key (send it as X-API-Key or Authorization: Bearer)",
                                    headers={"WWW-Authenticate": AUTH_CHALLENGE})
        elif self.api_key is not None and scope["path"] not in OPEN_PATHS:
            if not key_matches(presented_key(headers), self.api_key, self.admin_key):
                return Unauthorized(AUTH_MESSAGE, headers={"WWW-Authenticate": AUTH_CHALLENGE})
        return None

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        refused = self._refusal(scope, headers)
        if refused is not None:
            await send_error(send, refused, refused.headers)
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
        body_done = False

        async def counting_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(self.body_timeout):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(f"no part of the request body arrived for {self.body_timeout:g} s "
                                     f"(received {received} bytes)", headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            elif message["type"] == "http.disconnect":
                raise ClientDisconnected(f"the client disconnected after {received} bytes of the request body")
            return message

        await self.app(scope, counting_receive, send)
