"""The worker's second transport, Redis Streams, against a real redis-server: results, dead letters, entries
of a dead consumer taken over (XAUTOCLAIM), a too-often-delivered entry dead-lettered, XACK after the result.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import COLOURS, colour_image, image_bytes
from services import RedisServer

redis = pytest.importorskip("redis")
pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(RedisServer.binary() is None, reason="redis-server not installed (apt)")]


def test_redis_stream_worker(colour_bundle):
    with RedisServer() as server:
        r = redis.Redis.from_url(server.url)
        r.xgroup_create("images", "fc", id="0", mkstream=True)
        truth = {}
        for i in range(30):
            colour = list(COLOURS)[i % 3]
            data = image_bytes(colour_image(colour, seed=i))
            r.xadd("images", {"value": json.dumps({"id": f"img-{i}", "image_b64": base64.b64encode(data).decode()}),
                              "key": f"k{i}"})
            truth[f"img-{i}"] = colour
        r.xadd("images", {"value": b"\xff\xd8 not a jpeg", "key": "corrupt"})
        # a consumer that read 5 entries and died: they stay pending until someone claims them
        stalled = r.xreadgroup("fc", "dead", {"images": ">"}, count=5)[0][1]
        poison = stalled[0][0]
        for _ in range(3):  # this one was handed out 4 times already and never acknowledged
            r.xclaim("images", "fc", "dead", 0, [poison])
        worker = subprocess.Popen(
            [sys.executable, "-m", "food_classifier.cli", "worker", str(colour_bundle), "--redis-stream", server.url,
             "--in-topic", "images", "--out-topic", "predictions", "--dlq-topic", "dead-letters", "--group", "fc",
             "--claim-idle-ms", "300", "--max-deliveries", "3"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while r.xlen("predictions") < 31 or r.xpending("images", "fc")["pending"] > 0:
                assert time.monotonic() < deadline, (r.xlen("predictions"), r.xpending("images", "fc"))
                time.sleep(0.1)
            assert worker.send_signal(signal.SIGTERM) is None and worker.wait(30) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
        results = [json.loads(f[b"value"]) for _, f in r.xrange("predictions")]
        assert len(results) == 31  # each entry answered once, the stalled ones by the new worker
        by_id = {x["id"]: x for x in results}
        poison_id = json.loads(stalled[0][1][b"value"])["id"]
        assert by_id[poison_id]["error"] == "too_many_deliveries"
        for ident, label in truth.items():
            if ident != poison_id:
                assert by_id[ident]["label"] == label and by_id[ident]["error"] is None
        corrupt = next(x for x in results if x["key"] == "corrupt")
        assert corrupt["error"] == "invalid_image"
        dead = {f[b"key"]: f for _, f in r.xrange("dead-letters")}
        assert set(dead) == {b"corrupt", b"k0"} and dead[b"corrupt"][b"error"] == b"invalid_image"
        assert dead[b"corrupt"][b"value"] == b"\xff\xd8 not a jpeg"
        r.close()
