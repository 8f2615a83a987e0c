"""The prediction cache against a real redis-server (started here on a free loopback port) and the real
service: hits per level, re-encoded JPEGs, reload, TTL, Redis dying under load or absent, the LRU bound.
"""

from __future__ import annotations

import hashlib
import io
import struct
import sys
import threading
import time
import tracemalloc

import httpx
import numpy as np
import pytest
from conftest import SHARED_DATA, colour_image, image_bytes, make_colour_bundle
from helpers import ready_client
from PIL import Image
from services import RedisServer

from food_classifier.cache import HIT_BYTES, HIT_PIXELS, MISS, OFF, CacheError, MemoryLRU, PredictionCache, namespace
from food_classifier.cache_pixels import fingerprint_diffs, pixel_view, same_photo
from food_classifier.inference import Classifier
from food_classifier.preprocessing import PIPELINE_VERSION, PreprocessSpec, preprocess, resize_crop
from food_classifier.serving.settings import ServeSettings
from food_classifier.testing import ServerProcess, free_port

needs_redis = pytest.mark.skipif(RedisServer.binary() is None, reason="redis-server not installed (apt)")


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


def photo() -> bytes:
    files = sorted(SHARED_DATA.glob("*/*.jpg"))
    if not files:
        pytest.skip("shared Food-101 photos not found")
    return files[0].read_bytes()


def resaved(data: bytes, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def with_comment(data: bytes) -> bytes:
    """Same JPEG stream, other metadata: a COM segment after SOI (other bytes, identical pixels)."""
    text = b"uploaded again from another phone"
    return data[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + data[2:]


def post(client, data: bytes, path: str = "/predict", **params):
    r = client.post(path, content=data, headers={"content-type": "image/jpeg"}, params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-cache"] == body["cache"]
    return body


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def lookups(client) -> dict[tuple[str, str], float]:
    """{(level, result): count} for the colour model, from /metrics."""
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("food_classifier_cache_lookups_total{"):
            labels = dict(part.split("=") for part in line[line.index("{") + 1:line.index("}")].split(","))
            out[(labels["level"].strip('"'), labels["result"].strip('"'))] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.broker)])
def test_hits_per_level_and_probabilities_not_responses(colour_bundle, backend, request):
    if backend == "redis":
        if RedisServer.binary() is None:
            pytest.skip("redis-server not installed")
        server = request.getfixturevalue("redis_server")
        settings = ServeSettings(bundles=[colour_bundle], cache_bytes=0, cache_url=server.url)
    else:
        settings = ServeSettings(bundles=[colour_bundle])
    client = ready_client(settings)
    try:
        data = photo()
        first = post(client, data)
        assert first["cache"] == MISS and first["timing"]["batch_size"] == 1
        again = post(client, data, top_k=1)  # top_k applies after a hit: it is not part of the key
        assert again["cache"] == HIT_BYTES and again["timing"]["inference_ms"] == 0
        assert len(again["top_k"]) == 1 and again["confidence"] == pytest.approx(first["confidence"], abs=1e-6)
        assert post(client, data, threshold=0.99)["label"] == "unsure"  # so does the threshold
        same_pixels = post(client, with_comment(data))
        assert same_pixels["cache"] == HIT_PIXELS
        assert same_pixels["top_k"] == first["top_k"]
        assert post(client, with_comment(data))["cache"] == HIT_BYTES  # the pixel hit filled the bytes level
        other = post(client, image_bytes(colour_image("blue", size=(120, 100), seed=7)))
        assert other["cache"] == MISS and other["label"] == "blue"  # a different photo never hits
        counts = lookups(client)
        assert counts[("bytes", "hit")] == 3 and counts[("bytes", "miss")] == 3
        assert counts[("pixels", "hit")] == 1 and counts[("pixels", "miss")] == 2
        status = client.get("/readyz").json()["cache"]
        assert status["state"] == "ok" and (("redis" in status) == (backend == "redis"))
    finally:
        client.__exit__(None, None, None)


def test_reencoded_jpeg_hits_pixel_level(colour_bundle):
    clf = Classifier(colour_bundle, cache=PredictionCache())
    data = photo()
    original = clf.predict(data)
    assert original.cache == MISS
    for quality in (95, 75, 60):
        p = clf.predict(resaved(data, quality))
        assert p.cache == HIT_PIXELS, quality
        assert p.top_k == original.top_k  # the cached answer of the original photo
    fresh = Classifier(colour_bundle).predict(resaved(data, 60))  # and it is the answer the model gives anyway
    assert fresh.label == original.label and fresh.confidence == pytest.approx(original.confidence, abs=0.01)
    crop = Image.open(io.BytesIO(data)).crop((0, 0, 200, 200))  # another photo of the same kind: no hit
    assert clf.predict(image_bytes(crop)).cache == MISS


