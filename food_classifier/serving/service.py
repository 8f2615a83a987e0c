"""What an endpoint does, without HTTP: decode off the event loop, batch, decide, shape the answer.

Decoding and preprocessing run in a thread pool (Pillow and numpy release the GIL), so the event
loop only parses requests and hands arrays to the model's micro-batcher. The prediction cache is
looked up in the same thread hop (bytes level, then decode, then pixel level): a hit never reaches the
batcher, and every answer says which it was (`cache`). Large images first wait for decode memory
(admission.py). Every decode failure becomes a `ServiceError` (413/415), never an exception that
escapes to the client as a 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from food_classifier.answer import DEFAULT_OPTIONS, Answer, Options, OptionsError, Timings
from food_classifier.cache import Lookup, PredictionCache
from food_classifier.serving.admission import DecodeBudget, LargeImage, decode_large, decode_small
from food_classifier.serving.batching import BatchResult, MicroBatcher
from food_classifier.serving.errors import InvalidInput, MissingImage, ServiceError, image_error
from food_classifier.serving.metrics import ServingMetrics
from food_classifier.serving.registry import LoadedModel, ModelRegistry
from food_classifier.serving.settings import ServeSettings

if TYPE_CHECKING:
    from food_classifier.inference import Classifier
    from food_classifier.serving.observer import ServingMonitor
    from food_classifier.serving.shadow import Shadow

log = logging.getLogger("food_classifier.serving")


@dataclass
class ImageUpload:
    data: bytes
    filename: str | None = None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def new_request_id() -> str:
    return uuid.uuid4().hex


class _Answered(Exception):
    """Raised by the decode step on a cache hit: the model has nothing to do for this image."""


class _Crop:
    """A model as the cache sees it for an already preprocessed crop (`pixels` of the Open Inference
    Protocol): "preprocessing" is a check of shape and values, so the crop gets the pixel-level cache,
    the batcher and the model like a decoded image, and a bad tensor is a 422, not a model error."""

    def __init__(self, clf: Classifier):
        self.clf, self.spec, self.labels, self.row_width = clf, clf.spec, clf.labels, clf.row_width
        self.name, self.version, self.variant = clf.name, clf.version, clf.variant

    def preprocess(self, array: np.ndarray) -> np.ndarray:
        want = (3, self.spec.crop, self.spec.crop)
        if array.shape != want:
            raise InvalidInput(f"pixels: each image must be float32 {list(want)} (the bundle's crop), "
                               f"got {list(array.shape)}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            raise InvalidInput("pixels: NaN or infinite values")
        return array

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.clf.infer(batch)


def build_service(settings: ServeSettings) -> PredictionService:
    """The one composition root: metrics, the model registry, the monitor and the service over them, for every
    process that serves (the HTTP app with its gRPC server, the stream worker, each Ray Serve replica)."""
    from food_classifier.bundle import model_sources
    from food_classifier.serving.observer import ServingMonitor

    metrics = ServingMetrics()
    registry = ModelRegistry(model_sources(settings.bundles), settings, metrics)
    monitor = ServingMonitor(settings)  # drift windows, feedback and the prediction log see every transport
    metrics.watch_monitor(monitor)
    shadow = None
    if settings.shadow:  # a second version on a sample of live photos, never on the answer's path (shadow.py)
        from food_classifier.serving.shadow import Shadow, resolve

        shadow = Shadow(resolve(settings.shadow, model_sources(settings.bundles)), settings.shadow_sample,
                        keep=monitor.keep, threads=settings.ort_threads)
        metrics.watch_shadow(shadow)
    return PredictionService(registry, settings, metrics, monitor=monitor, shadow=shadow)


def cache_from_settings(s: ServeSettings) -> PredictionCache:
    url = s.cache_url.get_secret_value() if s.cache_url else None
    return PredictionCache(s.cache_bytes, url, s.cache_ttl, s.cache_timeout_ms / 1000, s.cache_breaker_s)


class PredictionService:
    def __init__(self, registry: ModelRegistry, settings: ServeSettings, metrics: ServingMetrics | None = None,
                 cache: PredictionCache | None = None, monitor: ServingMonitor | None = None,
                 shadow: Shadow | None = None):
        self.registry = registry
        self.cache = cache if cache is not None else cache_from_settings(settings)
        self._no_cache = PredictionCache(memory_bytes=0)  # for warm-up: no entries, no counts
        self.settings = settings
        self.metrics = metrics
        if metrics:
            metrics.watch_cache(self.cache)
        self.monitor = monitor  # sees every answered image (drift windows, feedback, prediction log)
        self.shadow = shadow  # a second version answering a sample of photos in its own thread (shadow.py)
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="fc-decode")
        # Backpressure: at most this many images decoded or decoding but not yet through the model. Without
        # it, decoding runs ahead of inference and a few big batch requests queue ~1 MB of floats per image.
        self.pending_limit = 2 * (settings.decode_threads + settings.inference_workers * settings.batch_max_size)
        self._pending = asyncio.Semaphore(self.pending_limit)
        self.budget = DecodeBudget(settings.decode_memory_mb * 1024 * 1024, settings.decode_threads - 1)

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.cache.close()

    def shutdown(self) -> None:
        """Close this service and what `build_service` made for it (the models' sessions, the prediction log)."""
        self.close()
        self.registry.close()
        if self.monitor is not None:
            self.monitor.close()
        if self.shadow is not None:
            self.shadow.close()

    async def warm_up(self, models: list[LoadedModel]) -> None:
        """Start every decode thread and run a JPEG through each model's decode + batcher path once, so
        the first request after /readyz does not pay for thread start-up (~20 ms measured). Best effort.
        Also pings the cache's Redis, so /readyz reports an unreachable one as degraded from the start."""
        await asyncio.to_thread(self.cache.check)
        if not self.settings.warmup:
            return
        side = max(1, min(512, int(self.settings.max_pixels ** 0.5)))
        photo = _warmup_jpeg(side)

        async def once(model: LoadedModel) -> None:
            look = await self._prepare(model, photo, partial(decode_small, small=self.budget.small),
                                       self._no_cache)
            await model.batcher.predict_array(look.array)

        for model in models:
            try:
                await asyncio.gather(*(once(model) for _ in range(self.settings.decode_threads)))
            except Exception as exc:  # a warm-up problem must not keep a loadable model from serving
                log.warning("warm-up of %s failed: %s", model.name, exc)

    async def _prepare(self, model: LoadedModel, data: bytes | np.ndarray, decode: Any = None,
                       cache: PredictionCache | None = None) -> Lookup:
        """The cache lookup in a decode thread, decoding with `decode(classifier, image) -> (array, ms)` on a
        miss; a preprocessed crop (np.ndarray, tensor protocols) is only checked (`_Crop`)."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool,
                                                                self._lookup_step(model, data, decode, cache))

    def _lookup_step(self, model: LoadedModel, data: bytes | np.ndarray, decode: Any,
                     cache: PredictionCache | None = None) -> partial[Lookup]:
        if isinstance(data, np.ndarray):
            clf, step_decode = _Crop(model.classifier), None
        else:
            clf, step_decode = model.classifier, partial(decode, model.classifier)
        return partial(_lookup, cache or self.cache, clf, data, step_decode, self.monitor is not None)

    async def _infer(self, model: LoadedModel, data: bytes | np.ndarray) -> tuple[Lookup, BatchResult | None, float]:
        """Cache, decode, then the model: (lookup, model result or None on a cache hit, seconds waited for a
        pending slot or decode memory). A large image waits for the budget outside the pending slots, so it
        never blocks small ones."""
        if isinstance(data, bytes) and not data:
            raise MissingImage("the image is empty (0 bytes)")
        start, look = time.perf_counter(), Lookup("off")

        async def prepare(decode: Any, done: Any) -> np.ndarray:
            nonlocal look
            try:
                look = await self._prepare(model, data, decode)
            finally:
                done()
            if look.row is not None:
                raise _Answered
            return look.array

        async def run(decode: Any, done: Any = lambda: None) -> BatchResult | None:
            try:
                return await model.batcher.predict(prepare(decode, done))
            except _Answered:
                return None

        small = partial(decode_small, small=self.budget.small)
        try:
            async with self._pending:
                waited = time.perf_counter() - start
                if model.batcher.max_size > 1:
                    res = await run(small)
                else:  # batching off: the decode thread also makes the model call (one thread hop per image)
                    step = partial(_lookup_and_run, self._lookup_step(model, data, small), model.batcher)
                    look, res = await asyncio.get_running_loop().run_in_executor(self.decode_pool, step)
            return look, res, waited
        except LargeImage as big:
            large = big
        start = time.perf_counter()
        grant = await self.budget.acquire(large.cost)

        def decode_peeked(classifier: Any, _: bytes) -> tuple[np.ndarray, float]:
            array, ms = decode_large(classifier, large.image)
            return array, ms + large.peek_ms

        try:
            async with self._pending:
                waited += time.perf_counter() - start
                res = await run(decode_peeked, grant.release)  # released once the pixels are freed
            return look, res, waited
        finally:
            grant.release()

    async def _classify(self, model: LoadedModel, data: bytes | np.ndarray, options: Options,
                        request_id: str | None = None) -> Answer:
        """The one path: cache lookup (decoding on a miss) -> the model's micro-batcher -> store -> decide."""
        start = time.perf_counter()
        try:
            look, res, waited = await self._infer(model, data)
        except ServiceError:
            self._count(model, "rejected")
            raise
        row = look.row if res is None else res.output  # Classifier.infer's row: probabilities, stage, flag
        if res is not None and look.keys:
            await self._store(look, row)
        answer = replace(
            model.classifier.decide(row[None], options, (look.outcome,))[0],
            request_id=request_id or new_request_id(),
            timings=Timings(total_ms=_ms(time.perf_counter() - start), preprocess_ms=round(look.preprocess_ms, 3),
                            queue_ms=round(waited * 1000 + (res.queue_ms if res else 0.0), 3),
                            inference_ms=round(res.inference_ms, 3) if res else 0.0,
                            batch_size=res.batch_size if res else 0))
        self._count(model, "ok")
        if self.metrics:
            self.metrics.stages.labels(model.name, str(answer.stage)).inc()
        if self.monitor is not None:
            self.monitor.observe(model, answer, data.tobytes() if isinstance(data, np.ndarray) else data, look.sha256)
        if self.shadow is not None and isinstance(data, bytes):  # a queue put: the answer never waits for it
            self.shadow.submit(model.name, answer, data, model.labels)
        return answer

    async def _store(self, look: Lookup, probs: np.ndarray) -> None:
        if self.cache.redis is None:  # memory only: microseconds, no thread hop
            self.cache.store(look, probs)
        else:
            await asyncio.get_running_loop().run_in_executor(self.decode_pool, self.cache.store, look, probs)

    def _count(self, model: LoadedModel, outcome: str) -> None:
        if self.metrics:
            self.metrics.images.labels(model.name, outcome).inc()

    def _model(self, name: str | None, options: Options) -> LoadedModel:
        model = self.registry.get(name)
        try:
            options.check_variant(model.variant)
        except OptionsError as e:
            raise InvalidInput(str(e)) from None
        return model

    async def predict(self, name: str | None, image: ImageUpload, options: Options = DEFAULT_OPTIONS,
                      request_id: str | None = None) -> Answer:
        """One image through the model's micro-batcher (`request_id`: the transport's, else a new one)."""
        return await self._classify(self._model(name, options), image.data, options, request_id)

    async def predict_batch(self, name: str | None, images: list[ImageUpload], options: Options = DEFAULT_OPTIONS,
                            request_id: str | None = None) -> BatchAnswer:
        """Many images, answers in input order; a bad image is an error entry, not a failed batch."""
        start = time.perf_counter()
        model = self._model(name, options)  # one model version for the whole batch, even during a reload
        rid = request_id or new_request_id()

        async def one(i: int, img: ImageUpload) -> Answer | ServiceError:
            try:
                return await self._classify(model, img.data, options, f"{rid}-{i}")
            except ServiceError as exc:
                return exc

        results = await asyncio.gather(*(one(i, img) for i, img in enumerate(images)))
        return BatchAnswer(model.name, model.version, rid, list(results), _ms(time.perf_counter() - start))

    async def predict_tensors(self, name: str | None, items: list[bytes | np.ndarray],
                              options: Options = DEFAULT_OPTIONS,
                              request_id: str | None = None) -> tuple[LoadedModel, list[Answer]]:
        """For tensor protocols (Open Inference Protocol): encoded images (bytes) or preprocessed crops
        (float32 [3, crop, crop], no decoding), all through the same cache, batcher and model. All or
        nothing: the first error fails the request. Each answer carries its `probabilities` row."""
        model = self._model(name, options)
        rid = request_id or new_request_id()
        tasks = [asyncio.ensure_future(self._classify(model, item, options, rid if len(items) == 1 else f"{rid}-{i}"))
                 for i, item in enumerate(items)]
        try:
            return model, list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()  # after a failure: the others are not needed any more


@dataclass(frozen=True)
class BatchAnswer:
    """`predict_batch`'s result: one model version for all, each image an `Answer` or its `ServiceError`."""

    model: str
    model_version: str
    request_id: str
    results: list[Answer | ServiceError]
    total_ms: float

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if isinstance(r, ServiceError))


def _lookup(cache: PredictionCache, clf: Any, data: bytes | np.ndarray, decode: Any, hash_bytes: bool) -> Lookup:
    """The cache's lookup, plus the upload's sha256 for the monitor: the bytes key's hash when the cache made one,
    else hashed here, in a decode thread (hashlib releases the GIL), not on the event loop (~7 % of its time)."""
    try:
        look = cache.lookup(clf, data, decode=decode)
    except (ServiceError, LargeImage):
        raise
    except Exception as exc:  # any decoder failure is the input's fault: never a 500
        raise image_error(exc) from None
    if hash_bytes and look.sha256 is None and isinstance(data, bytes):
        look.sha256 = hashlib.sha256(data).hexdigest()
    return look


def _lookup_and_run(lookup: partial[Lookup], batcher: MicroBatcher) -> tuple[Lookup, BatchResult | None]:
    """The lookup, then on a miss the model on this thread (a model failure stays a 500, not the input's fault)."""
    look = lookup()
    return look, None if look.row is not None else batcher.run_one(look.array)


def _warmup_jpeg(side: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (180, 120, 60)).save(buf, "JPEG")
    return buf.getvalue()
