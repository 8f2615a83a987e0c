"""The Kafka transport of the stream worker (confluent-kafka, the `kafka` extra): poll, deliver results and dead
letters, commit. The loop, the wire format and the answers are worker.py's."""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Any

from food_classifier.serving.metrics import WorkerMetrics
from food_classifier.serving.stream.worker import DeliveryFailed, InMessage, OutMessage, WorkerError

log = logging.getLogger("food_classifier.worker")


class KafkaTransport:
    """confluent-kafka consumer (manual commits) + idempotent producer for results and dead letters."""

    def __init__(self, bootstrap: str, in_topic: str, out_topic: str, group: str, dlq_topic: str | None,
                 extra: dict[str, str], metrics: WorkerMetrics, flush_timeout_s: float = 60.0):
        try:
            import confluent_kafka as ck
        except ImportError:
            from food_classifier.extras import missing_extra

            raise WorkerError(missing_extra("the Kafka worker", "kafka")) from None
        self.ck, self.metrics = ck, metrics
        self.in_topic, self.out_topic, self.dlq_topic = in_topic, out_topic, dlq_topic
        self.flush_timeout_s = flush_timeout_s
        self.max_message = int(extra.get("message.max.bytes", 1_000_000))  # librdkafka's default
        self.max_key = min(MAX_KEY_BYTES, self.max_message // 4)
        self.too_large = {ck.KafkaError.MSG_SIZE_TOO_LARGE, ck.KafkaError.RECORD_LIST_TOO_LARGE}
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
        """Produce every result and dead letter, then flush. A record over the producer's (or the broker's)
        size limit never fails the batch: an oversized key is left out and a dead letter whose value does
        not fit becomes a headers-only marker (its `source` names the input's topic/partition/offset)."""
        failures: list[str] = []
        retries: list[tuple[str, bytes | None, bytes, list]] = []

        def produce(topic: str, key: bytes | None, value: bytes, headers: list, marker: Any = None) -> None:
            def done(err: Any, _msg: Any) -> None:
                if err is not None and marker is not None and err.code() in self.too_large:
                    retries.append(marker(f"the broker refused the copy ({err.name()})"))
                elif err is not None:
                    failures.append(str(err))

            while True:
                try:
                    return self.producer.produce(topic, value, key, headers=headers or None, on_delivery=done)
                except BufferError:  # local queue full: let deliveries drain
                    self.producer.poll(0.1)
                except self.ck.KafkaException as e:
                    if marker is None or e.args[0].code() not in self.too_large:
                        raise DeliveryFailed(f"cannot produce to {topic}: {e}") from None
                    topic, key, value, headers = marker(f"over the producer's limit ({e.args[0].name()})")
                    marker = None

        for o in out:
            key = o.key if o.key is None or len(o.key) <= self.max_key else None
            produce(self.out_topic, key, json.dumps(o.result).encode(), [])
            if o.dead_letter and self.dlq_topic and o.source is not None:
                produce(*self._dead_letter(o, key), marker=partial(self._marker, o, key))
        left = self.producer.flush(self.flush_timeout_s)
        for record in retries:  # dead letters the broker found too large: their markers
            produce(*record)
        left = self.producer.flush(self.flush_timeout_s) if retries else left
        if left or failures:
            raise DeliveryFailed(f"{left} results not flushed, {len(failures)} failed: {failures[:3]}")

    def _dead_letter(self, o: OutMessage, key: bytes | None) -> tuple[str, bytes | None, bytes, list]:
        """The DLQ record: the input's value with the error in headers, or its marker when it cannot fit."""
        assert o.source is not None and o.dead_letter is not None and self.dlq_topic is not None
        headers = [(k, str(v)) for k, v in o.dead_letter.items()]
        if key is None and o.key is not None:
            headers.append(("key_omitted", f"the key of {len(o.key)} bytes is over {self.max_key} bytes"))
        value = o.source.value or b""
        size = len(value) + len(key or b"") + sum(len(k) + len(v) for k, v in headers) + RECORD_OVERHEAD
        if size > self.max_message:
            return self._marker(o, key, f"over the producer's message.max.bytes of {self.max_message}")
        return self.dlq_topic, key, value, headers

    def _marker(self, o: OutMessage, key: bytes | None, why: str) -> tuple[str, bytes | None, bytes, list]:
        """A headers-only dead letter for an input too large to copy: fetch it from `source` to replay it."""
        assert o.source is not None and o.dead_letter is not None and self.dlq_topic is not None
        size = len(o.source.value or b"")
        headers = [(k, str(v)) for k, v in o.dead_letter.items()]
        if key is None and o.key is not None:
            headers.append(("key_omitted", f"the key of {len(o.key)} bytes is over {self.max_key} bytes"))
        headers += [("value_bytes", str(size)),
                    ("value_omitted", f"the value of {size} bytes was not copied: {why}; read it at source")]
        return self.dlq_topic, key, b"", headers

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


RECORD_OVERHEAD = 512  # bytes of a produced record beyond its key, value and headers (a generous bound)
MAX_KEY_BYTES = 16 * 1024  # a longer input key is not copied to the result and dead letter (a key only routes)


def _consumer_only(key: str) -> bool:
    return key.startswith(("group.", "auto.offset", "enable.auto", "session.", "heartbeat.", "max.poll",
                           "partition.assignment", "fetch.", "isolation."))
