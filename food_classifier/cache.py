"""Prediction cache: `Classifier.infer` rows (calibrated probabilities, stage, not-food flag) keyed by the
uploaded bytes or by the photo's pixels; not responses, so `top_k` and `threshold` apply after a hit. Two levels,
both namespaced by model name + version + variant (a reload never serves the old version's answers):

1. bytes: sha256 of the upload. A hit skips decoding and inference.
2. pixels: a coarse key of the preprocessed crop (cache_pixels.py), for the same photo re-encoded or
   re-uploaded with other metadata. A key of the exact crop hit 0 % of JPEG re-saves (bench/
   bench_pixel_key.py, docs/SCALING.md); the coarse key hits 99.6/99.3/96.4 % at JPEG quality 95/75/60.
   Since photos that differ only inside its blocks share a key, a hit counts only if the photo's
   fingerprint (colour, a 56x56 luma grid, texture per block), stored once per photo, is within
   tolerance: never another photo's answer. Only such a verified hit is copied under the upload's bytes key.

Backends: an in-process LRU bounded in bytes and, optionally, Redis (the `cache` extra); with both, the
LRU sits in front of Redis. Redis errors fail open: the request goes on without the cache, a circuit
breaker skips Redis for a few seconds, and the error is counted. No web framework: `Classifier`, the HTTP
service and the stream worker share this module.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from food_classifier import runtime
from food_classifier.cache_pixels import ID_BYTES, fingerprint_id, pixel_view, same_photo
from food_classifier.defaults import CACHE_MEMORY_BYTES, CACHE_TTL_S
from food_classifier.preprocessing import PIPELINE_VERSION, ImageInput, PreprocessSpec

log = logging.getLogger("food_classifier.cache")

HIT_BYTES, HIT_PIXELS, MISS, OFF = "hit-bytes", "hit-pixels", "miss", "off"
CACHE_FORMAT = 2  # bump when keys or values change meaning: older entries are then never read


class CacheError(ValueError):
    """A cache setting that cannot work (bad URL, missing extra): a startup error, never a request error."""


class CacheableModel(Protocol):
    """What the cache needs of a model (`inference.Classifier` has it)."""
    name: str
    version: str
    variant: str
    spec: PreprocessSpec

    row_width: int  # floats per answer (Classifier.infer: probabilities, stage, not-food flag)

    def preprocess(self, image: ImageInput) -> np.ndarray: ...
    def infer(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass
class Lookup:
    """One image's way through the cache: a known `row` (`Classifier.infer`'s), or the array to run and where to
    store its row; `sha256` of the upload when it was hashed (the bytes key; reused by the server's monitor)."""
    outcome: str
    row: np.ndarray | None = None
    array: np.ndarray | None = None
    preprocess_ms: float = 0.0
    keys: dict[str, bytes] = field(default_factory=dict)  # key -> value prefix (fingerprint or its id, or b"")
    sha256: str | None = None


class Breaker:
    """Open after a failure; after `cooldown_s` let one probe through (half-open); close on its success."""

    def __init__(self, cooldown_s: float):
        self.cooldown_s = cooldown_s
        self.opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allow(self) -> bool:
        with self._lock:
            if self.opened_at is None:
                return True
            if not self._probing and time.monotonic() - self.opened_at >= self.cooldown_s:
                self._probing = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self.opened_at, self._probing = None, False

    def failure(self) -> bool:
        """Record a failure; True if this opened a closed breaker."""
        with self._lock:
            was_closed = self.opened_at is None
            self.opened_at, self._probing = time.monotonic(), False
            return was_closed


class Stats:
    """Plain counters (the serving metrics read them at scrape time; no Prometheus import here)."""

    def __init__(self) -> None:
        self.lookups: Counter[tuple[str, str, str]] = Counter()  # (model, level, hit|miss)
        self.errors: Counter[tuple[str, str]] = Counter()  # (backend, op)
        self.skipped: Counter[str] = Counter()  # backend calls skipped while the breaker was open
        self._lock = threading.Lock()

    def add(self, counter: Counter, key: Any) -> None:
        with self._lock:
            counter[key] += 1

    def lookup(self, model: str, level: str, hit: bool) -> None:
        self.add(self.lookups, (model, level, "hit" if hit else "miss"))


class MemoryLRU:
    """Thread-safe LRU whose accounted size (keys + values + a per-entry overhead) stays <= max_bytes."""

    ENTRY_OVERHEAD = 320  # Python bytes per entry beyond key + value (object headers, tuple, float, dict slot):
    # 190-300 measured with tracemalloc, depending on how full the dict table is (tests/test_cache.py)

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.size = 0
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def _cost(self, key: str, value: bytes) -> int:
        return len(key) + len(value) + self.ENTRY_OVERHEAD

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[1] <= time.monotonic():  # expired
                del self._items[key]
                self.size -= self._cost(key, item[0])
                return None
            self._items.move_to_end(key)
            return item[0]

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        cost = self._cost(key, value)
        if cost > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= self._cost(key, old[0])
            self._items[key] = (value, time.monotonic() + ttl_s)
            self.size += cost
            while self.size > self.max_bytes:
                k, (v, _) = self._items.popitem(last=False)
                self.size -= self._cost(k, v)


class RedisBackend:
    """Redis behind a circuit breaker: short timeouts, no retries, every failure is a miss (fail open)."""

    name = "redis"

    def __init__(self, url: str, stats: Stats, timeout_s: float = 0.1, breaker_s: float = 5.0):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            from food_classifier.extras import missing_extra

            raise CacheError(missing_extra("a Redis cache URL", "cache")) from None
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise CacheError("the cache URL must start with redis://, rediss:// or unix://")
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                               retry=Retry(NoBackoff(), 0), health_check_interval=0)
        except ValueError as e:
            raise CacheError(f"invalid cache URL: {e}") from None
        self._errors = (redis.RedisError, OSError)
        self.stats = stats
        self.breaker = Breaker(breaker_s)
        self.last_error: str | None = None
        self.write_error: str | None = None  # the last write's error until a write succeeds (Redis OOM: reads work)

    def _call(self, op: str, fn: Any, default: Any) -> Any:
        if not self.breaker.allow():
            self.stats.add(self.stats.skipped, self.name)
            return default
        try:
            out = fn()
        except self._errors as e:
            self.stats.add(self.stats.errors, (self.name, op))
            self.last_error = f"{e.__class__.__name__}: {e}"
            if op == "set":
                self.write_error = self.last_error
            if self.breaker.failure():
                log.warning("Redis cache unavailable (%s); serving without it, retrying in %.0f s",
                            self.last_error, self.breaker.cooldown_s)
            return default
        self.breaker.success()
        if op == "set":
            self.write_error = None
        return out

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return self._call("get", lambda: self.client.mget(keys), [None] * len(keys))

    def set_many(self, items: dict[str, bytes], ttl_s: float) -> None:
        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for k, v in items.items():
                pipe.set(k, v, px=max(1, int(ttl_s * 1000)))
            pipe.execute()
        self._call("set", write, None)

    def ping(self) -> bool:
        return bool(self._call("ping", self.client.ping, False))

    def close(self) -> None:
        self.client.close()


