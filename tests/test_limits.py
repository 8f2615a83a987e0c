"""Resource limits against the real server: stalled sockets, oversized heads, connection cap, dropped
uploads, the graceful-shutdown timeout, the decode-memory budget; then the keys (admin, non-ASCII).

The servers run with limits of a second or so, so every wait here is short and bounded.
"""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import rawhttp
from conftest import colour_image, image_bytes, make_colour_bundle
from fastapi.testclient import TestClient
from helpers import JPEG, assert_error, jpg, ready_client
from hostile_corpus import saved
from PIL import Image
from pydantic import ValidationError

from food_classifier.serving.admission import DecodeBudget
from food_classifier.serving.http.app import create_app
from food_classifier.serving.settings import ServeSettings
from food_classifier.testing import ServerProcess

LIMITS = ["--header-timeout", "1", "--body-timeout", "1", "--keep-alive-timeout", "1", "--max-header-bytes", "4096",
          "--limit-concurrency", "40", "--max-body-bytes", "100000", "--ort-threads", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    make_colour_bundle(root / "colour" / "v1", version="v1")
    return root


@pytest.fixture(scope="module")
def live(models):
    log = models / "server.log"
    with ServerProcess([models / "colour"], args=LIMITS, log_path=log) as srv:
        yield srv
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI" not in text, text[-3000:]


def good_request(srv: ServerProcess) -> httpx.Response:
    return httpx.post(srv.url + "/predict", content=jpg("red"), headers={"content-type": "image/jpeg"}, timeout=10)


@pytest.mark.live
def test_stalled_connections_are_closed(live):
    idle = [rawhttp.connect(live.port) for _ in range(10)]
    partial_head = [rawhttp.connect(live.port) for _ in range(10)]
    partial_body = [rawhttp.connect(live.port) for _ in range(10)]
    start = time.monotonic()
    for s in partial_head:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n")  # no blank line
    for s in partial_body:  # Content-Length larger than what is sent
        s.sendall(rawhttp.request_head("POST", "/predict", {"Content-Type": "image/jpeg"}, 50_000) + b"\xff" * 500)
    assert good_request(live).json()["label"] == "red"  # 30 stalled sockets do not block anyone
    for s in partial_head + partial_body:
        status, headers, body = rawhttp.read_response(s)
        assert status == 408 and headers["content-type"] == "application/json", body
        assert b'"error":' in body and b"request_timeout" in body
    for s in idle + partial_head + partial_body:
        assert rawhttp.closed_by_peer(s)
        s.close()
    assert time.monotonic() - start < 6  # 1 s limits, not the 30+ s before


@pytest.mark.live
def test_protocol_errors_are_json(live):
    cases = [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n", 431, "request_header_too_large"),
        (b"GET /" + b"a" * 6000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, "request_header_too_large"),
        (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400, "bad_http_request"),
        (b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400,
         "bad_http_request"),
        (b"NOT A REQUEST\r\n\r\n", 400, "bad_http_request"),
    ]
    for raw, status, code in cases:
        with rawhttp.connect(live.port) as s:
            s.sendall(raw)
            got, headers, body = rawhttp.read_response(s)
            assert (got, headers["content-type"]) == (status, "application/json"), body
            assert code.encode() in body
    assert good_request(live).status_code == 200


@pytest.mark.live
def test_connection_cap_answers_503(live):
    socks = [rawhttp.connect(live.port) for _ in range(40)]  # the cap counts open connections
    try:
        r = good_request(live)
        assert r.status_code == 503 and r.text == "Service Unavailable"  # uvicorn's own, docs/SERVING.md
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 5
    while good_request(live).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.live
def test_dropped_uploads_are_499_with_one_log_line(live):
    pattern = re.compile(r'food_classifier_requests_total\{endpoint="/predict",model="colour",status="499"\} (\S+)')

    def count() -> float:
        m = pattern.search(httpx.get(live.url + "/metrics").text)
        return float(m.group(1)) if m else 0.0

    before, logged = count(), live.log_path.read_text().count("client disconnected during the request body")
    for _ in range(20):
        with rawhttp.connect(live.port) as s:
            head = rawhttp.request_head("POST", "/predict", {"Content-Type": "image/jpeg"}, 50_000)
            s.sendall(head + b"\xff" * 1000)
    deadline = time.monotonic() + 5
    while count() < before + 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count() == before + 20
    log = live.log_path.read_text()
    assert log.count("client disconnected during the request body") == logged + 20
    assert "Traceback" not in log and 'status="500"' not in httpx.get(live.url + "/metrics").text


@pytest.mark.live
def test_early_413_reaches_clients_still_sending(live):
    """The 413 goes out on the declared size, before the body is read. Closing with unread body data would
    reset the connection and destroy the answer (without the lingering close, ~70 % of these failed)."""
    body = b"\xff" * 1_500_000

    async def main() -> list[int | str]:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
            async def some() -> list[int | str]:
                out: list[int | str] = []
                for _ in range(6):
                    try:
                        r = await client.post("/predict", content=body, headers={"content-type": "image/jpeg"})
                        out.append(r.status_code)
                    except httpx.HTTPError as e:
                        out.append(type(e).__name__)
                return out
            return [x for xs in await asyncio.gather(*(some() for _ in range(8))) for x in xs]

    assert asyncio.run(main()) == [413] * 48


@pytest.mark.live
def test_idle_keep_alive_connection_is_closed(live):
    with rawhttp.connect(live.port) as s:
        s.sendall(rawhttp.request_head("GET", "/healthz"))
        assert rawhttp.read_response(s)[0] == 200
        start = time.monotonic()
        assert rawhttp.closed_by_peer(s) and time.monotonic() - start < 3


@pytest.mark.live
def test_requests_cut_by_the_shutdown_timeout_get_json_503(models):
    log = models / "shutdown.log"
    srv = ServerProcess([models / "colour"], args=["--shutdown-timeout", "1", "--body-timeout", "30"], log_path=log)
    with srv, rawhttp.connect(srv.port) as s:
        s.sendall(rawhttp.request_head("POST", "/predict", {"Content-Type": "image/jpeg"}, 50_000) + b"\xff" * 10)
        time.sleep(0.3)
        srv.signal(signal.SIGTERM)
        start = time.monotonic()
        status, headers, body = rawhttp.read_response(s)
        assert (status, headers["content-type"]) == (503, "application/json") and b"shutting_down" in body
        assert time.monotonic() - start < 5
        assert srv.proc.wait(10) in (0, -signal.SIGTERM)
    assert "Traceback" not in log.read_text()


@pytest.mark.live
def test_the_decode_budget_queues_large_images_instead_of_failing(models):
    """16 MiB budget: each 2500x2500 PNG (25 MB decoded) decodes alone; all of them answer 200, and the
    later ones report the time they queued."""
    big = saved(Image.new("RGB", (2500, 2500), (30, 40, 220)), "PNG")
    args = ["--decode-memory-mb", "16", "--decode-threads", "2", "--ort-threads", "1"]
    with ServerProcess([models / "colour"], args=args) as srv, ThreadPoolExecutor(8) as pool:
        def post(data: bytes) -> httpx.Response:
            return httpx.post(srv.url + "/predict", content=data, headers={"content-type": "image/png"}, timeout=60)

        futures = [pool.submit(post, big) for _ in range(6)]
        time.sleep(0.2)
        small = post(image_bytes(colour_image("green")))
        results = [f.result() for f in futures]
    assert small.status_code == 200 and small.json()["label"] == "green"
    assert all(r.status_code == 200 and r.json()["label"] == "blue" for r in results), [r.text for r in results]
    timings = [r.json()["timing"] for r in results]
    one_decode = min(t["preprocess_ms"] for t in timings)
    assert max(t["queue_ms"] for t in timings) > 2 * one_decode, timings  # someone waited for two decodes


@pytest.mark.live
def test_json_pixels_count_against_the_decode_budget(tmp_path):
    """Issue 22 #15: a tensor in JSON is parsed into Python numbers (~9x the body at worst), and those bodies
    bypassed the budget: 48 connections of 8 JSON crops took the RSS to 0.9-1.3 GB. Now each waits for
    a grant before its body is read; all answer 200 and the RSS stays near the budget."""
    import json
    import threading

    import numpy as np

    from food_classifier.testing import rss_mb

    make_colour_bundle(tmp_path / "big" / "v1", version="v1", crop=160)
    crops = np.round(np.random.default_rng(0).uniform(-1, 1, (8, 3, 160, 160)), 3)
    crops[:, 2] += 1.0  # blue
    body = json.dumps({"inputs": [{"name": "pixels", "shape": list(crops.shape), "datatype": "FP32",
                                   "data": crops.reshape(-1).tolist()}]}).encode()  # ~4.5 MB
    args = ["--decode-memory-mb", "64", "--decode-threads", "2", "--ort-threads", "1", "--max-batch-images", "8",
            "--body-timeout", "3"]
    with ServerProcess([tmp_path / "big"], args=args) as srv, ThreadPoolExecutor(32) as pool:
        base, peak, done = rss_mb(srv.proc.pid), [0.0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mb(srv.proc.pid))
                time.sleep(0.01)

        def post(_: int) -> httpx.Response:
            return httpx.post(srv.url + "/v2/models/colour/infer", content=body,
                              headers={"content-type": "application/json"}, timeout=120)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            results = list(pool.map(post, range(32)))
        finally:
            done.set()
            sampler.join()
        # 7 senders that dribble a 1 MB JSON body hold 70 MB of the 64 MiB while they send: each must finish
        # within --body-timeout in all (408), so the budget is free again for the request after them
        slow = [rawhttp.connect(srv.port) for _ in range(7)]
        start = time.monotonic()
        for s in slow:
            s.sendall(rawhttp.request_head("POST", "/v2/models/colour/infer", {"Content-Type": "application/json"},
                                           1_000_000) + b'{"inputs": [')
        while time.monotonic() - start < 4:
            for s in slow:
                s.sendall(b"0.5, ")
            time.sleep(0.5)
        answers = [rawhttp.read_response(s) for s in slow]
        assert [a[0] for a in answers] == [408] * 7 and b"must arrive within 3 s" in answers[0][2], answers[0]
        for s in slow:
            s.close()
        assert post(0).status_code == 200
    assert all(r.status_code == 200 for r in results), {r.status_code: r.text[:200] for r in results}
    assert all(r.json()["outputs"][0]["data"] == ["blue"] * 8 for r in results)
    assert peak[0] - base < 150, (base, peak[0])  # was ~300 MB more for these 32 requests


def test_decode_budget_is_fifo_bounded_and_survives_cancellation():
    async def main() -> None:
        budget = DecodeBudget(capacity=100, slots=2)
        a = await budget.acquire(60)
        order: list[str] = []

        async def take(name: str, cost: int):
            grant = await budget.acquire(cost)
            order.append(name)
            return grant

        b = asyncio.create_task(take("b", 60))  # does not fit next to a
        c = asyncio.create_task(take("c", 10))  # fits, but waits its turn behind b
        cancelled = asyncio.create_task(take("x", 10))
        await asyncio.sleep(0.01)
        assert order == [] and budget.waiting == 3
        cancelled.cancel()
        await asyncio.sleep(0.01)
        assert budget.waiting == 2
        a.release()
        a.release()  # idempotent
        await asyncio.sleep(0.01)
        assert order == ["b", "c"] and budget.used == 70 and budget.running == 2
        huge = asyncio.create_task(take("huge", 500))  # more than the whole budget: admitted alone
        await asyncio.sleep(0.01)
        assert "huge" not in order
        (await b).release()
        (await c).release()
        await asyncio.sleep(0.01)
        assert order[-1] == "huge" and budget.running == 1
        (await huge).release()
        assert (budget.used, budget.running, budget.waiting) == (0, 0, 0)

    asyncio.run(main())


# --- keys ------------------------------------------------------------------------------------------

def test_reload_needs_the_admin_key(colour_bundle):
    c = ready_client(ServeSettings(bundles=[colour_bundle]))  # no admin key: reload over HTTP is off
    try:
        body = assert_error(c.post("/v1/models/colour/reload"), 403, "admin_disabled")
        assert "FOOD_CLASSIFIER_ADMIN_KEY" in body["detail"] and "HUP" in body["detail"]
    finally:
        c.__exit__(None, None, None)
    c = ready_client(ServeSettings(bundles=[colour_bundle], api_key="predict-key", admin_key="admin-key"))
    try:
        assert_error(c.post("/v1/models/colour/reload"), 401, "unauthorized")
        assert_error(c.post("/v1/models/colour/reload", headers={"x-api-key": "predict-key"}), 401, "unauthorized")
        r = c.post("/v1/models/colour/reload", headers={"authorization": "Bearer admin-key"})
        assert r.status_code == 200 and r.json()["model"] == "colour"
        ok = c.post("/predict", content=jpg("red"), headers={"content-type": JPEG, "x-api-key": "admin-key"})
        assert ok.json()["label"] == "red"  # the admin key also passes where the API key does
    finally:
        c.__exit__(None, None, None)


def test_non_ascii_api_key_matches_every_way_it_is_sent(colour_bundle):
    key = "clé-🍕"
    c = ready_client(ServeSettings(bundles=[colour_bundle], api_key=key))
    try:
        raw = key.encode()
        basic = base64.b64encode(b"user:" + raw)
        for headers in ({"x-api-key": raw}, {"authorization": b"Bearer " + raw}, {"authorization": b"Basic " + basic}):
            r = c.post("/predict", content=jpg("blue"), headers={"content-type": JPEG, **headers})
            assert r.status_code == 200 and r.json()["label"] == "blue", headers
        wrong = {"x-api-key": "clé".encode("latin-1")}
        assert_error(c.post("/predict", content=jpg("blue"), headers={"content-type": JPEG, **wrong}), 401)
    finally:
        c.__exit__(None, None, None)


@pytest.mark.parametrize("kw", [{"api_key": " padded"}, {"api_key": "tab\tkey"}, {"admin_key": ""},
                                {"api_key": "same", "admin_key": "same"}])
def test_unsendable_keys_are_refused_at_start(kw):
    with pytest.raises(ValidationError):
        ServeSettings(**kw)


def test_head_readyz_is_503_while_loading(colour_bundle):
    client = TestClient(create_app(ServeSettings(bundles=[colour_bundle])))  # lifespan not run: never ready
    r = client.head("/readyz")
    assert r.status_code == 503 and r.content == b""
    assert client.head("/healthz").status_code == 200
