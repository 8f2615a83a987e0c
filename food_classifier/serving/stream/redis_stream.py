"""Redis Streams as the worker's second transport: the same `StreamWorker` loop and wire format as Kafka.

An input entry carries the message in its `value` field (raw image bytes, or the JSON form) and may
carry a `key`. XREADGROUP reads new entries for this consumer; results (and dead letters) are XADDed
and only then are the inputs XACKed, so a crash leaves them pending (at least once). Entries that a
consumer read but never acknowledged (it died) are taken over with XAUTOCLAIM once idle for
`claim_idle_ms`; one delivered more than `max_deliveries` times is not tried again: it gets an error
result and goes to the dead-letter stream. Needs the `cache` extra (the redis client).
"""

from __future__ import annotations

import logging
import os
import socket
import time

from food_classifier.serving.metrics import WorkerMetrics
from food_classifier.serving.stream.worker import DeliveryFailed, InMessage, OutMessage, WireError, WorkerError

log = logging.getLogger("food_classifier.worker")
CLAIM_EVERY_S = 1.0  # how often to look for stalled entries


class RedisStreamTransport:
    def __init__(self, url: str, in_stream: str, out_stream: str, group: str, dlq_stream: str | None,
                 metrics: WorkerMetrics, claim_idle_ms: int = 60_000, max_deliveries: int = 5):
        try:
            import redis
        except ImportError:
            from food_classifier.extras import missing_extra

            raise WorkerError(missing_extra("--redis-stream", "cache")) from None
        self.redis_error = redis.RedisError
        try:
            self.r = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
            self.r.ping()
        except (ValueError, redis.RedisError) as e:
            raise WorkerError(f"cannot reach Redis at {url}: {e}") from None
        self.in_stream, self.out_stream, self.dlq_stream, self.group = in_stream, out_stream, dlq_stream, group
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms, self.max_deliveries = claim_idle_ms, max_deliveries
        self.metrics = metrics
        self._claimed_at = 0.0
        try:
            self.r.xgroup_create(in_stream, group, id="0", mkstream=True)  # from the start, like Kafka's earliest
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        metrics.assigned.set(1)

    def _message(self, entry_id: bytes, fields: dict[bytes, bytes], error: WireError | None = None) -> InMessage:
        return InMessage(fields.get(b"value"), fields.get(b"key") or None, self.in_stream, 0, entry_id.decode(),
                         error=error)

    def _claim(self, count: int) -> list[InMessage]:
        """Entries idle in another (dead) consumer's pending list, taken over by this one."""
        if time.monotonic() - self._claimed_at < CLAIM_EVERY_S:
            return []
        self._claimed_at = time.monotonic()
        entries = self.r.xautoclaim(self.in_stream, self.group, self.consumer, self.claim_idle_ms, "0-0",
                                    count=count)[1]
        entries = [(i, f) for i, f in entries if f is not None]
        if not entries:
            return []
        pending = self.r.xpending_range(self.in_stream, self.group, min=entries[0][0], max=entries[-1][0],
                                        count=len(entries) * 4, consumername=self.consumer)
        deliveries = {p["message_id"]: p["times_delivered"] for p in pending}
        out = []
        for entry_id, fields in entries:
            n = deliveries.get(entry_id, 1)
            error = None
            if n > self.max_deliveries:
                error = WireError("too_many_deliveries", f"delivered {n} times without being acknowledged")
            out.append(self._message(entry_id, fields, error))
        log.info("claimed %d stalled entries", len(out))
        return out

    def poll(self, max_messages: int, timeout_s: float) -> list[InMessage]:
        messages = self._claim(max_messages)
        if messages:
            return messages
        resp = self.r.xreadgroup(self.group, self.consumer, {self.in_stream: ">"}, count=max_messages,
                                 block=max(1, int(timeout_s * 1000)))
        return [self._message(i, f) for _, entries in resp or [] for i, f in entries]

    def deliver(self, out: list[OutMessage]) -> None:
        import json

        pipe = self.r.pipeline(transaction=False)
        for o in out:
            pipe.xadd(self.out_stream, {"value": json.dumps(o.result), "key": o.key or b""})
            if o.dead_letter and self.dlq_stream and o.source is not None:
                pipe.xadd(self.dlq_stream, {"value": o.source.value or b"", "key": o.key or b"", **o.dead_letter})
        try:
            pipe.execute()
        except self.redis_error as e:
            raise DeliveryFailed(f"results not written to Redis: {e}") from None

    def commit(self, messages: list[InMessage]) -> None:
        try:
            self.r.xack(self.in_stream, self.group, *[m.offset for m in messages])
            lag = next((g.get("lag") for g in self.r.xinfo_groups(self.in_stream)
                        if g["name"] == self.group.encode()), None)
            if lag is not None:
                self.metrics.lag.labels(self.in_stream, "0").set(lag)
        except self.redis_error as e:  # not acknowledged: claimed again later, processed twice
            self.metrics.commit_failures.inc()
            log.warning("XACK failed (the batch may be processed again): %s", e)

    def close(self) -> None:
        self.r.close()
