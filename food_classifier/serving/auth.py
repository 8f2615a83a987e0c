"""API and admin keys, as every transport checks them (HTTP middleware, gRPC interceptor): one place, so a key
that passes one transport passes the other.

Keys are compared as bytes: the header's raw bytes (or the Basic password's) against the key's UTF-8, so a
non-ASCII key works the same through X-API-Key, Bearer and Basic.
"""

from __future__ import annotations

import base64
import binascii
import hmac

AUTH_CHALLENGE = 'Basic realm="food-classifier", charset="UTF-8"'
AUTH_MESSAGE = "missing or wrong API key (send X-API-Key or Authorization: Bearer)"


def presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The key's bytes from `X-API-Key`, `Authorization: Bearer KEY` or Basic auth (password = key)."""
    if b"x-api-key" in headers:
        return headers[b"x-api-key"]
    scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() == b"bearer":
        return value.strip()
    if scheme.lower() == b"basic":
        try:
            return base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return None
    return None


def key_matches(key: bytes | None, *wanted: bytes | None) -> bool:
    """Constant-time compare of the presented key's bytes with any of the wanted keys (HTTP and gRPC)."""
    return key is not None and any(w is not None and hmac.compare_digest(key, w) for w in wanted)
