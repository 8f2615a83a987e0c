"""A small HTTP client for the prediction service (httpx), sync and async.

    from food_classifier.client import Client
    with Client("http://127.0.0.1:8383") as c:
        c.predict("pie.jpg")["label"]
        [r.get("label") for r in c.predict_batch(["a.jpg", b"...jpeg bytes..."])]

    food_classifier.client.predict("pie.jpg")          # one-off, default URL

Errors from the server raise `PredictionError` carrying its `status`, `error` code and `detail`;
in `predict_batch` a bad image is an entry with an "error" key, as the server sends it.
"""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

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


class Client(_Base):
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

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until /readyz is green (models loaded and warm)."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout:.0f} s")
            time.sleep(0.05)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