@pytest.mark.broker
def test_batch_endpoint_and_classifier_share_the_cache(colour_bundle, tmp_path):
    if RedisServer.binary() is None:
        pytest.skip("redis-server not installed")
    with RedisServer() as server:
        shared = PredictionCache(memory_bytes=0, url=server.url)
        clf = Classifier(colour_bundle, cache=shared)
        red, green = image_bytes(colour_image("red")), image_bytes(colour_image("green", seed=3))
        (tmp_path / "red.jpg").write_bytes(red)
        assert clf.predict(tmp_path / "red.jpg").cache == MISS  # a path: its bytes are the key
        assert [p.cache for p in clf.predict_batch([red, red])] == [HIT_BYTES, HIT_BYTES]
        client = ready_client(ServeSettings(bundles=[colour_bundle], cache_bytes=0, cache_url=server.url))
        try:
            files = [("files", ("a.jpg", red, "image/jpeg")), ("files", ("b.jpg", green, "image/jpeg")),
                     ("files", ("c.txt", b"not an image", "text/plain"))]
            r = client.post("/predict-batch", files=files)
            body = r.json()
            assert [x.get("cache") for x in body["results"]] == [HIT_BYTES, MISS, None]
            assert r.headers["x-cache"] == "mixed" and body["failed"] == 1
            assert clf.predict(green).cache == HIT_BYTES  # the server's answer, through Redis
        finally:
            client.__exit__(None, None, None)
            shared.close()


def test_reload_never_serves_the_old_versions_answers(tmp_path):
    model_dir = tmp_path / "colour"
    make_colour_bundle(model_dir / "v1", version="v1", scale=4.0)
    client = ready_client(ServeSettings(bundles=[model_dir], admin_key="admin-key"))
    client.headers["X-API-Key"] = "admin-key"  # reload needs the admin key
    try:
        data = image_bytes(colour_image("red"))
        old = post(client, data)
        assert post(client, data)["cache"] == HIT_BYTES
        make_colour_bundle(model_dir / "v2", version="v2", scale=1.0, created_at="2026-02-01T00:00:00+00:00")
        assert client.post("/v1/models/colour/reload").json()["version"] == "v2"
        new = post(client, data)
        assert new["cache"] == MISS and new["model_version"] == "v2"
        assert new["confidence"] < old["confidence"] - 0.1  # v2's own (flatter) answer, not v1's
        assert post(client, data)["cache"] == HIT_BYTES
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.broker)])
def test_ttl_expiry(colour_bundle, backend, request):
    if backend == "redis":
        if RedisServer.binary() is None:
            pytest.skip("redis-server not installed")
        cache = PredictionCache(memory_bytes=0, url=request.getfixturevalue("redis_server").url, ttl_s=0.5)
    else:
        cache = PredictionCache(ttl_s=0.5)
    clf = Classifier(colour_bundle, cache=cache)
    data = image_bytes(colour_image("green"))
    assert [clf.predict(data).cache, clf.predict(data).cache] == [MISS, HIT_BYTES]
    time.sleep(0.7)
    assert clf.predict(data).cache == MISS


@pytest.mark.broker
@pytest.mark.live
@needs_redis
def test_redis_killed_during_load_fails_no_request(colour_bundle):
    """Kill -9 Redis while 4 clients hammer the real server: every request still answers 200."""
    redis = RedisServer().start()
    env = {"FOOD_CLASSIFIER_CACHE_URL": redis.url, "FOOD_CLASSIFIER_CACHE_BREAKER_S": "1"}
    images = [image_bytes(colour_image(c, seed=i)) for i in range(20) for c in ("red", "green", "blue")]
    statuses: list[int] = []
    stop = threading.Event()
    try:
        with ServerProcess([colour_bundle], args=["--ort-threads", "1"], env=env) as srv:
            def load(offset: int) -> None:
                with httpx.Client(base_url=srv.url, timeout=10) as c:
                    i = offset
                    while not stop.is_set():
                        r = c.post("/predict", content=images[i % len(images)], headers={"content-type": "image/jpeg"})
                        statuses.append(r.status_code)
                        i += 1
            threads = [threading.Thread(target=load, args=(k * 7,)) for k in range(4)]
            for t in threads:
                t.start()
            wait_for(lambda: len(statuses) >= 30)
            before = len(statuses)
            redis.kill()
            killed_at = time.monotonic()
            # long enough for the breaker (1 s) to half-open and fail again, and for 30 more requests
            wait_for(lambda: len(statuses) >= before + 30 and time.monotonic() - killed_at > 2.5)
            stop.set()
            for t in threads:
                t.join(15)
            ready = httpx.get(srv.url + "/readyz")
            metrics = httpx.get(srv.url + "/metrics").text
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        assert ready.status_code == 200 and ready.json()["cache"]["state"] == "degraded"
        errors = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                     if line.startswith("food_classifier_cache_errors_total{"))
        assert errors >= 2  # the first failure, then the probe after the breaker's pause
        assert "food_classifier_cache_degraded 1.0" in metrics
    finally:
        stop.set()
        redis.stop()


