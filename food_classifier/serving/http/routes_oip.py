"""The Open Inference Protocol's REST API (`/v2/...`) on the HTTP port, for KServe and Triton clients.

A thin adapter: it parses the protocol's JSON form or Triton's binary-data extension (a JSON header of
`Inference-Header-Content-Length` bytes, then the raw tensors) into `oip.InferRequest`, calls the one
prediction core (`PredictionService.predict_tensors`: same models, cache, batcher, limits; the API key,
body limit, request id and metrics come from the app's middleware) and writes the answer back in the
form asked for. Errors raised here answer in the protocol's form, `{"error": "message"}`; the ones the
middleware raises before routing (401, 413) keep the service's `{"error": code, "detail": ...}`.
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from food_classifier.serving import oip
from food_classifier.serving.admission import Grant, tensor_body_cost
from food_classifier.serving.codec import InvalidBase64, decode_base64
from food_classifier.serving.errors import BodyTooLarge, RequestTimeout, ServiceError, UnsupportedMediaType
from food_classifier.serving.http import schemas
from food_classifier.serving.oip import BadTensor
from food_classifier.serving.registry import ModelRegistry
from food_classifier.serving.service import PredictionService, new_request_id

router = APIRouter(tags=["open inference protocol"])
HEADER = "inference-header-content-length"
OFFLOAD_BYTES = 64 * 1024  # bodies above this are parsed in the decode pool, off the event loop


class OipError(schemas.Wire):
    """The protocol's error body."""

    error: str


class ServerMetadata(schemas.Wire):
    name: str
    version: str
    extensions: list[str]


class ServerLive(schemas.Wire):
    live: bool


class ServerReady(schemas.Wire):
    ready: bool


class TensorMetadata(schemas.Wire):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(schemas.Wire):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(schemas.Wire):
    name: str
    ready: bool


class OutputTensor(schemas.Wire):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None  # absent when the tensor travels as binary data
    parameters: dict[str, Any] | None = None  # binary_data_size, for binary data


class InferResponse(schemas.Wire):
    model_name: str
    model_version: str
    id: str  # the request's id, else the X-Request-ID
    parameters: dict[str, Any]  # request_id: names the prediction for feedback (+ "-i" per image when N > 1)
    outputs: list[OutputTensor]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Input(_Lenient):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None


class _Output(_Lenient):
    name: str
    parameters: dict[str, Any] = {}


class _InferBody(_Lenient):
    id: str = ""
    parameters: dict[str, Any] = {}
    inputs: list[_Input]
    outputs: list[_Output] = []


def _errors(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": OipError, "description": desc} for code, desc in described.items()}


MODEL_ERRORS = schemas.AUTH | _errors({404: "Unknown model or version", 503: "Models still loading"})
INFER_ERRORS = MODEL_ERRORS | _errors({400: "Invalid tensors or parameters", 413: "Body, image or batch too large",
                                       408: "A large JSON tensor body did not arrive within --body-timeout",
                                       415: "Not a readable image / unsupported content encoding"})
_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string", "enum": ["image", "pixels"]}, "shape": {"type": "array", "items": {"type": "integer"}},
    "datatype": {"type": "string"}, "parameters": {"type": "object"}, "data": {"type": "array"}}}
INFER_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object", "description": "top_k, threshold, reject_not_food"},
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1,
                   "description": "image (BYTES, base64 in JSON) or pixels"},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "parameters": {"type": "object"}}}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
                                            "Binary-data extension: the JSON header, then raw tensors"}}}}}
