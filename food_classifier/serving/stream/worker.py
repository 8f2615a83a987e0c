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
import hashlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from food_classifier.answer import Answer, Options
from food_classifier.serving.codec import InvalidBase64, decode_base64
from food_classifier.serving.errors import ServiceError
from food_classifier.serving.metrics import WorkerMetrics
from food_classifier.serving.service import ImageUpload, PredictionService, build_service
from food_classifier.serving.settings import WorkerSettings

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


MAX_ID_CHARS = 256  # a JSON id longer than this is refused (it is copied into every result and header)
MAX_KEY_TEXT = 1024  # the message key as text in the result is cut here (the Kafka key itself is kept if it fits)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def check_id(ident: Any) -> Any:
    """A JSON id must be a string (<= MAX_ID_CHARS) or a finite number that fits 64 bits, or absent: it is
    copied into the result, the dead letter's headers and the prediction log, all strict JSON."""
    if ident is None or isinstance(ident, str) and len(ident) <= MAX_ID_CHARS:
        return ident
    if isinstance(ident, int) and not isinstance(ident, bool) and -2**63 <= ident < 2**64:
        return ident
    if isinstance(ident, float) and math.isfinite(ident):
        return ident
    raise WireError("invalid_id", f"'id' must be a string of at most {MAX_ID_CHARS} characters or a finite "
                                  f"64-bit number, got {_describe(ident)}")


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"an integer of {len(str(abs(value)))} digits"
    return f"{value!r}" if isinstance(value, float | bool) else f"a JSON {type(value).__name__}"


def parse_value(value: bytes | None, max_bytes: int) -> tuple[Any, bytes]:
    """(id from the JSON or None, image bytes). Raw images never start with '{', so JSON is unambiguous."""
    if not value:
        raise WireError("missing_image", "empty message value")
    if len(value) > max_bytes:
        raise WireError("body_too_large", f"message of {len(value)} bytes, limit is {max_bytes}")
    if value[:1] != b"{":
        return None, value
    try:
        payload = json.loads(value, parse_constant=_no_constant)
    except RecursionError:  # the C decoder's depth limit: a hostile nesting must not kill the worker
        raise WireError("invalid_json", "value looks like JSON but is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, NaN/Infinity, integers over 4300 digits
        raise WireError("invalid_json", f"value looks like JSON but is not: {e}") from None
    if not isinstance(payload, dict):
        raise WireError("invalid_json", "JSON value must be an object")
    ident, b64 = check_id(payload.get("id")), payload.get("image_b64")
    if not isinstance(b64, str) or not b64:
        raise WireError("missing_image", "JSON value needs a non-empty base64 'image_b64' field", ident)
    try:
        return ident, decode_base64(b64, "'image_b64'")
    except InvalidBase64 as e:
        raise WireError(e.code, e.detail, ident) from None


def _text(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        text = key.decode()
    except UnicodeDecodeError:
        text = key.hex()
    return text if len(text) <= MAX_KEY_TEXT else f"{text[:MAX_KEY_TEXT]}... ({len(key)} bytes)"


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
            out = self._answers(loop, messages)
            self.transport.deliver(out)  # raises DeliveryFailed: nothing committed, the batch replays
            self.transport.commit(messages)
            failed = sum(1 for o in out if o.dead_letter)
            self.metrics.observe_batch(len(out) - failed, failed, time.perf_counter() - start)

    def _answers(self, loop: asyncio.AbstractEventLoop, messages: list[InMessage]) -> list[OutMessage]:
        """The batch's answers; if the batch fails unexpectedly (a bug, not a bad input), each message is
        answered alone and the one that still fails gets an `internal_error` result and a dead letter, so
        no message can stop its partition (a crash would replay it forever)."""
        try:
            return loop.run_until_complete(self.process(messages))
        except Exception:
            log.exception("a batch of %d messages failed; answering them one by one", len(messages))
        out = []
        for m in messages:
            try:
                out += loop.run_until_complete(self.process([m]))
            except Exception as e:
                log.exception("message %s/%s/%s failed", m.topic, m.partition, m.offset)
                source = f"{m.topic}/{m.partition}/{m.offset}"
                detail = f"the worker failed on this message ({e.__class__.__name__})"
                result = {"id": source, "key": _text(m.key), "model": None, "model_version": None,
                          "image_sha256": None, **_answer(ServiceError(detail, status=500, code="internal_error"))}
                out.append(OutMessage(result, m.key, {"error": "internal_error", "detail": detail, "id": source,
                                                      "source": source}, m))
        return out

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
                dead = {"error": result["error"], "detail": result["detail"][:1000], "id": str(base["id"]),
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


def run_worker(settings: WorkerSettings, make_transport: Callable[[WorkerMetrics], Any]) -> None:
    """Load the models, serve metrics, run until SIGTERM/SIGINT, drain, close. `make_transport(metrics)` connects
    to Kafka (`kafka.py`) or Redis Streams (`redis_stream.py`): cli/worker.py picks from the settings."""
    model, metrics_port, metrics_host = settings.model, settings.metrics_port, settings.metrics_host
    service = build_service(settings)  # drift gauges and the prediction log cover streamed images too
    registry, serving_metrics = service.registry, service.metrics
    metrics = WorkerMetrics(serving_metrics.registry)
    loop = asyncio.new_event_loop()
    http = None
    try:
        loop.run_until_complete(registry.load_all(warm=service.warm_up))
        registry.get(model)  # an unknown --model is an error now, not at the first message
        transport = make_transport(metrics)
        worker = StreamWorker(service, transport, metrics, model, batch_size=settings.batch_size)
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
