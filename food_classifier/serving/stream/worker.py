"""The stream worker: Kafka messages in, one JSON result per message out, through `PredictionService`.
(Redis Streams is a second transport under the same loop: serving/stream/redis_stream.py.)

A thin adapter. It parses its wire format (a message value is raw image bytes, or JSON
`{"id": ..., "image_b64": ...}`), hands each micro-batch to `PredictionService.predict_batch` (the
same decode pool, batcher, model and prediction cache as the HTTP server) and formats the answers.

Delivery is at least once: a batch's offsets are committed only after its results (and dead letters)
are produced and flushed, so a crash replays the uncommitted tail; a replay gives the same answer
(same image bytes + same model version -> same probabilities, and the cache usually answers it).
A message that cannot be processed gets an error result and goes to the dead-letter topic with its
error in the headers: it never blocks its partition. SIGTERM finishes the batch in flight, commits,
and exits 0. Scale out by starting more workers with the same `--group`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from food_classifier.answer import Answer, Options
from food_classifier.serving.errors import ServiceError
from food_classifier.serving.metrics import WorkerMetrics
from food_classifier.serving.service import ImageUpload, PredictionService, build_service
from food_classifier.serving.settings import ServeSettings

log = logging.getLogger("food_classifier.worker")


class WorkerError(RuntimeError):
    """A worker that cannot run (missing extra, unreachable broker): one line, exit code 2."""


class DeliveryFailed(RuntimeError):
    """Results could not be produced: exit without committing, so the batch is replayed."""


class WireError(ValueError):
    def __init__(self, code: str, detail: str, ident: Any = None):
        super().__init__(detail)
        self.code, self.detail, self.ident = code, detail, ident


@dataclass
class InMessage:
    """One input message of any transport; `error`: the transport already knows it cannot be processed."""
    value: bytes | None
    key: bytes | None
    topic: str
    partition: int
    offset: Any
    error: WireError | None = None


@dataclass
class OutMessage:
    result: dict[str, Any]
    key: bytes | None
    dead_letter: dict[str, str] | None = None  # headers for the DLQ copy of the input, if it failed
    source: InMessage | None = field(default=None, repr=False)


def parse_value(value: bytes | None, max_bytes: int) -> tuple[Any, bytes]:
    """(id from the JSON or None, image bytes). Raw images never start with '{', so JSON is unambiguous."""
    if not value:
        raise WireError("missing_image", "empty message value")
    if len(value) > max_bytes:
        raise WireError("body_too_large", f"message of {len(value)} bytes, limit is {max_bytes}")
    if value[:1] != b"{":
        return None, value
    try:
        payload = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WireError("invalid_json", f"value looks like JSON but is not: {e}") from None
    if not isinstance(payload, dict):
        raise WireError("invalid_json", "JSON value must be an object")
    ident, b64 = payload.get("id"), payload.get("image_b64")
    if not isinstance(b64, str) or not b64:
        raise WireError("missing_image", "JSON value needs a non-empty base64 'image_b64' field", ident)
    try:
        return ident, base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise WireError("invalid_base64", "'image_b64' is not valid base64", ident) from None


def _text(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        return key.decode()
    except UnicodeDecodeError:
        return key.hex()


class StreamWorker:
    """The transport-independent loop: poll a batch, predict it, deliver, commit, repeat until stopped."""

    def __init__(self, service: PredictionService, transport: Any, metrics: WorkerMetrics,
                 model: str | None = None, top_k: int | None = None, batch_size: int = 32, poll_s: float = 0.5):
        self.service, self.transport, self.metrics = service, transport, metrics
        self.model, self.options = model, Options(top_k=top_k)
        self.batch_size, self.poll_s = batch_size, poll_s
        self.stopping = False

    def stop(self, *_: object) -> None:
        if not self.stopping:
            log.info("stopping: finishing the batch in flight")
        self.stopping = True

    def run(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self.stopping:
            messages = self.transport.poll(self.batch_size, self.poll_s)
            if not messages:
                continue
            start = time.perf_counter()
            out = loop.run_until_complete(self.process(messages))
            self.transport.deliver(out)  # raises DeliveryFailed: nothing committed, the batch replays
            self.transport.commit(messages)
            failed = sum(1 for o in out if o.dead_letter)
            self.metrics.observe_batch(len(out) - failed, failed, time.perf_counter() - start)

    async def process(self, messages: list[InMessage]) -> list[OutMessage]:
        model = self.service.registry.get(self.model)  # one version for the whole batch
        limit = self.service.settings.max_body_bytes
        parsed: list[tuple[InMessage, Any, bytes | None, WireError | None]] = []
        for m in messages:
            try:
                ident, data = parse_value(m.value, limit)
                if m.error is not None:  # e.g. delivered too often: not tried again
                    raise WireError(m.error.code, m.error.detail, ident)
                parsed.append((m, ident, data, None))
            except WireError as e:
                parsed.append((m, e.ident, None, e))
        uploads = [ImageUpload(data) for _, _, data, _ in parsed if data is not None]
        answers = iter((await self.service.predict_batch(model.name, uploads, self.options)).results)
        out = []
        for m, ident, data, wire_error in parsed:
            base = {"id": ident if ident is not None else f"{m.topic}/{m.partition}/{m.offset}", "key": _text(m.key),
                    "model": model.name, "model_version": model.version,
                    "image_sha256": hashlib.sha256(data).hexdigest() if data is not None else None}
            answer = next(answers) if data is not None else wire_error
            result = {**base, **_answer(answer)}
            dead = None
            if result["error"]:
                dead = {"error": result["error"], "detail": result["detail"], "id": str(base["id"]),
                        "source": f"{m.topic}/{m.partition}/{m.offset}"}
            out.append(OutMessage(result, m.key, dead, m))
        return out


ANSWER_KEYS = ("label", "label_idx", "confidence", "top_k", "abstained", "reason", "stage", "cache")


def _answer(a: Answer | ServiceError | WireError) -> dict[str, Any]:
    """An `Answer` (or the error in its place) as the worker's result fields: its one wire function."""
    if isinstance(a, ServiceError | WireError):
        code = a.code
        return {**dict.fromkeys(ANSWER_KEYS), "error": code, "detail": a.detail}
    body = a.to_dict()
    return {**{k: body[k] for k in ANSWER_KEYS}, "error": None, "detail": None}


