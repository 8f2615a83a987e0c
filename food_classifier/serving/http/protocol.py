"""uvicorn's h11 protocol plus what it lacks: a deadline for the request head, and JSON protocol errors.

uvicorn arms its keep-alive timer only after a response, so a connection that sent nothing, or half
a request head, was held forever (500 stalled sockets, none closed after 30 s). This protocol gives
every request head `header_timeout` seconds: an idle new connection is then closed, a partial head
gets a JSON 408 and is closed. h11 (not httptools) because it bounds the head's size
(`max_header_bytes`, a 20 MB header was accepted before); its protocol errors (bad request line,
negative Content-Length, bad chunking, a head over the limit) are answered with the service's JSON
error body (400, or 431 for the size) instead of uvicorn's plain text. The app never sees these
requests. And a lingering close: when the app answers before the body has arrived (413 on the
declared size, 408) and closes, the connection is half-closed and the rest of the body read and
dropped for up to `LINGER_SECONDS`, because closing a socket with unread data sends a reset that
destroys the answer on its way (seen in the soak: clients got a connection error, not the 413).
uvicorn passes this class as `http=`; it only extends the protocol's hooks.
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
LINGER_SECONDS = 5.0


class _LingeringTransport:
    """The connection's transport, except that `close` with request body still to come half-closes, keeps
    reading (the protocol drops the data) until the client is done or `LINGER_SECONDS` pass, then closes."""

    def __init__(self, transport: asyncio.Transport, protocol: Any):
        self._transport, self._protocol, self._closing = transport, protocol, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        t = self._transport
        if self._protocol.conn.their_state is h11.SEND_BODY and t.can_write_eof() and not t.is_closing():
            self._protocol.lingering = True
            t.write_eof()
            t.resume_reading()
            self._protocol.loop.call_later(LINGER_SECONDS, t.close)
        else:
            t.close()


def _error_response(status: int, code: str, detail: str) -> bytes:
    """A complete HTTP/1.1 response carrying the service's JSON error body, closing the connection."""
    body = json.dumps({"error": code, "detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def protocol_class(header_timeout: float, max_header_bytes: int) -> type[asyncio.Protocol]:
    """An H11Protocol subclass with these limits (uvicorn instantiates it per connection)."""

    class ServingProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        lingering = False

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(_LingeringTransport(transport, self))
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            if self.lingering:
                return  # the rest of a body nobody will read
            if self.conn.their_state is h11.IDLE and self._head_too_large(data):
                self._answer(431, "request_header_too_large",
                             f"the request line and headers exceed {max_header_bytes} bytes")
                return
            super().data_received(data)
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                self._cancel_head_timer()  # a request is in progress (its body has its own timeout)
            elif self._head_timer is None:
                self._arm_head_timer()  # part of a new head on a kept-alive connection

        def _head_too_large(self, data: bytes) -> bool:
            """h11 bounds only a head still incomplete; one that arrives whole in a read can be any size."""
            pending = self.conn.trailing_data[0] + data
            end = pending.find(b"\r\n\r\n")
            return (len(pending) if end < 0 else end) > max_header_bytes

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _answer(self, status: int, code: str, detail: str) -> None:
            """Answer before (or instead of) a parsed request, then close: h11 cannot send here."""
            self._cancel_head_timer()
            if not self.transport.is_closing():
                self.transport.write(_error_response(status, code, detail))
                self.transport.close()

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:
                log.info("closing a connection that sent a partial request head for %g s", header_timeout)
                self._answer(408, "request_timeout",
                             f"the request line and headers did not arrive within {header_timeout:g} s")
            else:  # an idle connection: close quietly, as the keep-alive timeout does
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            if len(self.conn.trailing_data[0]) > max_header_bytes:  # h11's own limit on an incomplete head
                self._answer(431, "request_header_too_large",
                             f"the request line and headers exceed {max_header_bytes} bytes")
            else:
                self._answer(400, "bad_http_request", "malformed HTTP request (request line, header syntax, "
                                                      "Content-Length or chunked encoding)")

    return ServingProtocol
