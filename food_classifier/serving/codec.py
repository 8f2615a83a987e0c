"""Decoding shared by every transport that carries images as text (HTTP JSON, OIP JSON, the stream worker's JSON):
one base64 rule (whitespace and a `data:` URL prefix allowed, anything else invalid), one error. Each transport
shows the error in its protocol's shape (HTTP 422, OIP 400, a worker result) but decides nothing itself."""

from __future__ import annotations

import base64
import binascii

from food_classifier.serving.errors import InvalidInput


class InvalidBase64(InvalidInput):
    code = "invalid_base64"


def decode_base64(value: object, where: str) -> bytes:
    """The bytes of a base64 string; "" gives b"" (an empty image: the core's 422 or a batch's error entry)."""
    if not isinstance(value, str):
        raise InvalidBase64(f"{where} must be a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]  # data:image/jpeg;base64,....
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64(f"{where} is not valid base64") from None
