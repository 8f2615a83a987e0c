"""What an endpoint does, without HTTP: decode off the event loop, batch, decide, shape the answer.

Decoding and preprocessing run in a thread pool (Pillow and numpy release the GIL), so the event
loop only parses requests and hands arrays to the model's micro-batcher. Large images first wait for
decode memory (admission.py). Every decode failure becomes a `ServiceError` (413/415), never an
exception that escapes to the client as a 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from food_classifier.serving.admission import DecodeBudget, LargeImage, decode_large, decode_small
from food_classifier.serving.batching import BatchResult
from food_classifier.serving.errors import MissingImage, ServiceError, image_error
from food_classifier.serving.metrics import ServingMetrics
from food_classifier.serving.paths import PathGuard
from food_classifier.serving.registry import LoadedModel, ModelRegistry
from food_classifier.serving.settings import ServeSettings

log = logging.getLogger("food_classifier.serving")


@dataclass
class ImageUpload:
    data: bytes
    filename: str | None = None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class PredictionService:
    def __init__(self, registry: ModelRegistry, settings: ServeSettings, metrics: ServingMetrics | None = None):
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="fc-decode")
        self.paths = PathGuard(settings.allow_path_root)
        # Backpressure: at most this many images decoded or decoding but not yet through the model. Without
        # it, decoding runs ahead of inference and a few big batch requests queue ~1 MB of floats per image.
        self.pending_limit = 2 * (settings.decode_threads + settings.inference_workers * settings.batch_max_size)
        self._pending = asyncio.Semaphore(self.pending_limit)
        self.budget = DecodeBudget(settings.decode_memory_mb * 1024 * 1024, settings.decode_threads - 1)

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    async def warm_up(self, models: list[LoadedModel]) -> None:
        """Start every decode thread and run a JPEG through each model's decode + batcher path once, so
        the first request after /readyz does not pay for thread start-up (~20 ms measured). Best effort."""
        if not self.settings.warmup:
            return
        side = max(1, min(512, int(self.settings.max_pixels ** 0.5)))
        photo = _warmup_jpeg(side)

        async def once(model: LoadedModel) -> None:
            array, _ = await self._prepare(model, decode_small, photo, self.budget.small)
            await model.batcher.predict_array(array)

        for model in models:
            try:
                await asyncio.gather(*(once(model) for _ in range(self.settings.decode_threads)))
            except Exception as exc:  # a warm-up problem must not keep a loadable model from serving
                log.warning("warm-up of %s failed: %s", model.name, exc)

    async def _prepare(self, model: LoadedModel, step: Any, *args: Any) -> tuple[np.ndarray, float]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.decode_pool, step, model.classifier, *args)
        except (ServiceError, LargeImage):
            raise
        except Exception as exc:  # any decoder failure is the input's fault: never a 500
            raise image_error(exc) from None

    async def _infer(self, model: LoadedModel, data: bytes) -> tuple[BatchResult, float, float]:
        """Decode, then the model: (result, decode ms, ms waited for a pending slot or decode memory).
        A large image waits for the budget outside the pending slots, so it never blocks small ones."""
        if not data:
            raise MissingImage("the image is empty (0 bytes)")
        start, decode_ms = time.perf_counter(), 0.0

        async def prepare(step: Any, *args: Any) -> np.ndarray:
            nonlocal decode_ms
            array, ms = await self._prepare(model, step, *args)
            decode_ms += ms
            return array

        try:
            async with self._pending:
                waited = time.perf_counter() - start
                return await model.batcher.predict(prepare(decode_small, data, self.budget.small)), decode_ms, waited
        except LargeImage as big:
            large, decode_ms = big, big.peek_ms
        start = time.perf_counter()
        grant = await self.budget.acquire(large.cost)
        try:
            async def prepare_large() -> np.ndarray:
                try:
                    return await prepare(decode_large, large.image)
                finally:
                    grant.release()  # the pixels are freed: the next large image may start

            async with self._pending:
                waited += time.perf_counter() - start
                return await model.batcher.predict(prepare_large()), decode_ms, waited
        finally:
            grant.release()

    async def _classify(self, model: LoadedModel, data: bytes, top_k: int | None,
                        threshold: float | None) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            res, decode_ms, waited = await self._infer(model, data)
        except ServiceError:
            self._count(model, "rejected")
            raise
        pred = model.classifier.decide(res.output[None], top_k, threshold)[0]
        self._count(model, "ok")
        # a plain dict, not dataclasses.asdict (its deepcopy costs more than the rest of this function)
        return {"label": pred.label, "label_idx": pred.label_idx, "confidence": pred.confidence,
                "top_k": pred.top_k, "abstained": pred.abstained, "model": model.name, "model_version": model.version,
                "timing": {"total_ms": _ms(time.perf_counter() - start), "preprocess_ms": round(decode_ms, 3),
                           "queue_ms": round(waited * 1000 + res.queue_ms, 3),
                           "inference_ms": round(res.inference_ms, 3), "batch_size": res.batch_size}}

    def _count(self, model: LoadedModel, outcome: str) -> None:
        if self.metrics:
            self.metrics.images.labels(model.name, outcome).inc()

    async def predict(self, name: str | None, image: ImageUpload, top_k: int | None = None,
                      threshold: float | None = None) -> dict[str, Any]:
        """One image through the model's micro-batcher."""
        return await self._classify(self.registry.get(name), image.data, top_k, threshold)

    async def predict_batch(self, name: str | None, images: list[ImageUpload], top_k: int | None = None,
                            threshold: float | None = None) -> dict[str, Any]:
        """Many images, answers in input order; a bad image is an error entry, not a failed batch."""
        start = time.perf_counter()
        model = self.registry.get(name)  # one model version for the whole batch, even during a reload

        async def one(i: int, img: ImageUpload) -> dict[str, Any]:
            head = {"index": i, "filename": img.filename}
            try:
                res = await self._classify(model, img.data, top_k, threshold)
            except ServiceError as exc:
                return {**head, **exc.to_dict(), "status": exc.status}
            res.pop("model")
            res.pop("model_version")
            return {**head, **res}

        results = await asyncio.gather(*(one(i, img) for i, img in enumerate(images)))
        failed = sum(1 for r in results if "error" in r)
        return {"model": model.name, "model_version": model.version, "count": len(results), "failed": failed,
                "results": results, "timing": {"total_ms": _ms(time.perf_counter() - start)}}

    async def predict_path(self, model_type: str | None, image_path: str) -> dict[str, Any]:
        """The seed's `GET /predict`: a server-side file, only under the allowed roots."""
        model = self.registry.get(model_type)
        path = self.paths.resolve(image_path)
        data = await asyncio.to_thread(self.paths.read, path, self.settings.max_body_bytes)
        res = await self._classify(model, data, None, None)
        return {"label": res["label"], "label_idx": res["label_idx"], "confidence": res["confidence"]}


def _warmup_jpeg(side: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (180, 120, 60)).save(buf, "JPEG")
    return buf.getvalue()
