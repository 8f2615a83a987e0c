"""uvicorn's h11 protocol plus what it lacks: a deadline for the request head, and JSON protocol errors.

uvicorn arms its keep-alive timer only after a response, so a connection that sent nothing, or half
a request head, was held forever (500 stalled sockets, none closed after 30 s). This protocol gives
every request head `header_timeout` seconds: an idle new connection is then closed, a partial head
gets a JSON 408 and is closed. h11 (not httptools) because it bounds the head's size
(`max_header_bytes`, a 20 MB header was accepted before); its protocol errors (bad request line,
negative Content-Length, bad chunking, a head over the limit) are answered with the service's JSON
error body (400, or 431 for the size) instead of uvicorn's plain text. The app never sees these
requests. uvicorn passes this class as `http=`; it only extends the documented hooks.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("food_classifier.serving")


def _error_bytes(code: str, detail: str) -> bytes:
    return json.dumps({"error": code, "detail": detail}).encode()


def protocol_class(header_timeout: float, max_header_bytes: int) -> type[asyncio.Protocol]:
    """An H11Protocol subclass with these limits (uvicorn instantiates it per connection)."""

    class ServingProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                self._cancel_head_timer()  # a request is in progress (its body has its own timeout)
            elif self._head_timer is None:
                self._arm_head_timer()  # part of a new head on a kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            partial = bool(self.conn.trailing_data[0])
            if partial:  # h11 cannot answer before a request: write the response ourselves
                body = _error_bytes("request_timeout",
                                    f"the request line and headers did not arrive within {header_timeout:g} s")
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
                log.info("closed a connection that sent a partial request head for %g s", header_timeout)
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            too_large = len(self.conn.trailing_data[0]) > max_header_bytes
            if too_large:
                status, code = 431, "request_header_too_large"
                detail = f"the request line and headers exceed {max_header_bytes} bytes"
            else:
                status, code = 400, "bad_http_request"
                detail = ("malformed HTTP request (request line, header syntax, Content-Length or chunked "
                          "encoding)")
            body = _error_bytes(code, detail)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=status, headers=headers,
                                       reason=http.HTTPStatus(status).phrase.encode()), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return ServingProtocol