class PredictionCache:
    """Both levels over both backends. `memory_bytes=0` and no `url` turn it off (outcome "off")."""

    def __init__(self, memory_bytes: int = CACHE_MEMORY_BYTES, url: str | None = None,
                 ttl_s: float = CACHE_TTL_S, timeout_s: float = 0.1, breaker_s: float = 5.0):
        self.stats = Stats()
        self.ttl_s = ttl_s
        self.memory = MemoryLRU(memory_bytes) if memory_bytes > 0 else None
        self.redis = RedisBackend(url, self.stats, timeout_s, breaker_s) if url else None

    @property
    def enabled(self) -> bool:
        return self.memory is not None or self.redis is not None

    # --- the two levels ------------------------------------------------------------------------------
    def lookup(self, model: CacheableModel, image: ImageInput,
               decode: Callable[[Any], tuple[np.ndarray, float]] | None = None) -> Lookup:
        """Bytes level; on a miss decode and try the pixel level; on a miss return the array to run.
        `decode(image) -> (array, ms)` defaults to the model's preprocess (the server passes its
        memory-budgeted decoder). Blocking (hashing, decoding, Redis): call it from a worker thread."""
        decode = decode or partial(_timed, model.preprocess)
        if not self.enabled:
            array, ms = decode(image)
            return Lookup(OFF, array=array, preprocess_ms=ms)
        ns = namespace(model)
        data = _as_bytes(image)
        keys: dict[str, bytes] = {}
        sha = hashlib.sha256(data).hexdigest() if data is not None else None
        if sha is not None:
            bkey = f"{ns}b:{sha}"
            row = _row(self._get([bkey])[0], model.row_width)
            self.stats.lookup(model.name, "bytes", row is not None)
            if row is not None:
                return Lookup(HIT_BYTES, row=row, sha256=sha)
            keys[bkey] = b""
        array, ms = decode(data if data is not None else image)
        view = pixel_view(array, model.spec)
        if view is not None:
            pkeys, fingerprint = view
            fid = fingerprint_id(fingerprint)
            row = self._verified_pixel_hit(ns, pkeys, fingerprint, model.row_width, array.shape[-1])
            self.stats.lookup(model.name, "pixels", row is not None)
            if row is not None:  # verified: the same photo, so its answer may also go under its bytes key (if any)
                self._set({k: row.tobytes() for k in keys})
                return Lookup(HIT_PIXELS, row=row, preprocess_ms=ms, sha256=sha)
            keys.update({f"{ns}{k}": fid for k in pkeys})
            keys[f"{ns}f:{fid.hex()}"] = fingerprint
        return Lookup(MISS, array=array, preprocess_ms=ms, keys=keys, sha256=sha)

    def _verified_pixel_hit(self, ns: str, pkeys: list[str], fingerprint: bytes, n: int,
                            side: int) -> np.ndarray | None:
        """The answer of a photo whose pixel key matches and whose fingerprint is within tolerance of
        `fingerprint`, else None. Pixel entries name the fingerprint entry (stored once per photo)."""
        ids = [v[:ID_BYTES] for v in self._get([f"{ns}{k}" for k in pkeys])
               if v is not None and len(v) == ID_BYTES + 4 * n]
        ids = list(dict.fromkeys(ids))
        if not ids:
            return None
        for value in self._get([f"{ns}f:{i.hex()}" for i in ids]):
            row = _verified(value, fingerprint, n, side)
            if row is not None:
                return row
        return None

    def store(self, look: Lookup, row: np.ndarray) -> None:
        """Remember the model's answer for a miss under all its keys. Blocking (Redis)."""
        if look.outcome == MISS and look.keys:
            value = np.asarray(row, dtype="<f4").tobytes()
            self._set({k: prefix + value for k, prefix in look.keys.items()})

    def rows_batch(self, model: CacheableModel, images: Sequence[ImageInput], batch_size: int = 32,
                   threads: int | None = None) -> tuple[np.ndarray, list[str]]:
        """`infer` rows for `images` through the cache, misses run in chunks of `batch_size`.
        Lookups (hashing, decoding, Redis) run in a thread pool, except for a single image."""
        rows: list[np.ndarray] = []
        outcomes: list[str] = []
        with ThreadPoolExecutor(threads or runtime.default_threads()) as pool:
            run = partial(self.lookup, model)
            for chunk in runtime.chunks(images, batch_size):
                looks = [run(chunk[0])] if len(chunk) == 1 else list(pool.map(run, chunk))
                misses = [lk for lk in looks if lk.row is None]
                if misses:
                    for lk, p in zip(misses, model.infer(np.stack([lk.array for lk in misses])), strict=True):
                        lk.row = p
                        self.store(lk, p)
                rows.extend(lk.row for lk in looks)
                outcomes.extend(lk.outcome for lk in looks)
        if not rows:
            return np.zeros((0, model.row_width), dtype=np.float32), outcomes
        return np.stack(rows), outcomes

    # --- backends ------------------------------------------------------------------------------------
    def _get(self, keys: list[str]) -> list[bytes | None]:
        values = [self.memory.get(k) for k in keys] if self.memory is not None else [None] * len(keys)
        missing = [i for i, v in enumerate(values) if v is None]
        if self.redis is not None and missing:
            for i, v in zip(missing, self.redis.get_many([keys[i] for i in missing]), strict=True):
                if v is not None:
                    values[i] = v
                    if self.memory is not None:
                        self.memory.set(keys[i], v, self.ttl_s)
        return values

    def _set(self, items: dict[str, bytes]) -> None:
        if self.memory is not None:
            for k, v in items.items():
                self.memory.set(k, v, self.ttl_s)
        if self.redis is not None and items:
            self.redis.set_many(items, self.ttl_s)

    # --- health --------------------------------------------------------------------------------------
    def check(self) -> None:
        """Ping Redis if the breaker allows it (at startup and on /readyz), so `status` is current. Blocking."""
        if self.redis is not None:
            self.redis.ping()

    def status(self) -> dict[str, Any]:
        """`state`: ok, degraded (Redis failing, serving from memory or without cache) or off."""
        down = self.redis is not None and self.redis.breaker.is_open
        read_only = self.redis is not None and not down and self.redis.write_error is not None
        out: dict[str, Any] = {"state": OFF if not self.enabled else "degraded" if down or read_only else "ok",
                               "ttl_s": self.ttl_s}
        if self.memory is not None:
            out["memory"] = {"bytes": self.memory.size, "max_bytes": self.memory.max_bytes, "entries": len(self.memory)}
        if self.redis is not None:
            out["redis"] = {"state": "down" if down else "read_only" if read_only else "ok",
                            "error": self.redis.last_error if down else self.redis.write_error if read_only else None}
        return out

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()