class KafkaTransport:
    """confluent-kafka consumer (manual commits) + idempotent producer for results and dead letters."""

    def __init__(self, bootstrap: str, in_topic: str, out_topic: str, group: str, dlq_topic: str | None,
                 extra: dict[str, str], metrics: WorkerMetrics, flush_timeout_s: float = 60.0):
        try:
            import confluent_kafka as ck
        except ImportError:
            raise WorkerError("the Kafka worker needs the 'kafka' extra: "
                              "pip install 'food-classifier[kafka]'") from None
        self.ck, self.metrics = ck, metrics
        self.in_topic, self.out_topic, self.dlq_topic = in_topic, out_topic, dlq_topic
        self.flush_timeout_s = flush_timeout_s
        common = {"bootstrap.servers": bootstrap, "error_cb": self._error}
        self.consumer = ck.Consumer({**common, "group.id": group, "enable.auto.commit": False,
                                     "auto.offset.reset": "earliest", **extra})
        self.producer = ck.Producer({**common, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                                     **{k: v for k, v in extra.items() if not _consumer_only(k)}})
        try:
            self.consumer.list_topics(timeout=10)
        except ck.KafkaException as e:
            raise WorkerError(f"cannot reach Kafka at {bootstrap}: {e}") from None
        self._owned: set[int] = set()
        self.consumer.subscribe([in_topic], on_assign=self._assigned, on_revoke=self._revoked,
                                on_lost=self._revoked)

    def _error(self, err: Any) -> None:
        log.warning("kafka: %s", err)

    def _assigned(self, consumer: Any, partitions: list) -> None:
        self._owned |= {p.partition for p in partitions}
        self.metrics.assigned.set(len(self._owned))
        log.info("assigned partitions %s", sorted(self._owned))

    def _revoked(self, consumer: Any, partitions: list) -> None:
        self._owned -= {p.partition for p in partitions}
        self.metrics.assigned.set(len(self._owned))

    def poll(self, max_messages: int, timeout_s: float) -> list[InMessage]:
        out = []
        for m in self.consumer.consume(max_messages, timeout_s):
            if m.error():
                log.warning("kafka consume: %s", m.error())
                continue
            out.append(InMessage(m.value(), m.key(), m.topic(), m.partition(), m.offset()))
        return out

    def deliver(self, out: list[OutMessage]) -> None:
        failures: list[str] = []

        def done(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        def produce(topic: str, key: bytes | None, value: bytes, headers: list | None = None) -> None:
            while True:
                try:
                    return self.producer.produce(topic, value, key, headers=headers, on_delivery=done)
                except BufferError:  # local queue full: let deliveries drain
                    self.producer.poll(0.1)

        for o in out:
            produce(self.out_topic, o.key, json.dumps(o.result).encode())
            if o.dead_letter and self.dlq_topic and o.source is not None:
                produce(self.dlq_topic, o.key, o.source.value or b"", list(o.dead_letter.items()))
        left = self.producer.flush(self.flush_timeout_s)
        if left or failures:
            raise DeliveryFailed(f"{left} results not flushed, {len(failures)} failed: {failures[:3]}")

    def commit(self, messages: list[InMessage]) -> None:
        last: dict[tuple[str, int], int] = {}
        for m in messages:
            last[(m.topic, m.partition)] = max(m.offset, last.get((m.topic, m.partition), -1))
        offsets = [self.ck.TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except self.ck.KafkaException as e:  # e.g. partitions moved in a rebalance: they will be replayed
            self.metrics.commit_failures.inc()
            log.warning("commit failed (the batch may be processed again): %s", e)
        for (t, p), o in last.items():
            try:
                high = self.consumer.get_watermark_offsets(self.ck.TopicPartition(t, p), cached=True)[1]
                self.metrics.lag.labels(t, str(p)).set(max(0, high - o - 1))
            except self.ck.KafkaException:
                pass

    def close(self) -> None:
        self.producer.flush(self.flush_timeout_s)
        self.consumer.close()  # leaves the group now: the partitions move to the other workers at once


def _consumer_only(key: str) -> bool:
    return key.startswith(("group.", "auto.offset", "enable.auto", "session.", "heartbeat.", "max.poll",
                           "partition.assignment", "fetch.", "isolation."))


def run_worker(settings: ServeSettings, make_transport: Callable[[WorkerMetrics], Any], model: str | None = None,
               top_k: int | None = None, batch_size: int = 32, metrics_port: int = 0,
               metrics_host: str = "0.0.0.0") -> None:
    """Load the models, serve metrics, run until SIGTERM/SIGINT, drain, close."""
    service = build_service(settings)  # drift gauges and the prediction log cover streamed images too
    registry, serving_metrics = service.registry, service.metrics
    metrics = WorkerMetrics(serving_metrics.registry)
    loop = asyncio.new_event_loop()
    http = None
    try:
        loop.run_until_complete(registry.load_all(warm=service.warm_up))
        registry.get(model)  # an unknown --model is an error now, not at the first message
        transport = make_transport(metrics)
        worker = StreamWorker(service, transport, metrics, model, top_k, batch_size)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, worker.stop)
        if metrics_port:
            from prometheus_client import start_http_server

            http, _ = start_http_server(metrics_port, metrics_host, registry=serving_metrics.registry)
        log.info("worker ready: model %s", registry.get(model).version)
        try:
            worker.run(loop)
        finally:
            transport.close()
        log.info("stopped cleanly")
    finally:
        if http is not None:
            http.shutdown()
        service.shutdown()
        loop.close()
