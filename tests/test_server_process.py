"""The real server process (uvicorn, `python -m food_classifier.serving`) over real HTTP.

Reload under concurrent load with zero failed requests (endpoint and SIGHUP), bounded memory under
hundreds of bad requests, API key over the wire, clean shutdown.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
from conftest import colour_image, image_bytes, make_colour_bundle
from helpers import png_with_size

from food_classifier.client import Client, PredictionError
from food_classifier.testing import ServerProcess, rss_mb

pytestmark = pytest.mark.live
KEY = "process-test-key"
ADMIN = "process-admin-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("served")
    make_colour_bundle(models / "colour" / "v1", version="v1", created_at="2026-01-01T00:00:00")
    srv = ServerProcess([models / "colour"], env={"FOOD_CLASSIFIER_API_KEY": KEY, "FOOD_CLASSIFIER_ADMIN_KEY": ADMIN},
                        args=["--max-body-bytes", "1000000", "--ort-threads", "1"], ready_timeout=60)
    srv.start()
    srv.models = models
    yield srv
    # SIGTERM: graceful shutdown, then uvicorn re-raises the signal (so -15, not -9 from a kill)
    assert srv.stop() in (0, -signal.SIGTERM)


@pytest.fixture
def client(server):
    with Client(server.url, api_key=KEY) as c:
        yield c


def test_http_roundtrip_with_api_key(server, client):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    r = httpx.post(server.url + "/predict", content=image_bytes(colour_image("red")),
                   headers={"content-type": "image/jpeg"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert client.predict(image_bytes(colour_image("red")))["label"] == "red"
    assert client.predict(image_bytes(colour_image("blue")), raw=True, model="colour")["label"] == "blue"
    res = client.predict_batch([image_bytes(colour_image(c)) for c in ("green", "red")])
    assert [x["label"] for x in res] == ["green", "red"]
    with pytest.raises(PredictionError) as e:
        client.predict(b"garbage")
    assert e.value.status == 415 and e.value.error == "invalid_image"


def test_reload_under_concurrent_load_has_zero_failures(server):
    failures: list[str] = []
    seen: dict[int, list[str]] = {}
    stop = threading.Event()
    data = {c: image_bytes(colour_image(c)) for c in ("red", "green", "blue")}

    def hammer(worker: int) -> None:
        versions = seen.setdefault(worker, [])
        with Client(server.url, api_key=KEY, timeout=30) as c:
            i = 0
            while not stop.is_set():
                colour = ("red", "green", "blue")[i % 3]
                i += 1
                try:
                    r = c.predict(data[colour])
                    if r["label"] != colour:
                        failures.append(f"wrong label {r['label']} for {colour}")
                    if not versions or versions[-1] != r["model_version"]:
                        versions.append(r["model_version"])
                except Exception as e:  # noqa: BLE001 - every failure counts
                    failures.append(repr(e))

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        make_colour_bundle(server.models / "colour" / "v2", version="v2", created_at="2026-02-01T00:00:00",
                           scale=6.0)
        with Client(server.url, api_key=ADMIN) as admin:
            assert admin.reload("colour")["version"] == "v2"
            time.sleep(0.5)
            make_colour_bundle(server.models / "colour" / "v3", version="v3", created_at="2026-03-01T00:00:00",
                               scale=8.0)
            server.signal(signal.SIGHUP)  # reload every model
            deadline = time.monotonic() + 20
            while admin.models()[0]["version"] != "v3":
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    for versions in seen.values():
        assert versions == ["v1", "v2", "v3"], seen  # each client saw every swap, never back


def test_memory_stays_bounded_under_bad_requests(server):
    junk = b"\xff\xd8\xff" + b"\x17" * 900_000  # claims to be a JPEG, 0.9 MB of nonsense
    oversized = b"\x00" * 1_500_000  # over the server's 1 MB limit
    bomb = png_with_size(20000, 20000)
    truncated = image_bytes(colour_image("red", size=(640, 480)))[:2000]
    cases = [(junk, 415), (oversized, 413), (bomb, 413), (truncated, 415)]

    def blast(http: httpx.Client, rounds: int) -> None:
        for _ in range(rounds):
            for body, status in cases:
                r = http.post("/predict", content=body, headers={"content-type": "image/jpeg"})
                assert r.status_code == status and set(r.json()) == {"error", "detail"}

    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=30) as http:
        blast(http, 10)  # warm every code path and allocator pool first
        before = rss_mb(server.pid)
        blast(http, 75)  # 300 bad requests
        after = rss_mb(server.pid)
        r = http.post("/predict", content=image_bytes(colour_image("green")), headers={"content-type": "image/jpeg"})
        assert r.json()["label"] == "green"
    assert after - before < 30, f"RSS grew {after - before:.1f} MB ({before:.0f} -> {after:.0f})"


def test_reloads_do_not_grow_memory(server):
    """Each reload builds a new session; freed native memory must go back (serving/memory.py)."""
    client = Client(server.url, api_key=ADMIN)  # the admin key passes where the API key does
    for _ in range(3):
        client.reload("colour")
    time.sleep(1.2)  # the delayed malloc_trim after a swap
    before = rss_mb(server.pid)
    for _ in range(15):
        client.reload("colour")
        client.predict(image_bytes(colour_image("red")))
    time.sleep(1.2)
    assert rss_mb(server.pid) - before < 15
