"""The Open Inference Protocol (KServe / Triton "v2") without a transport: tensors in, tensors out.

REST (`routes_oip.py`) and gRPC (`grpc/oip.py`) parse their wire format into an `InferRequest` of
`Tensor`s, and this module turns it into a call of the one prediction core and the answers into output
tensors. The model, seen through the protocol:

- inputs (exactly one): `image` BYTES [N] - encoded photos (JPEG, PNG...), decoded by the core like
  any upload; or `pixels` FP32 [N, 3, crop, crop] - crops already preprocessed with the bundle's
  spec, which skip decoding (same cache, batcher, model and limits);
- outputs: `label` BYTES [N] (a class, or "unsure" / "not_food"), `label_idx` INT64 [N], `probabilities`
  FP32 [N, C] (calibrated), `stage` INT64 [N] (the cascade stage that answered), `reason` BYTES [N] (why it
  abstained: "unsure", "not_food", or empty). With Triton's classification extension (`classification: k` on the
  requested output, or the request parameter `top_k`), `probabilities` is instead BYTES [N, k] of
  "probability:index:label", best first.
- request parameters: `top_k` (1-1000), `threshold` (0-1) and `reject_not_food` (bool), checked as the HTTP
  API checks them.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np

from food_classifier.answer import Answer, Options, OptionsError
from food_classifier.serving.errors import ServiceError, TooManyImages, UnknownModel
from food_classifier.serving.registry import LoadedModel

if TYPE_CHECKING:
    from food_classifier.serving.service import PredictionService

IMAGE, PIXELS = "image", "pixels"
LABEL, LABEL_IDX, PROBABILITIES, STAGE, REASON = "label", "label_idx", "probabilities", "stage", "reason"
OUTPUTS = (LABEL, LABEL_IDX, PROBABILITIES, STAGE, REASON)
PLATFORM = "onnxruntime_onnx"  # Triton's name for an ONNX model run by ONNX Runtime
EXTENSIONS = ["binary_tensor_data", "classification", "parameters"]
DTYPES: dict[str, np.dtype] = {name: np.dtype(t).newbyteorder("<") for name, t in {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
    "FP32": np.float32, "FP64": np.float64}.items()}  # + BYTES: a list of bytes objects


class BadTensor(ServiceError):
    """A request the protocol cannot take (wrong input name, type, shape, parameter): 400, as Triton."""

    status, code = 400, "invalid_tensor"


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]  # BYTES: the elements, flattened row-major
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    classification: int = 0  # > 0: the top-k as "probability:index:label" strings
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] = field(default_factory=list)  # empty: every output
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str = ""


def server_metadata() -> dict[str, Any]:
    try:
        version = metadata.version("food-classifier")
    except metadata.PackageNotFoundError:  # running from a source tree
        version = "0+unknown"
    return {"name": "food-classifier", "version": version, "extensions": EXTENSIONS}


def check_version(model: LoadedModel, version: str | None) -> LoadedModel:
    """The protocol may name a version: only the one being served exists."""
    if version and version != model.version:
        raise UnknownModel(f"model {model.name!r} has no version {version!r} being served "
                           f"(serving {model.version!r})")
    return model


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    return {"name": model.name, "versions": [model.version], "platform": PLATFORM,
            "inputs": [{"name": IMAGE, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": LABEL, "datatype": "BYTES", "shape": [-1]},
                        {"name": LABEL_IDX, "datatype": "INT64", "shape": [-1]},
                        {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(model.labels)]},
                        {"name": STAGE, "datatype": "INT64", "shape": [-1]},
                        {"name": REASON, "datatype": "BYTES", "shape": [-1]}]}


# --- tensor bytes -----------------------------------------------------------------------------------
MAX_DIMS = 32  # numpy's own limit is 64 (32 before numpy 2)
MAX_ELEMENTS = 2**31 - 1  # per tensor; far above any body the server takes, far below numpy's index range


def elements(shape: list[int]) -> int:
    """The element count of `shape`, exactly (never `np.prod`, which wraps at 2**64 silently), or a
    400 for a shape no request body could fill."""
    if len(shape) > MAX_DIMS:
        raise BadTensor(f"shape of {len(shape)} dimensions: at most {MAX_DIMS}")
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise BadTensor(f"shape {_short(shape)}: every dimension must be a whole number >= 0")
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:  # zero dims left out: numpy refuses [0, 2**62] too
        raise BadTensor(f"shape {_short(shape)}: more than {MAX_ELEMENTS:,} elements")
    return math.prod(shape)


def _short(value: Any, limit: int = 200) -> str:
    """A value as echoed in an error message: never more than `limit` characters of it."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def split_bytes(raw: bytes | memoryview, name: str) -> list[bytes]:
    """BYTES elements from their binary form: each a 4-byte little-endian length, then the bytes."""
    out, pos, raw = [], 0, memoryview(raw)
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadTensor(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise BadTensor(f"input {name!r}: a BYTES element says {n} bytes, only {len(raw) - pos - 4} follow")
        out.append(bytes(raw[pos + 4:pos + 4 + n]))
        pos += 4 + n
    return out


def join_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def from_raw(name: str, datatype: str, shape: list[int], raw: bytes | memoryview,
             parameters: dict[str, Any] | None = None) -> Tensor:
    """A tensor from its binary form (REST binary extension, gRPC raw_input_contents)."""
    n = elements(shape)
    if datatype == "BYTES":
        data: np.ndarray | list[bytes] = split_bytes(raw, name)
        count = len(data)
    elif datatype in DTYPES:
        dtype = DTYPES[datatype]
        if len(raw) != n * dtype.itemsize:
            raise BadTensor(f"input {name!r}: {len(raw)} bytes of data for {n} {datatype} elements "
                            f"({n * dtype.itemsize} bytes)")
        data, count = np.frombuffer(raw, dtype=dtype).reshape(shape), n
    else:
        raise BadTensor(f"input {name!r}: unknown datatype {datatype!r}")
    if count != n:
        raise BadTensor(f"input {name!r}: shape {shape} needs {n} elements, the data has {count}")
    return Tensor(name, datatype, list(shape), data, parameters or {})


def bytes_tensor(name: str, shape: list[int], values: list[bytes],
                 parameters: dict[str, Any] | None = None) -> Tensor:
    """A BYTES tensor from its elements (REST JSON after base64, gRPC `bytes_contents`)."""
    n = elements(shape)
    if len(values) != n:
        raise BadTensor(f"input {name!r}: shape {shape} needs {n} elements, the data has {len(values)}")
    return Tensor(name, "BYTES", list(shape), values, parameters or {})


def from_values(name: str, datatype: str, shape: list[int], values: Any,
                parameters: dict[str, Any] | None = None) -> Tensor:
    """A numeric tensor from typed values (REST JSON `data`, gRPC `contents`), flat or nested."""
    n = elements(shape)
    if datatype not in DTYPES:
        raise BadTensor(f"input {name!r}: unknown datatype {datatype!r}")
    dtype = DTYPES[datatype]
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu" and dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)  # an array's cast would wrap silently (gRPC's uint32 300 -> UINT8 44)
        if values.min() < info.min or values.max() > info.max:
            raise BadTensor(f"input {name!r}: a value is out of range for {datatype}{_range(datatype)}")
    try:
        with np.errstate(all="ignore"):  # a float past FP32's range becomes inf: the crop check refuses it
            array = np.asarray(values, dtype=dtype).reshape(-1)
    except OverflowError:  # numpy 2: an int outside the type's range (UINT8 300 or -1, INT64 2**70)
        raise BadTensor(f"input {name!r}: a value is out of range for {datatype}{_range(datatype)}") from None
    except (TypeError, ValueError) as e:
        raise BadTensor(f"input {name!r}: data is not {datatype} values of one shape ({_short(e)})") from None
    if array.size != n:
        raise BadTensor(f"input {name!r}: shape {shape} needs {n} elements, the data has {array.size}")
    return Tensor(name, datatype, list(shape), array.reshape(shape), parameters or {})


def _range(datatype: str) -> str:
    dtype = DTYPES[datatype]
    if dtype.kind not in "iu":
        return ""
    info = np.iinfo(dtype)
    return f" ({info.min} to {info.max})"


# --- request -> core call -> outputs ----------------------------------------------------------------
def options(parameters: dict[str, Any]) -> Options:
    """`top_k`, `threshold` and `reject_not_food` (default true) from the request parameters, as `Options`
    checks them for every transport (JSON's types are checked first: `true` is no top_k, 2.0 no whole number)."""
    top_k, threshold = parameters.get("top_k"), parameters.get("threshold")
    reject = parameters.get("reject_not_food", True)
    if isinstance(top_k, bool | float):
        raise BadTensor("parameter top_k: expected a whole number")
    if isinstance(threshold, bool):
        raise BadTensor("parameter threshold: expected a number")
    try:
        return Options(top_k=top_k, threshold=threshold, reject_not_food=reject)
    except OptionsError as e:
        raise BadTensor(f"parameter {e}") from None


async def infer(service: PredictionService, model: LoadedModel, request: InferRequest,
                request_id: str) -> tuple[LoadedModel, list[Tensor]]:
    """The protocol's whole sequence, for REST and gRPC alike: options -> outputs wanted -> inputs -> the
    prediction core -> output tensors (of the model version that answered)."""
    opts = options(request.parameters)
    outs, need = requested(request, opts.top_k)
    images = items(request, model, service.settings.max_batch_images)
    try:
        core = Options(top_k=need or None, threshold=opts.threshold, reject_not_food=opts.reject_not_food)
    except OptionsError as e:
        raise BadTensor(f"classification: {e}") from None
    model, answers = await service.predict_tensors(model.name, images, core, request_id)
    return model, outputs(model, answers, outs, opts.top_k)


def items(request: InferRequest, model: LoadedModel, max_images: int) -> list[bytes | np.ndarray]:
    """What the core classifies: one photo per `image` element, or one crop per `pixels` row."""
    if len(request.inputs) != 1 or request.inputs[0].name not in (IMAGE, PIXELS):
        names = [t.name for t in request.inputs]
        raise BadTensor(f"model {model.name!r} takes exactly one input, {IMAGE!r} (BYTES: encoded photos) or "
                        f"{PIXELS!r} (FP32 preprocessed crops); got {names}")
    t = request.inputs[0]
    crop = model.classifier.spec.crop
    if t.name == IMAGE:
        if t.datatype != "BYTES":
            raise BadTensor(f"input {IMAGE!r} must be BYTES (encoded photos), not {t.datatype}")
        found: list[bytes | np.ndarray] = list(t.data)
    else:
        if t.datatype != "FP32" or len(t.shape) != 4 or t.shape[1:] != [3, crop, crop]:
            raise BadTensor(f"input {PIXELS!r} must be FP32 [N, 3, {crop}, {crop}] (the bundle's crop), "
                            f"got {t.datatype} {t.shape}")
        found = list(np.asarray(t.data))
    if not found:
        raise BadTensor(f"input {t.name!r} holds no image")
    if len(found) > max_images:
        raise TooManyImages(f"{len(found)} images, at most {max_images} per request")
    return found


def _classification(out: RequestedOutput, top_k: int | None) -> int:
    k = out.classification or (top_k if out.name == PROBABILITIES else 0) or 0
    if out.classification and out.name != PROBABILITIES:
        raise BadTensor(f"classification applies to the {PROBABILITIES!r} output, not {out.name!r}")
    return k


def requested(request: InferRequest, top_k: int | None) -> tuple[list[RequestedOutput], int]:
    """The outputs to return (all when none are named) and the largest top-k any of them needs."""
    outs = request.outputs or [RequestedOutput(name) for name in OUTPUTS]
    for out in outs:
        if out.name not in OUTPUTS:
            raise BadTensor(f"unknown output {out.name!r}; outputs: {', '.join(OUTPUTS)}")
        if not isinstance(out.classification, int) or isinstance(out.classification, bool) \
                or out.classification < 0:
            raise BadTensor(f"output {out.name!r}: classification must be a whole number >= 1")
    return outs, max([top_k or 0, *(_classification(o, top_k) for o in outs)])


def outputs(model: LoadedModel, answers: list[Answer], outs: list[RequestedOutput],
            top_k: int | None) -> list[Tensor]:
    """The core's answers as the requested output tensors (the protocol's one Answer -> wire function)."""
    n = len(answers)
    index = {label: i for i, label in enumerate(model.labels)}
    tensors = []
    for out in outs:
        k = _classification(out, top_k)
        if out.name == LABEL:
            tensors.append(Tensor(LABEL, "BYTES", [n], [a.label.encode() for a in answers]))
        elif out.name in (LABEL_IDX, STAGE):
            values = [a.label_idx if out.name == LABEL_IDX else a.stage for a in answers]
            tensors.append(Tensor(out.name, "INT64", [n], np.array(values, dtype=DTYPES["INT64"])))
        elif out.name == REASON:
            tensors.append(Tensor(REASON, "BYTES", [n], [(a.reason or "").encode() for a in answers]))
        elif k:
            k = min(k, len(model.labels))
            tensors.append(Tensor(PROBABILITIES, "BYTES", [n, k], [
                f"{t.probability:f}:{index[t.label]}:{t.label}".encode() for a in answers for t in a.top_k[:k]]))
        else:
            probs = np.stack([a.probabilities for a in answers]).astype(DTYPES["FP32"])
            tensors.append(Tensor(PROBABILITIES, "FP32", list(probs.shape), probs))
        tensors[-1].parameters = out.parameters  # e.g. binary_data: how the transport sends it
    return tensors


def raw(t: Tensor) -> bytes:
    """An output tensor's binary form."""
    return join_bytes(t.data) if isinstance(t.data, list) else np.ascontiguousarray(t.data).tobytes()
