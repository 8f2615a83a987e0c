"""The Open Inference Protocol's `inference.GRPCInferenceService` on the gRPC port, beside our own service.

A thin adapter like the REST one (`routes_oip.py`): a `ModelInferRequest` (typed `contents` or
`raw_input_contents`) becomes an `oip.InferRequest`, the one prediction core answers, and the output
tensors go back as `raw_output_contents` (as Triton does; every OIP client reads them). Errors keep the
service's messages, gRPC codes and trailers (`codes`, `trailer`: server.py's); the API key interceptor
covers these calls too, except ServerLive and ServerReady (probes, like /healthz and /readyz).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from food_classifier.serving import oip
from food_classifier.serving.errors import NotReady, ServiceError
from food_classifier.serving.metrics import ServingMetrics
from food_classifier.serving.oip import BadTensor
from food_classifier.serving.service import PredictionService, new_request_id
from food_classifier.v1 import load_oip_stubs

pb2, pb2_grpc = load_oip_stubs()
import grpc  # noqa: E402  (after load_oip_stubs: a missing extra is one clear error)

log = logging.getLogger("food_classifier.serving")
SERVICE = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
OPEN_METHODS = frozenset({f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady"})
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}


def _value(p: Any) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _params(m: Any) -> dict[str, Any]:
    return {k: _value(v) for k, v in m.items()}


def _request(req: Any) -> oip.InferRequest:
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise BadTensor(f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs: give one per input or none")
    inputs = []
    for i, t in enumerate(req.inputs):
        shape, params = list(t.shape), _params(t.parameters)
        if raw:
            inputs.append(oip.from_raw(t.name, t.datatype, shape, raw[i], params))
        elif t.datatype == "BYTES":
            inputs.append(oip.bytes_tensor(t.name, shape, list(t.contents.bytes_contents), params))
        elif t.datatype in CONTENTS:
            # the repeated field as an array through its buffer (14 ms and 10 MB for 2.5 M floats; a list
            # of Python floats took 4.7 s of the event loop and 90 MB)
            inputs.append(oip.from_values(t.name, t.datatype, shape,
                                          np.asarray(getattr(t.contents, CONTENTS[t.datatype])), params))
        else:
            raise BadTensor(f"input {t.name!r}: datatype {t.datatype!r} needs raw_input_contents")
    outputs = []
    for o in req.outputs:
        params = _params(o.parameters)
        outputs.append(oip.RequestedOutput(o.name, params.get("classification", 0), params))
    return oip.InferRequest(inputs, outputs, _params(req.parameters), req.id)


class OipServicer(pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: PredictionService, codes: dict[int, grpc.StatusCode],
                 trailer: Callable[[str, int], Any], metrics: ServingMetrics | None = None):
        self.service, self.registry, self.metrics = service, service.registry, metrics
        self.codes, self.trailer = codes, trailer  # HTTP status -> gRPC code; the fc-error/fc-status trailer

    def _observe(self, method: str, code: grpc.StatusCode, start: float) -> None:
        if self.metrics:
            self.metrics.grpc_requests.labels(method, code.name).inc()
            self.metrics.grpc_latency.labels(method, code.name).observe(time.perf_counter() - start)

    async def _call(self, method: str, context: grpc.aio.ServicerContext, answer: Callable[[], Awaitable[Any]]) -> Any:
        start = time.perf_counter()
        try:
            result = await answer()
        except ServiceError as exc:
            code = self.codes.get(exc.status, grpc.StatusCode.UNKNOWN)
            self._observe(method, code, start)
            await context.abort(code, exc.detail, trailing_metadata=self.trailer(exc.code, exc.status))
        except Exception:  # a bug: logged once, counted, and INTERNAL without the exception's text (as HTTP's 500)
            log.exception("unhandled error in %s", method)
            self._observe(method, grpc.StatusCode.INTERNAL, start)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error",
                                trailing_metadata=self.trailer("internal_error", 500))
        self._observe(method, grpc.StatusCode.OK, start)
        return result

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb2.ServerReadyResponse(ready=self.registry.ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def answer() -> Any:
            try:
                oip.check_version(self.registry.get(request.name), request.version)
            except NotReady:
                return pb2.ModelReadyResponse(ready=False)
            return pb2.ModelReadyResponse(ready=True)

        return await self._call("ModelReady", context, answer)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb2.ServerMetadataResponse(**oip.server_metadata())

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def answer() -> Any:
            meta = oip.model_metadata(oip.check_version(self.registry.get(request.name), request.version))
            tensor = pb2.ModelMetadataResponse.TensorMetadata
            return pb2.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                             inputs=[tensor(**t) for t in meta["inputs"]],
                                             outputs=[tensor(**t) for t in meta["outputs"]])

        return await self._call("ModelMetadata", context, answer)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def answer() -> Any:
            model = oip.check_version(self.registry.get(request.model_name), request.model_version)
            req = _request(request)
            rid = new_request_id()
            model, tensors = await oip.infer(self.service, model, req, rid)
            out = pb2.ModelInferResponse.InferOutputTensor
            return pb2.ModelInferResponse(
                model_name=model.name, model_version=model.version, id=req.id or rid,
                parameters={"request_id": pb2.InferParameter(string_param=rid)},
                outputs=[out(name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors],
                raw_output_contents=[oip.raw(t) for t in tensors])

        return await self._call("ModelInfer", context, answer)
