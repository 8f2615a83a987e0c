"""Server configuration: the one declaration of every serve setting.

Each field is, at once: a `food-classifier serve` flag (`--kebab-name`, built from this class by
`cli/serve.py`, its help from the `description`, its default shown from the field's default), an
environment variable `FOOD_CLASSIFIER_<FIELD>` (list fields take comma-separated values) and what the
app and the middleware read. Adding a field adds the flag. The CLI passes only the flags that were
given, so flags win over the environment and the environment wins over the defaults below. The
defaults for the thread counts and the micro-batcher come from measurements on a 2-core CPU
(docs/SERVING.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from food_classifier.answer import AUTO as VARIANT_AUTO
from food_classifier.defaults import (
    CACHE_MEMORY_BYTES,
    CACHE_TTL_S,
    MAX_PIXELS,
    MAX_WORKERS,
    PREDICTION_LOG_MAX_BYTES,
    MiB,
)
from food_classifier.defaults import usable_cpus as _usable_cpus


@dataclass(frozen=True)
class Cli:
    """How a field appears on the command line, beyond the default `--kebab-name` option."""

    positional: bool = False  # the command's arguments instead of an option
    short: str | None = None  # an extra short flag, e.g. "-p"


def usable_cpus() -> int:
    return _usable_cpus(MAX_WORKERS)


def _split(value: object) -> object:
    """Accept 'a,b' (and os.pathsep) strings from env vars as lists."""
    if isinstance(value, str):
        parts = value.replace(os.pathsep, ",").split(",")
        return [p.strip() for p in parts if p.strip()]
    return value


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FOOD_CLASSIFIER_", extra="forbid", frozen=True)

    bundles: Annotated[list[Path], NoDecode, Cli(positional=True)] = Field(
        default_factory=list, description="Bundle dir, model dir (serves its promoted, else newest version) or "
                                          "dir of model dirs; several allowed. The first model is the default. "
                                          "None: the built-in model.")
    host: str = Field("0.0.0.0", description="Interface to bind.")
    port: Annotated[int, Cli(short="-p")] = Field(8383, ge=0, le=65535, description="Port.")
    default_model: str | None = Field(None, description="Model behind /predict (default: the first one).")
    variant: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Model variant: auto (default: the bundle's recommended one: its cascade when it ships one, "
                    "else int8 when its own measurement did not advise against it, else fp32), cascade, fp32 "
                    "(the whole graph) or int8, for all models, or NAME=VARIANT for one model.")
    api_key: SecretStr | None = Field(None, description="Require this key (X-API-Key, Bearer, or Basic password) "
                                                        "on every endpoint but /healthz and /readyz; prefer the "
                                                        "env var, flags show up in `ps`.")
    admin_key: SecretStr | None = Field(None, description="Key for the management endpoints (reload), sent like "
                                                          "the API key; it also passes where the API key does. "
                                                          "None: reload over HTTP is off (SIGHUP still reloads).")
    allow_path_root: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Enable the seed's GET /predict?image_path=... for files under this "
                                          "dir (off when none is given).")

    max_body_bytes: int = Field(10 * MiB, ge=1024, description="Request body limit in bytes (413 above it).")
    max_batch_body_bytes: int = Field(64 * MiB, ge=1024, description="Body limit of predict-batch requests.")
    max_batch_images: int = Field(64, ge=1, description="Images per predict-batch request.")
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="Decoded pixels per image (more, e.g. a "
                                                          "decompression bomb, is a 413).")
    top_k: int = Field(5, ge=1, description="Default number of top-k entries in responses.")
    # docs/SERVING.md, "Large images": a 6000x6000 PNG needs 144 MB decoded; with 256 MiB only one such
    # image decodes at a time, and an image of --max-pixels still fits alone.
    decode_memory_mb: int = Field(256, ge=16, description="Memory budget (MiB) shared by the images being "
                                                          "decoded; larger images wait their turn (not an "
                                                          "error), small ones (<= 1/16 of it) never wait.")

    # Connection limits, enforced by uvicorn and serving/http/protocol.py (docs/SERVING.md, "Limits").
    limit_concurrency: int = Field(512, ge=1, description="Open connections + requests in progress; above it "
                                                          "uvicorn answers 503 (plain text).")
    header_timeout: float = Field(10.0, gt=0, description="Seconds for a client to send the request line and "
                                                          "headers (then 408 and close).")
    body_timeout: float = Field(30.0, gt=0, description="Seconds to wait for the next part of a request body "
                                                        "(then 408).")
    keep_alive_timeout: float = Field(5.0, gt=0, description="Seconds an idle keep-alive connection stays open.")
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="Request line + headers limit in bytes "
                                                                  "(then 431).")
    shutdown_timeout: float = Field(10.0, ge=0, description="On SIGTERM, seconds requests in progress may take "
                                                            "to finish; those still running then get 503.")

    # Measured on the 2-core machine (docs/SERVING.md): one ORT thread per call, one call per CPU, cost
    # 20 ms CPU per 288 px image, two threads per call 30-38 ms (the idle thread spins); with one thread
    # a batch of 8 costs the same per image as a batch of 1, while ORT's arena grows ~17 MB per batched
    # image. So: no batching by default on this CPU; raise batch_max_size where a call has overhead
    # to amortize (small models, --ort-threads 2). With batching off each decode thread makes its own image's
    # model call (one thread hop per image); one thread more than CPUs keeps both cores busy while a thread
    # hands its answer back: 1.73 -> 1.87 cores used and +12 % img/s at concurrency 8 (docs/BENCHMARKS.md).
    ort_threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per model call.")
    inference_workers: int = Field(default_factory=usable_cpus, ge=1,
                                   description="Batched model calls that may run at the same time, with "
                                               "--batch-max-size > 1 (default: one per CPU).")
    decode_threads: int = Field(default_factory=lambda: usable_cpus() + 1, ge=1,
                                description="Threads that decode and preprocess images and, with batching off, "
                                            "make each image's model call (default: one per CPU, plus one).")
    batch_max_size: int = Field(1, ge=1, description="Micro-batch size limit (1 = no batching).")
    batch_max_wait_ms: float = Field(2.0, ge=0, description="Longest wait in ms for images still decoding, when "
                                                            "batching (0 = never wait).")
    warmup: bool = Field(True, description="Run each model once per batch shape before /readyz turns green.")

    # Prediction cache (food_classifier/cache.py, docs/SCALING.md): in-process LRU in front of optional Redis.
    cache_bytes: int = Field(CACHE_MEMORY_BYTES, ge=0,
                             description="In-process prediction cache size in bytes (0 = off).")
    cache_url: SecretStr | None = Field(
        None, description="Redis URL (redis://host:6379/0) of a prediction cache shared by replicas; "
                          "needs the 'cache' extra.")
    cache_ttl: float = Field(CACHE_TTL_S, gt=0, description="Seconds a cached prediction lives (default one day).")
    cache_timeout_ms: float = Field(100.0, gt=0, description="Redis connect and read timeout; past it the request "
                                                             "goes on without the cache.")
    cache_breaker_s: float = Field(5.0, ge=0, description="After a Redis error, skip Redis this long, then retry.")

    # Ray Serve (serving/ray_serve.py, docs/SCALING.md): the same app in Ray replicas; needs the 'ray' extra.
    engine: Literal["uvicorn", "ray"] = Field("uvicorn", description="uvicorn: serve from this process; ray: a Ray "
                                                                     "Serve deployment of the same app.")
    ray_address: str | None = Field(None, description="With --engine ray: the cluster to join (auto, "
                                                      "ray://HOST:10001); none: start a local Ray on loopback.")
    replicas: str = Field("1", pattern=r"^(auto|[1-9][0-9]*)$",
                          description="With --engine ray: N replicas, or auto (Ray autoscaling between the "
                                      "min and max replicas below).")
    min_replicas: int = Field(1, ge=0, description="Autoscaling: fewest replicas (0 = scale to zero when idle).")
    max_replicas: int = Field(default_factory=usable_cpus, ge=1, description="Autoscaling: most replicas "
                                                                             "(default: one per CPU here).")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Autoscaling: requests in flight per replica "
                                                                  "that Ray aims for.")
    max_ongoing_requests: int = Field(8, ge=1, description="With --engine ray: requests a replica takes at once; "
                                                           "more wait in Ray's queue.")
    replica_cpus: float = Field(1.0, gt=0, description="With --engine ray: CPUs Ray reserves per replica.")

    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level.")
    access_log: bool = Field(False, description="Log every request (costs throughput).")

    # gRPC and monitoring (docs/SERVING.md)
    grpc_port: int | None = Field(None, ge=0, le=65535, description="Also serve gRPC on this port, same models "
                                                                    "and limits (off by default; needs the grpc "
                                                                    "extra).")
    monitor_window: int = Field(1000, ge=1, description="Predictions per model in the drift window (cache hits "
                                                        "are counted apart).")
    feedback_memory: int = Field(50_000, ge=0, description="Recent predictions remembered for feedback by "
                                                           "request_id or sha256.")
    prediction_log: Path | None = Field(None, description="Write every prediction and feedback as JSON lines "
                                                          "into this dir (off when not given).")
    prediction_log_max_bytes: int = Field(PREDICTION_LOG_MAX_BYTES, ge=1024,
                                          description="Rotate the prediction log at this size.")
    prediction_log_keep: int | None = Field(None, ge=0, description="Rotated prediction-log files to keep: at "
                                                                    "each rotation the oldest beyond this many "
                                                                    "are deleted (default: keep all).")
    log_images_sample: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of images saved beside the "
                                                                      "prediction log, for later labelling.")
    # Kept photos (monitoring/keep.py, docs/MONITORING.md "Kept photos"): the photos worth a label.
    keep_photos: Path | None = Field(None, description="Keep the photos the model is least sure of, plus a random "
                                                       "sample, in this dir, for the label command (off when "
                                                       "not given).")
    keep_max_mb: int = Field(1024, ge=1, description="Size bound (MiB) of the kept photos; past it the least "
                                                     "informative, then the oldest, are removed first.")
    keep_sample: float = Field(0.01, ge=0.0, le=1.0, description="Fraction of the other photos kept at random (an "
                                                                 "unbiased sample for accuracy estimates).")
    keep_margin: float = Field(0.2, ge=0.0, le=1.0, description="Keep a photo when its two most probable classes "
                                                                "are closer than this (abstained and not food "
                                                                "answers are always kept).")
    keep_data: Path | None = Field(None, description="Training folder where feedback on a kept photo is written as "
                                                     "<label>/<sha256>.jpg, as the label page does (default: "
                                                     "KEEP_PHOTOS/labelled).")

    # Shadow mode (serving/shadow.py, docs/MONITORING.md "Champion and challenger"): a second version, never served.
    shadow: str | None = Field(None, description="Also run this version (a version dir of a served model, or a bundle "
                                                 "dir) on a sample of live photos, off the hot path; agreement goes "
                                                 "to the metrics, disagreements to the kept photos (off when not "
                                                 "given).")
    shadow_sample: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of live photos the shadow version "
                                                                  "also answers.")

    _split_lists = field_validator("bundles", "variant", "allow_path_root", mode="before")(
        classmethod(lambda cls, v: _split(v)))
    _lower = field_validator("log_level", mode="before")(classmethod(lambda cls, v: v.lower()
                                                                      if isinstance(v, str) else v))

    @field_validator("api_key", "admin_key")
    @classmethod
    def _sendable(cls, v: SecretStr | None) -> SecretStr | None:
        """A key must survive an HTTP header: no control characters, no edge spaces (Bearer strips them).
        Non-ASCII is fine: every way of sending it is compared as UTF-8 bytes (middleware.py)."""
        if v is None:
            return v
        raw = v.get_secret_value()
        if not raw or raw != raw.strip() or any(ord(c) < 32 or ord(c) == 127 for c in raw):
            raise ValueError("must be non-empty, without control characters or leading/trailing spaces")
        return v

    @model_validator(mode="after")
    def _distinct_keys(self) -> ServeSettings:
        if self.admin_key is not None and self.admin_key == self.api_key:
            raise ValueError("admin_key must differ from api_key (every client holds the API key)")
        return self

    def variant_for(self, model: str) -> str:
        """The variant asked for `model`: a NAME=VARIANT entry, else a bare VARIANT entry, else auto."""
        default = VARIANT_AUTO
        for item in self.variant:
            name, sep, var = item.partition("=")
            if sep and name.strip() == model:
                return var.strip()
            if not sep:
                default = item.strip()
        return default

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None

    def admin_key_value(self) -> str | None:
        return self.admin_key.get_secret_value() if self.admin_key else None


class WorkerSettings(ServeSettings):
    """`food-classifier worker`: the service's settings (the same `FOOD_CLASSIFIER_*` env vars) plus the stream's.
    `cli/worker.py` builds the worker's flags from these fields, as `serve`'s from `ServeSettings`."""

    kafka: str | None = Field(None, description="Kafka bootstrap servers, host:port[,host:port...].")
    redis_stream: str | None = Field(None, description="Use Redis Streams instead of Kafka (redis://host:6379/0): "
                                                       "topics are stream names, the group a consumer group.")
    in_topic: str = Field("food.images", min_length=1, description="Images to classify.")
    out_topic: str = Field("food.predictions", min_length=1, description="One JSON result per input.")
    group: str = Field("food-classifier", min_length=1, description="Consumer group: workers in one group share "
                                                                    "the partitions.")
    dlq_topic: str = Field("food.images.dlq", description="Inputs that failed, with their error in the headers; "
                                                         "'' to not write them.")
    kafka_config: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="librdkafka KEY=VALUE for the consumer and producer (e.g. "
                                          "security.protocol=SASL_SSL); repeatable, comma-separated in the env var.")
    claim_idle_ms: int = Field(60_000, ge=1, description="Redis Streams: take over entries another consumer left "
                                                          "unacknowledged this long.")
    max_deliveries: int = Field(5, ge=1, description="Redis Streams: dead-letter an entry delivered more often "
                                                     "than this.")
    model: str | None = Field(None, description="Model name (default: the first).")
    batch_size: int = Field(32, ge=1, description="Messages per micro-batch.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Serve Prometheus /metrics on this port (0 = off).")
    metrics_host: str = Field("0.0.0.0", description="Interface for the metrics port.")

    _split_config = field_validator("kafka_config", mode="before")(  # not os.pathsep: values may hold ':'
        classmethod(lambda cls, v: [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v))

    @field_validator("kafka_config")
    @classmethod
    def _pairs(cls, v: list[str]) -> list[str]:
        for item in v:
            key, sep, _ = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"wants KEY=VALUE, got {item!r}")
        return v

    @model_validator(mode="after")
    def _one_stream(self) -> WorkerSettings:
        if bool(self.kafka) == bool(self.redis_stream):
            raise ValueError("give one of --kafka BOOTSTRAP (e.g. --kafka localhost:9092) or --redis-stream URL")
        return self

    def kafka_extra(self) -> dict[str, str]:
        return {k.strip(): v.strip() for k, _, v in (item.partition("=") for item in self.kafka_config)}