@pytest.mark.broker
@needs_redis
def test_redis_absent_at_start_then_back(colour_bundle):
    port = free_port()  # nothing listens here yet
    settings = ServeSettings(bundles=[colour_bundle], cache_url=f"redis://127.0.0.1:{port}/0", cache_breaker_s=0.3)
    client = ready_client(settings)
    try:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["cache"]["state"] == "degraded"
        data = image_bytes(colour_image("blue"))
        assert post(client, data)["label"] == "blue"
        assert post(client, data)["cache"] == HIT_BYTES  # the in-process level still works
        with RedisServer(port=port):
            time.sleep(0.4)  # the breaker's pause
            assert client.get("/readyz").json()["cache"]["state"] == "ok"
    finally:
        client.__exit__(None, None, None)


def test_lru_stays_within_its_byte_bound():
    bound = 200_000
    lru = MemoryLRU(bound)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(5000):
        lru.set(f"fc:p2:food:v1:fp32:b:{i:064x}", np.full(44, i, dtype="<f4").tobytes(), 60)
        if i % 100 == 0:
            lru.get("fc:p2:food:v1:fp32:b:" + f"{0:064x}")  # keep the first entry recent
        assert lru.size <= bound
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert held <= bound, f"{held} bytes really held for an accounted {lru.size}"
    assert len(lru) > 200 and lru.get(f"fc:p2:food:v1:fp32:b:{0:064x}") is not None  # recently used survives
    assert lru.get(f"fc:p2:food:v1:fp32:b:{1:064x}") is None  # least recently used went first
    lru.set("big", b"x" * (bound + 1), 60)  # larger than the whole cache: not stored, nothing evicted
    assert lru.get("big") is None and lru.size <= bound


def test_cache_off_and_configuration_errors(colour_bundle, monkeypatch):
    client = ready_client(ServeSettings(bundles=[colour_bundle], cache_bytes=0))
    try:
        data = image_bytes(colour_image("red"))
        assert post(client, data)["cache"] == OFF and post(client, data)["cache"] == OFF
        assert client.get("/readyz").json()["cache"]["state"] == "off"
    finally:
        client.__exit__(None, None, None)
    with pytest.raises(CacheError, match="redis://"):
        PredictionCache(url="http://127.0.0.1:1")
    monkeypatch.setitem(sys.modules, "redis", None)  # as if the extra were not installed
    with pytest.raises(CacheError, match=r"food-classifier\[cache\]"):
        PredictionCache(url="redis://127.0.0.1:1/0")


# --- pixel-level poisoning (issue 22 item 11) ------------------------------------------------------------------

PHOTO_SPEC = PreprocessSpec(resize=256, crop=224)  # the built-in and trained bundles' preprocessing


def as_upload(crop: np.ndarray, spec: PreprocessSpec = PHOTO_SPEC) -> bytes:
    """A PNG whose preprocessed crop is exactly `crop` (a resize-sized square: the crop is then a copy)."""
    pad = (spec.resize - spec.crop) // 2
    canvas = np.zeros((spec.resize, spec.resize, 3), dtype=np.uint8)
    canvas[pad:pad + spec.crop, pad:pad + spec.crop] = crop
    return image_bytes(Image.fromarray(canvas), "PNG")


def photo_crop(spec: PreprocessSpec = PHOTO_SPEC) -> np.ndarray:
    img = Image.open(io.BytesIO(photo())).convert("RGB")
    return np.asarray(resize_crop(img.resize((spec.resize, spec.resize)), spec))