def namespace(model: CacheableModel) -> str:
    """Key prefix: the cache format, the preprocessing code version, the model's name, version and variant."""
    return f"fc:c{CACHE_FORMAT}:p{PIPELINE_VERSION}:{model.name}:{model.version}:{model.variant}:"


def _as_bytes(image: ImageInput) -> bytes | None:
    """The upload's bytes (a readable path is read), or None (a PIL image, a missing file: no bytes level)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)) and Path(image).is_file():
        return Path(image).read_bytes()
    return None


def _row(value: bytes | None, n: int, offset: int = 0) -> np.ndarray | None:
    if value is None or len(value) != offset + 4 * n:  # absent, or written by another model layout
        return None
    return np.frombuffer(value, dtype="<f4", offset=offset)


def _verified(value: bytes | None, fingerprint: bytes, n: int, side: int) -> np.ndarray | None:
    """The answer stored with a fingerprint entry, if that fingerprint is of the same photo as `fingerprint`."""
    if value is None or len(value) != len(fingerprint) + 4 * n:
        return None
    stored = value[:len(fingerprint)]
    return _row(value, n, len(fingerprint)) if same_photo(stored, fingerprint, side) else None


def _timed(fn: Any, arg: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    return fn(arg), (time.perf_counter() - t) * 1000
