"""Small clients for the prediction service: HTTP (httpx, sync and async) and gRPC (`GrpcClient`).

    from food_classifier.client import Client
    with Client("http://127.0.0.1:8383") as c:
        c.predict("pie.jpg")["label"]
        [r.get("label") for r in c.predict_batch(["a.jpg", b"...jpeg bytes..."])]

    food_classifier.client.predict("pie.jpg")          # one-off, default URL
    with GrpcClient("127.0.0.1:8384") as g:            # the same calls and answers over gRPC
        g.predict("pie.jpg")["label"]

Errors from the server raise `PredictionError` carrying its `status`, `error` code and `detail`
(the HTTP status and code also over gRPC); in `predict_batch` a bad image is an entry with an
"error" key, as the server sends it. `GrpcClient` needs the `grpc` extra and imports it only when
one is created, so importing this module never imports grpc.
"""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import httpx

from food_classifier.defaults import MiB

DEFAULT_URL = os.environ.get("FOOD_CLASSIFIER_URL", "http://127.0.0.1:8383")
ImageSource = str | Path | bytes


class PredictionError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail = status, error, detail


def _file(image: ImageSource, i: int = 0) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) for a multipart part."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image{i}", bytes(image), "application/octet-stream"
    path = Path(image)
    return path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _params(top_k: int | None, threshold: float | None) -> dict[str, Any]:
    return {k: v for k, v in (("top_k", top_k), ("threshold", threshold)) if v is not None}


def _check(r: httpx.Response) -> Any:
    if r.is_success:
        return r.json()
    try:
        body = r.json()
        error, detail = body.get("error", "http_error"), body.get("detail", r.text)
    except ValueError:
        error, detail = "http_error", r.text[:200]
    raise PredictionError(r.status_code, error, detail)


class _Base:
    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, model: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.address = self.base_url
        self.model = model
        self.headers = {"X-API-Key": api_key} if api_key else {}

    def _path(self, model: str | None, suffix: str) -> str:
        model = model or self.model
        return f"/v1/models/{model}/{suffix}" if model else f"/{suffix}"

    def _single(self, image: ImageSource, raw: bool) -> dict[str, Any]:
        name, data, ctype = _file(image)
        if raw:
            return {"content": data, "headers": {"Content-Type": ctype if ctype.startswith("image/")
                                                 else "application/octet-stream"}}
        return {"files": {"file": (name, data, ctype)}}


class _Blocking:
    """What both blocking clients share: `wait_ready` over their `ready`, and closing as a context manager."""

    address: str

    def ready(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server says it is ready (models loaded and warm)."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.address} not ready after {timeout:.0f} s")
            time.sleep(0.05)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(_Base, _Blocking):
    """Blocking client; keeps one connection pool (use as a context manager or call `close`)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, model: str | None = None,
                 timeout: float = 30.0, transport: httpx.BaseTransport | None = None):
        super().__init__(base_url, api_key, model)
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport)

    def predict(self, image: ImageSource, *, model: str | None = None, top_k: int | None = None,
                threshold: float | None = None, raw: bool = False) -> dict[str, Any]:
        """Classify one image (a path or bytes); `raw=True` posts the bytes as the body, no multipart."""
        r = self.http.post(self._path(model, "predict"), params=_params(top_k, threshold), **self._single(image, raw))
        return _check(r)

    def predict_batch(self, images: Sequence[ImageSource], *, model: str | None = None, top_k: int | None = None,
                      threshold: float | None = None) -> list[dict[str, Any]]:
        """Classify many images in one request; results in input order, bad images as error entries."""
        files = [("files", _file(img, i)) for i, img in enumerate(images)]
        r = self.http.post(self._path(model, "predict-batch"), params=_params(top_k, threshold), files=files)
        return _check(r)["results"]

    def models(self) -> list[dict[str, Any]]:
        return _check(self.http.get("/v1/models"))["models"]

    def reload(self, model: str) -> dict[str, Any]:
        return _check(self.http.post(f"/v1/models/{model}/reload"))

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self.http.close()


class AsyncClient(_Base):
    """The same calls for asyncio code (used by the benchmark's load generator)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, model: str | None = None,
                 timeout: float = 30.0, max_connections: int = 100):
        super().__init__(base_url, api_key, model)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout, limits=limits)

    async def predict(self, image: ImageSource, *, model: str | None = None, top_k: int | None = None,
                      threshold: float | None = None, raw: bool = False) -> dict[str, Any]:
        r = await self.http.post(self._path(model, "predict"), params=_params(top_k, threshold),
                                 **self._single(image, raw))
        return _check(r)

    async def predict_batch(self, images: Sequence[ImageSource], *, model: str | None = None,
                            top_k: int | None = None, threshold: float | None = None) -> list[dict[str, Any]]:
        files = [("files", _file(img, i)) for i, img in enumerate(images)]
        r = await self.http.post(self._path(model, "predict-batch"), params=_params(top_k, threshold), files=files)
        return _check(r)["results"]

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def predict(image: ImageSource, url: str = DEFAULT_URL, **kwargs: Any) -> dict[str, Any]:
    """One-off prediction (opens and closes a connection)."""
    api_key = kwargs.pop("api_key", None)
    with Client(url, api_key=api_key) as c:
        return c.predict(image, **kwargs)