INFER_OK = {200: {"description": "Output tensors; binary ones after a JSON header of "
                                 "Inference-Header-Content-Length bytes",
                  "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _oip_errors(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Errors of this router in the protocol's form."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except ServiceError as exc:
            return JSONResponse(OipError(error=exc.detail).model_dump(), exc.status, headers=exc.headers)

    return wrapper


def _svc(request: Request) -> PredictionService:
    return request.app.state.service


def _model(request: Request, name: str, version: str | None) -> Any:
    reg: ModelRegistry = request.app.state.registry
    model = oip.check_version(reg.get(name), version)
    request.state.model = model.name  # the metrics' model label (a loaded model only)
    return model


@router.get("/v2", responses=schemas.AUTH)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata.model_validate(oip.server_metadata())


@router.get("/v2/health/live")
@router.head("/v2/health/live", include_in_schema=False)  # load balancers probe with HEAD, as /healthz
async def server_live() -> ServerLive:
    """The process is up (no API key needed, like /healthz)."""
    return ServerLive(live=True)


@router.get("/v2/health/ready", responses={503: {"model": ServerReady, "description": "Models still loading"}})
@router.head("/v2/health/ready", include_in_schema=False)
async def server_ready(request: Request) -> Any:
    """Every model is loaded and warm (no API key needed, like /readyz)."""
    ready = request.app.state.registry.ready
    return JSONResponse(ServerReady(ready=ready).model_dump(), 200 if ready else 503)


@router.get("/v2/models/{name}", responses=MODEL_ERRORS)
@router.get("/v2/models/{name}/versions/{version}", responses=MODEL_ERRORS)
@_oip_errors
async def model_metadata(request: Request, name: str, version: str | None = None) -> ModelMetadata:
    """Input `image` (BYTES [-1]; or `pixels`, FP32 [-1, 3, crop, crop]); outputs `label`, `label_idx`,
    `probabilities`."""
    return ModelMetadata.model_validate(oip.model_metadata(_model(request, name, version)))


@router.get("/v2/models/{name}/ready", responses=MODEL_ERRORS)
@router.get("/v2/models/{name}/versions/{version}/ready", responses=MODEL_ERRORS)
@_oip_errors
async def model_ready(request: Request, name: str, version: str | None = None) -> ModelReady:
    """200 when the model is loaded and warm; 503 while loading, 404 for an unknown model."""
    _model(request, name, version)
    return ModelReady(name=name, ready=True)


@router.post("/v2/models/{name}/infer", responses=INFER_ERRORS | INFER_OK, openapi_extra=INFER_BODY)
@router.post("/v2/models/{name}/versions/{version}/infer", responses=INFER_ERRORS | INFER_OK,
             openapi_extra=INFER_BODY)
@_oip_errors
async def infer(request: Request, name: str, version: str | None = None) -> InferResponse:
    """Classify the photos of input `image` (BYTES: base64 strings in JSON, raw with binary data) or the
    preprocessed crops of input `pixels` (FP32). Parameters `top_k`, `threshold` and `reject_not_food`; per output
    `binary_data` and `classification`."""
    svc = _svc(request)
    model = _model(request, name, version)  # 404 / 503 before reading the body
    cost = tensor_body_cost(request.headers.get("content-length"), request.headers.get(HEADER),
                            request.headers.get("content-encoding", "identity").strip().lower() != "identity",
                            svc.settings.max_body_bytes)
    if cost <= svc.budget.small:  # as a small image: never waits
        return await _infer(request, svc, model, None)
    grant = await svc.budget.acquire(cost, slot=False)  # before the body is read: waiting ones stay with clients
    try:
        return await _infer(request, svc, model, grant)
    finally:
        grant.release()


async def _infer(request: Request, svc: PredictionService, model: Any, grant: Grant | None) -> Response:
    if grant is None:
        body = await _body(request, svc.settings.max_body_bytes)
    else:  # a slow sender must not sit on the budget: the whole body within --body-timeout
        try:
            async with asyncio.timeout(svc.settings.body_timeout):
                body = await _body(request, svc.settings.max_body_bytes)
        except TimeoutError:
            raise RequestTimeout(f"a tensor body of this size must arrive within {svc.settings.body_timeout:g} s "
                                 "(it holds decode memory meanwhile); send it faster, smaller, or with the "
                                 "binary-data extension", headers={"Connection": "close"}) from None
    parse = functools.partial(_parse, body, request.headers.get(HEADER))
    req = parse() if len(body) < OFFLOAD_BYTES else \
        await asyncio.get_running_loop().run_in_executor(svc.decode_pool, parse)
    if grant is not None and not (len(req.inputs) == 1 and req.inputs[0].name == oip.PIXELS):
        grant.release()  # photos are decoded under grants of their own
    rid = getattr(request.state, "request_id", None) or new_request_id()  # the middleware's X-Request-ID
    model, tensors = await oip.infer(svc, model, req, rid)
    binary_default = req.parameters.get("binary_data_output") is True
    binary = [t.parameters.get("binary_data", binary_default) is True for t in tensors]
    answer = {"model_name": model.name, "model_version": model.version, "id": req.id or rid,
              "parameters": {"request_id": rid},
              "outputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in tensors]}
    blobs = []
    for out, t, as_binary in zip(answer["outputs"], tensors, binary, strict=True):
        if as_binary:
            blobs.append(oip.raw(t))
            out["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            out["data"] = [b.decode() for b in t.data] if isinstance(t.data, list) else t.data.reshape(-1).tolist()
    header = InferResponse.model_validate(answer).model_dump_json(exclude_none=True).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


async def _body(request: Request, limit: int) -> bytes:
    """The body, inflated if the client compressed it (tritonclient can), never past `limit` bytes."""
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"unsupported Content-Encoding {encoding!r}: send gzip, deflate or none")
    inflate = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflate.decompress(body, limit + 1)
    except zlib.error as e:
        raise BadTensor(f"body is not valid {encoding} data ({e})") from None
    if len(out) > limit:
        raise BodyTooLarge(f"request body inflates past the limit of {limit} bytes")
    if not inflate.eof:
        raise BadTensor(f"body is truncated {encoding} data")
    return out


def _parse(body: bytes, header_length: str | None) -> oip.InferRequest:
    """The JSON form, or a JSON header followed by binary tensors (in input order)."""
    size = len(body)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 < size <= len(body):
            raise BadTensor(f"Inference-Header-Content-Length {header_length!r} does not fit a body of "
                            f"{len(body)} bytes")
    try:
        head = _InferBody.model_validate_json(body[:size])
    except ValidationError as e:
        where = e.errors()[0]
        raise BadTensor(f"invalid inference request: {'.'.join(map(str, where['loc'])) or 'body'}: "
                        f"{where['msg']}") from None
    tail, pos = memoryview(body)[size:], 0
    inputs = []
    for t in head.inputs:
        n = t.parameters.get("binary_data_size")
        if n is not None:
            if not isinstance(n, int) or isinstance(n, bool) or n < 0 or pos + n > len(tail):
                raise BadTensor(f"input {t.name!r}: binary_data_size {n!r} does not fit the "
                                f"{len(tail) - pos} bytes of binary data left")
            inputs.append(oip.from_raw(t.name, t.datatype, t.shape, tail[pos:pos + n], t.parameters))
            pos += n
        elif t.data is None:
            raise BadTensor(f"input {t.name!r} has neither data nor binary_data_size")
        elif t.datatype == "BYTES":
            inputs.append(oip.bytes_tensor(t.name, t.shape, [_b64(v, t.name) for v in _flat(t.data)], t.parameters))
        else:
            inputs.append(oip.from_values(t.name, t.datatype, t.shape, t.data, t.parameters))
    if pos != len(tail):
        raise BadTensor(f"{len(tail) - pos} bytes of binary data after the last input")
    outputs = [oip.RequestedOutput(o.name, o.parameters.get("classification", 0), o.parameters)
               for o in head.outputs]
    return oip.InferRequest(inputs, outputs, head.parameters, head.id)


def _flat(values: Any) -> list[Any]:
    if not isinstance(values, list):
        return [values]
    return [x for v in values for x in _flat(v)]


def _b64(value: Any, name: str) -> bytes:
    try:
        return decode_base64(value, f"input {name!r}: a BYTES element")
    except InvalidBase64 as e:  # the protocol's own error shape (400 invalid_tensor), the core's one rule
        raise BadTensor(f"{e.detail}: BYTES elements in the JSON form are the photo's bytes as base64; or send "
                        "them raw with the binary-data extension") from None

