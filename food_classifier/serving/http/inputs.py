"""Getting image bytes out of a request: multipart upload, raw body, or JSON with base64.

Clients differ: browsers and curl send multipart, embedded devices post the raw JPEG, and some
gateways can only send JSON. All three end up as `ImageUpload`s; the body-size limit has already
been enforced by the middleware while the body streamed in. A Content-Type that is not
`type/subtype` (e.g. `;;;`) or not one of these is a 415; an empty image is a 422 `missing_image`
whichever way it came (raw body, multipart file, base64 string).
"""

from __future__ import annotations

import json
import re

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from food_classifier.serving.codec import decode_base64
from food_classifier.serving.errors import InvalidInput, MissingImage, TooManyImages, UnsupportedMediaType
from food_classifier.serving.service import ImageUpload

RAW_TYPES = ("image/", "application/octet-stream")
JSON_FIELDS = ("image", "image_base64", "b64")
TOKEN = r"[!#$%&'*+.^_`|~0-9a-z-]+"
MEDIA_TYPE = re.compile(f"{TOKEN}/{TOKEN}")
SUPPORTED = "send multipart/form-data, an image/* body, or JSON with a base64 'image' field"


def _media_type(request: Request) -> str:
    """The media type, lower-cased; "" when there is no Content-Type (a raw body); 415 when malformed."""
    header = request.headers.get("content-type")
    if header is None:
        return ""
    media = header.split(";", 1)[0].strip().lower()
    if not MEDIA_TYPE.fullmatch(media):
        raise UnsupportedMediaType(f"malformed Content-Type {header[:100]!r}: {SUPPORTED}")
    return media


def _b64(value: object, where: str) -> bytes:
    return decode_base64(value, where)


async def _json(request: Request) -> dict:
    try:
        payload = json.loads(await request.body())
    except RecursionError:  # the C parser's guard: a few KB of [[[[... must be a 422, not a 500
        raise InvalidInput("body is not valid JSON: nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer over Python's digit limit
        raise InvalidInput(f"body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise InvalidInput("JSON body must be an object", code="invalid_json")
    return payload


async def _files(request: Request, max_files: int) -> list[ImageUpload]:
    try:
        form = await request.form(max_files=max_files, max_fields=100)
    except HTTPException as e:
        if "Too many files" in str(e.detail):
            raise TooManyImages(f"at most {max_files} images per request") from None
        raise InvalidInput(f"malformed multipart body: {e.detail}", code="invalid_multipart") from None
    try:
        uploads = []
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append(ImageUpload(await value.read(), value.filename))
        return uploads
    finally:
        await form.close()


async def read_images(request: Request, max_images: int) -> list[ImageUpload]:
    """All images in the request, in order (1 for a raw body)."""
    media = _media_type(request)
    if media == "multipart/form-data":
        images = await _files(request, max_images)
    elif media == "application/json":
        payload = await _json(request)
        if isinstance(payload.get("images"), list):
            images = [ImageUpload(_b64(v, f"images[{i}]")) for i, v in enumerate(payload["images"])]
        else:
            field = next((f for f in JSON_FIELDS if f in payload), None)
            if field is None:
                raise MissingImage(f"JSON body needs a base64 field: one of {', '.join(JSON_FIELDS)} or 'images'")
            images = [ImageUpload(_b64(payload[field], field))]
    elif media == "application/x-www-form-urlencoded":
        images = []  # a form that cannot carry a file: "missing file field"
    elif media.startswith(RAW_TYPES) or media == "":
        body = await request.body()
        images = [ImageUpload(body)] if body else []
    else:
        raise UnsupportedMediaType(f"unsupported content type {media!r}: {SUPPORTED}")
    if not images:
        raise MissingImage("no image in the request: send a file field (multipart), a raw image body, "
                           "or JSON with a base64 'image' field")
    if len(images) > max_images:
        raise TooManyImages(f"{len(images)} images, at most {max_images} per request")
    return images


async def read_image(request: Request) -> ImageUpload:
    """The one image of a single-image request (the first file, if several were sent)."""
    return (await read_images(request, max_images=16))[0]