def predict_batch(images: Sequence[ImageSource], url: str = DEFAULT_URL, **kwargs: Any) -> list[dict[str, Any]]:
    """One-off batch prediction."""
    api_key = kwargs.pop("api_key", None)
    with Client(url, api_key=api_key) as c:
        return c.predict_batch(images, **kwargs)



# --- gRPC ------------------------------------------------------------------------------------------------

DEFAULT_TARGET = os.environ.get("FOOD_CLASSIFIER_GRPC", "127.0.0.1:8384")
# HTTP status of errors raised by gRPC itself (no fc-status trailer), e.g. an oversized message
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
               "RESOURCE_EXHAUSTED": 413, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


def _prediction(r: Any) -> dict[str, Any]:
    out = {"label": r.label, "label_idx": r.label_idx, "confidence": r.confidence,
           "top_k": [{"label": t.label, "probability": t.probability} for t in r.top_k], "abstained": r.abstained,
           "reason": r.reason or None, "stage": r.stage, "model": r.model, "model_version": r.model_version,
           "request_id": r.request_id,
           "timing": {"total_ms": r.timing.total_ms, "preprocess_ms": r.timing.preprocess_ms,
                      "queue_ms": r.timing.queue_ms, "inference_ms": r.timing.inference_ms,
                      "batch_size": r.timing.batch_size}}
    if r.cache:  # a server with a prediction cache says how it answered; without one the field stays empty
        out["cache"] = r.cache
    return out


def _model(m: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    def opt(field: str) -> Any:
        return getattr(m, field) if m.HasField(field) else None

    return {"name": m.name, "version": m.version, "default": m.is_default, "variant": m.variant,
            "variants": list(m.variants), "labels": list(m.labels), "arch": opt("arch"),
            "created_at": opt("created_at"), "metrics": MessageToDict(m.metrics),
            "preprocessing": MessageToDict(m.preprocessing), "temperature": m.temperature,
            "abstain_threshold": opt("abstain_threshold"), "builtin": m.builtin, "description": opt("description"),
            "loaded_at": m.loaded_at}


class GrpcClient(_Blocking):
    """Blocking client over one channel (use as a context manager or call `close`)."""

    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None, model: str | None = None,
                 timeout: float = 30.0, max_message_bytes: int = 64 * MiB):
        from food_classifier.v1 import load_stubs

        self.pb2, pb2_grpc = load_stubs()
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._grpc, self._health_pb2 = grpc, health_pb2
        self.target, self.model, self.timeout = target, model, timeout
        self.address = target
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", max_message_bytes),
                                                              ("grpc.max_receive_message_length", max_message_bytes)])
        self.stub = pb2_grpc.ClassifierStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _request(self, data: bytes, model: str | None, top_k: int | None, threshold: float | None) -> Any:
        return self.pb2.ClassifyRequest(model=model or self.model or "", image=data, top_k=top_k, threshold=threshold)

    def _error(self, e: Any) -> PredictionError:
        trailer = dict(e.trailing_metadata() or ())
        code = e.code().name
        status = int(trailer["fc-status"]) if "fc-status" in trailer else HTTP_STATUS.get(code, 500)
        err = PredictionError(status, trailer.get("fc-error", code.lower()), e.details() or "")
        err.grpc_code = e.code()
        return err

    def predict(self, image: ImageSource, *, model: str | None = None, top_k: int | None = None,
                threshold: float | None = None, raw: bool = False) -> dict[str, Any]:
        """Classify one image (a path or bytes) with one Classify call (`raw` is accepted for the HTTP
        client's signature: gRPC always sends the bare bytes)."""
        _, data, _ = _file(image)
        try:
            r = self.stub.Classify(self._request(data, model, top_k, threshold), metadata=self.metadata,
                                   timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise self._error(e) from None
        return _prediction(r)

    def predict_batch(self, images: Sequence[ImageSource], *, model: str | None = None, top_k: int | None = None,
                      threshold: float | None = None) -> list[dict[str, Any]]:
        """Classify many images on one ClassifyStream; results in input order, bad images as error entries."""
        names: list[str | None] = []

        def requests() -> Iterator[Any]:
            for i, image in enumerate(images):
                name, data, _ = _file(image, i)
                names.append(name)
                yield self._request(data, model, top_k, threshold)

        results = []
        try:
            for i, r in enumerate(self.stub.ClassifyStream(requests(), metadata=self.metadata,
                                                           timeout=self.timeout * max(1, len(images)))):
                head = {"index": i, "filename": names[i]}
                if r.HasField("error"):
                    results.append({**head, "error": r.error.error, "detail": r.error.detail,
                                    "status": r.error.status})
                else:
                    body = _prediction(r)
                    del body["model"], body["model_version"]
                    results.append({**head, **body})
        except self._grpc.RpcError as e:
            raise self._error(e) from None
        return results

    def models(self) -> list[dict[str, Any]]:
        try:
            answer = self.stub.ListModels(self.pb2.ListModelsRequest(), metadata=self.metadata, timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise self._error(e) from None
        return [_model(m) for m in answer.models]

    def ready(self) -> bool:
        """The standard health service says SERVING (every model loaded and warm)."""
        try:
            r = self.health.Check(self._health_pb2.HealthCheckRequest(service=""), timeout=min(self.timeout, 5.0))
        except self._grpc.RpcError:
            return False
        return r.status == self._health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.channel.close()