def mosaic(crop: np.ndarray, block: int, seed: int = 0) -> np.ndarray:
    """Every block x block tile's pixels shuffled: the same block means, another picture."""
    rng, out = np.random.default_rng(seed), crop.copy()
    for i in range(0, crop.shape[0] - block + 1, block):
        for j in range(0, crop.shape[1] - block + 1, block):
            tile = out[i:i + block, j:j + block].reshape(-1, 3)
            out[i:i + block, j:j + block] = tile[rng.permutation(len(tile))].reshape(block, block, 3)
    return out


def grey_and_checkerboard(side: int) -> tuple[np.ndarray, np.ndarray]:
    board = (np.indices((side, side)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return np.full((side, side, 3), 127, dtype=np.uint8), np.repeat(board[..., None], 3, axis=2)  # means 127 vs 127.5


def view(data: bytes, spec: PreprocessSpec = PHOTO_SPEC) -> tuple[list[str], bytes]:
    out = pixel_view(preprocess(data, spec), spec)
    assert out is not None
    return out


def test_pixel_key_collisions_are_told_apart_by_the_fingerprint():
    """Adversarial pairs share the pixel key exactly; only re-encodes of the same photo pass the fingerprint."""
    crop = photo_crop()
    original = as_upload(crop)
    keys, fp = view(original)
    for block in (14, 7):  # the key's 16x16 blocks of a 224 crop, and finer
        mkeys, mfp = view(as_upload(mosaic(crop, block)))
        if block == 14:
            assert mkeys == keys  # the collision is real: same block means, another picture
        assert not same_photo(fp, mfp, PHOTO_SPEC.crop), fingerprint_diffs(fp, mfp, PHOTO_SPEC.crop)
    grey, board = grey_and_checkerboard(PHOTO_SPEC.crop)
    (gkeys, gfp), (ckeys, cfp) = view(as_upload(grey)), view(as_upload(board))
    assert gkeys == ckeys and not same_photo(gfp, cfp, PHOTO_SPEC.crop)
    jpeg = photo()  # the real photo and its re-saves: still one photo
    _, jfp = view(jpeg)
    for quality in (95, 75, 60):
        _, rfp = view(resaved(jpeg, quality))
        assert same_photo(jfp, rfp, PHOTO_SPEC.crop), (quality, fingerprint_diffs(jfp, rfp, PHOTO_SPEC.crop))


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.broker)])
def test_a_mosaic_sent_first_never_answers_for_the_photo(tmp_path, backend, request):
    """Sending a block-shuffled mosaic X of Y (or a checkerboard before flat grey) first must not make Y a
    pixel hit with X's answer, nor put X's answer under Y's bytes key (shared through Redis when configured)."""
    if backend == "redis":
        if RedisServer.binary() is None:
            pytest.skip("redis-server not installed")
        cache = PredictionCache(memory_bytes=0, url=request.getfixturevalue("redis_server").url)
    else:
        cache = PredictionCache()
    bundle = make_colour_bundle(tmp_path / "colour" / "20260101T000000-colour", spec=PHOTO_SPEC)
    clf = Classifier(bundle, cache=cache)
    crop = photo_crop()
    grey, board = grey_and_checkerboard(PHOTO_SPEC.crop)
    for first, second in ((mosaic(crop, 14), crop), (board, grey)):
        assert clf.predict(as_upload(first)).cache == MISS
        answer = clf.predict(as_upload(second))
        assert answer.cache == MISS  # before the fix: hit-pixels, the first image's answer
        again = clf.predict(as_upload(second))
        assert again.cache == HIT_BYTES and again.top_k == answer.top_k  # its own answer under its bytes
    data = photo()  # re-saves of a real photo still hit, after all this
    clf.predict(data)
    assert clf.predict(resaved(data, 75)).cache == HIT_PIXELS


def test_entries_of_an_older_cache_format_are_not_trusted(colour_bundle):
    """Entries written before the fingerprint (possibly poisoned, copied under bytes keys) live under the old
    namespace: the new one never reads them."""
    cache = PredictionCache()
    clf = Classifier(colour_bundle, cache=cache)
    data = image_bytes(colour_image("red"))
    old_ns = f"fc:p{PIPELINE_VERSION}:{clf.name}:{clf.version}:{clf.variant}:"
    fake = np.zeros(clf.row_width, dtype="<f4")
    fake[2] = 1.0  # "blue", for a red photo
    cache._set({f"{old_ns}b:{hashlib.sha256(data).hexdigest()}": fake.tobytes()})
    p = clf.predict(data)
    assert p.cache == MISS and p.label == "red"
    assert namespace(clf) != old_ns
