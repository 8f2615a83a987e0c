"""The HTTP service through TestClient, on the real colour bundle (a genuine ONNX model).

Every endpoint, every bad-input case, the API key and path traversal on the seed-compatible GET.
"""

from __future__ import annotations

import base64
import os
import struct
import time
import zlib
from pathlib import Path

import pytest
from conftest import colour_image, image_bytes, make_colour_bundle
from fastapi.testclient import TestClient

from food_classifier.serving.app import create_app
from food_classifier.serving.settings import ServeSettings

JPEG = "image/jpeg"


def ready_client(settings: ServeSettings) -> TestClient:
    client = TestClient(create_app(settings))
    client.__enter__()
    deadline = time.monotonic() + 20
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.02)
    return client


@pytest.fixture(scope="module")
def client(colour_bundle):
    c = ready_client(ServeSettings(bundles=[colour_bundle], max_body_bytes=200_000, max_batch_images=8))
    yield c
    c.__exit__(None, None, None)


def jpg(colour: str, **kw) -> bytes:
    return image_bytes(colour_image(colour, **kw))


def assert_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    if code:
        assert body["error"] == code, body
    return body


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's calling card)."""
    raw = image_bytes(colour_image("red", size=(8, 8)), "PNG")
    ihdr_at = raw.index(b"IHDR")
    body = bytearray(raw[ihdr_at:ihdr_at + 17])
    body[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(body)) & 0xFFFFFFFF)
    return raw[:ihdr_at] + bytes(body) + crc + raw[ihdr_at + 21:]


# --- liveness, readiness, model listing --------------------------------------------------------

def test_health_ready_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["models"] == {"colour": "20260101T000000-colour"}
    listing = client.get("/v1/models").json()
    assert listing["default"] == "colour"
    (m,) = listing["models"]
    assert (m["name"], m["version"], m["variant"], m["default"]) == ("colour", "20260101T000000-colour", "fp32", True)
    assert m["labels"] == ["red", "green", "blue"] and m["metrics"]["test"]["accuracy"] == 1.0
    assert client.get("/v1/models/colour").json()["name"] == "colour"
    assert_error(client.get("/v1/models/nope"), 404, "unknown_model")


def test_not_ready_until_models_are_loaded(colour_bundle):
    client = TestClient(create_app(ServeSettings(bundles=[colour_bundle])))  # lifespan never runs: no loading
    assert client.get("/healthz").status_code == 200
    assert_error(client.get("/readyz"), 503, "not_ready")
    assert_error(client.post("/predict", content=jpg("red"), headers={"content-type": JPEG}), 503, "not_ready")


# --- predict: the three ways to send an image --------------------------------------------------

@pytest.mark.parametrize("colour", ["red", "green", "blue"])
def test_predict_multipart(client, colour):
    r = client.post("/v1/models/colour/predict", files={"file": ("x.jpg", jpg(colour), JPEG)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == colour and body["label_idx"] == ["red", "green", "blue"].index(colour)
    assert body["confidence"] > 0.9 and body["abstained"] is False
    assert [t["label"] for t in body["top_k"]][0] == colour and len(body["top_k"]) == 3
    assert abs(sum(t["probability"] for t in body["top_k"]) - 1) < 1e-4
    assert body["model"] == "colour" and body["model_version"] == "20260101T000000-colour"
    assert set(body["timing"]) == {"total_ms", "preprocess_ms", "queue_ms", "inference_ms", "batch_size"}


@pytest.mark.parametrize("fmt,ctype", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"),
                                       ("PNG", "application/octet-stream")])
def test_predict_raw_body(client, fmt, ctype):
    r = client.post("/predict", content=image_bytes(colour_image("blue"), fmt), headers={"content-type": ctype})
    assert r.status_code == 200, r.text
    assert r.json()["label"] == "blue"


def test_predict_json_base64(client):
    data = base64.b64encode(jpg("green")).decode()
    assert client.post("/predict", json={"image": data}).json()["label"] == "green"
    url = "data:image/jpeg;base64," + data
    assert client.post("/v1/models/colour/predict", json={"image": url}).json()["label"] == "green"
    assert_error(client.post("/predict", json={"image": "%%% not base64"}), 422, "invalid_base64")
    assert_error(client.post("/predict", json={"picture": data}), 422, "missing_image")
    assert_error(client.post("/predict", content=b"{nope", headers={"content-type": "application/json"}), 422,
                 "invalid_json")


def test_top_k_and_threshold(client):
    r = client.post("/predict?top_k=1", content=jpg("red"), headers={"content-type": JPEG}).json()
    assert [t["label"] for t in r["top_k"]] == ["red"]
    r = client.post("/predict?threshold=0.9999", content=jpg("red"), headers={"content-type": JPEG}).json()
    assert r["abstained"] is True and r["label"] == "unsure" and r["label_idx"] == 0
    assert_error(client.post("/predict?top_k=0", content=jpg("red"), headers={"content-type": JPEG}), 422,
                 "invalid_request")
    assert_error(client.post("/predict?threshold=2", content=jpg("red"), headers={"content-type": JPEG}), 422)
    assert_error(client.post("/predict?top_k=abc", content=jpg("red"), headers={"content-type": JPEG}), 422)


# --- batch ---------------------------------------------------------------------------------------

def test_predict_batch_keeps_order_and_isolates_bad_images(client):
    colours = ["red", "green", "blue", "blue", "red"]
    files = [("files", (f"{i}.jpg", jpg(c, seed=i), JPEG)) for i, c in enumerate(colours)]
    files.insert(2, ("files", ("bad.jpg", b"definitely not a jpeg", JPEG)))
    r = client.post("/v1/models/colour/predict-batch?top_k=2", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["count"], body["failed"], body["model"]) == (6, 1, "colour")
    results = body["results"]
    assert [x["index"] for x in results] == list(range(6))
    assert results[2]["error"] == "invalid_image" and results[2]["status"] == 415
    assert results[2]["filename"] == "bad.jpg"
    good = [x for x in results if "error" not in x]
    assert [x["label"] for x in good] == colours and all(len(x["top_k"]) == 2 for x in good)


def test_predict_batch_default_model_and_json(client):
    imgs = [base64.b64encode(jpg(c)).decode() for c in ("green", "red")]
    body = client.post("/predict-batch", json={"images": imgs}).json()
    assert [x["label"] for x in body["results"]] == ["green", "red"]


def test_predict_batch_limits(client):
    files = [("files", (f"{i}.jpg", jpg("red"), JPEG)) for i in range(9)]  # fixture allows 8
    assert_error(client.post("/v1/models/colour/predict-batch", files=files), 413, "too_many_images")
    assert_error(client.post("/v1/models/colour/predict-batch", files={"note": (None, "no files")}), 422,
                 "missing_image")
    assert_error(client.post("/v1/models/colour/predict-batch", data={"note": "no files"}), 422, "missing_image")
    assert_error(client.post("/v1/models/nope/predict-batch", files=files[:1]), 404, "unknown_model")


# --- bad input: every case is a JSON 4xx and the service keeps serving ----------------------------

def test_bad_inputs(client):
    big = b"\xff" * 300_000  # over the fixture's 200 kB limit
    cases = [
        (client.post("/predict", content=big, headers={"content-type": JPEG}), 413, "body_too_large"),
        (client.post("/predict", files={"file": ("big.jpg", big, JPEG)}), 413, "body_too_large"),
        (client.post("/predict", content=png_with_size(7000, 7000), headers={"content-type": "image/png"}),
         413, "too_many_pixels"),
        (client.post("/predict", content=png_with_size(30000, 30000), headers={"content-type": "image/png"}),
         413, "too_many_pixels"),
        (client.post("/predict", content=b"hello, not an image", headers={"content-type": JPEG}),
         415, "invalid_image"),
        (client.post("/predict", content=jpg("red", size=(300, 300))[:600], headers={"content-type": JPEG}),
         415, "invalid_image"),
        (client.post("/predict", content=b"GIF89a", headers={"content-type": "image/gif"}), 415, "invalid_image"),
        (client.post("/predict", content=b"abc", headers={"content-type": "text/plain"}), 415,
         "unsupported_media_type"),
        (client.post("/predict", content=b"", headers={"content-type": JPEG}), 422, "missing_image"),
        (client.post("/predict", data={"name": "no file here"}), 422, "missing_image"),
        (client.post("/predict", files={"name": (None, "a text field, no file")}), 422, "missing_image"),
        (client.post("/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}),
         422, None),
        (client.post("/v1/models/nope/predict", content=jpg("red"), headers={"content-type": JPEG}), 404,
         "unknown_model"),
        (client.get("/no/such/route"), 404, "not_found"),
        (client.delete("/predict"), 405, "method_not_allowed"),
    ]
    for r, status, code in cases:
        assert_error(r, status, code)
    assert client.post("/predict", content=jpg("green"), headers={"content-type": JPEG}).json()["label"] == "green"


def test_chunked_body_over_limit_is_413(client):
    def chunks():
        for _ in range(40):
            yield b"\x00" * 10_000  # 400 kB, no Content-Length

    assert_error(client.post("/predict", content=chunks(), headers={"content-type": JPEG}), 413, "body_too_large")


def test_max_pixels_setting(colour_bundle):
    c = ready_client(ServeSettings(bundles=[colour_bundle], max_pixels=50 * 50))
    try:
        small, large = jpg("red", size=(40, 40)), jpg("red", size=(60, 60))
        assert c.post("/predict", content=small, headers={"content-type": JPEG}).status_code == 200
        assert_error(c.post("/predict", content=large, headers={"content-type": JPEG}), 413, "too_many_pixels")
    finally:
        c.__exit__(None, None, None)


# --- ops endpoints -------------------------------------------------------------------------------

def test_metrics(client):
    client.post("/v1/models/colour/predict", content=jpg("red"), headers={"content-type": JPEG})
    client.post("/v1/models/colour/predict", content=b"junk", headers={"content-type": JPEG})
    client.post("/predict", content=b"\xff" * 300_000, headers={"content-type": JPEG})  # refused before routing
    text = client.get("/metrics").text
    assert 'food_classifier_requests_total{endpoint="/v1/models/{name}/predict",model="colour",status="200"}' in text
    assert 'food_classifier_requests_total{endpoint="/v1/models/{name}/predict",model="colour",status="415"}' in text
    assert 'food_classifier_request_duration_seconds_bucket{endpoint="/v1/models/{name}/predict"' in text
    assert 'food_classifier_batch_size_bucket{le="1.0",model="colour"}' in text
    assert 'food_classifier_model_info{default="true",model="colour",variant="fp32",' \
           'version="20260101T000000-colour"} 1.0' in text
    assert 'food_classifier_images_total{model="colour",outcome="rejected"}' in text
    assert 'food_classifier_requests_total{endpoint="/predict",model="-",status="413"}' in text


def test_metrics_labels_stay_bounded(client):
    for i in range(5):
        client.post(f"/v1/models/attacker-{i}/predict", content=b"x", headers={"content-type": JPEG})
    text = client.get("/metrics").text
    assert "attacker" not in text


def test_docs_and_web_page(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ("/v1/models/{name}/predict", "/predict", "/v1/models/{name}/predict-batch", "/v1/models",
                 "/v1/models/{name}/reload", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text and "/static/app.js" in page.text
    assert "http" not in page.text.split("<body>")[0].replace('name="viewport"', "")  # no CDN
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "predict" in js.text


# --- API key -------------------------------------------------------------------------------------

def test_api_key(colour_bundle):
    c = ready_client(ServeSettings(bundles=[colour_bundle], api_key="s3cret"))
    try:
        for path in ("/v1/models", "/metrics", "/", "/docs", "/openapi.json", "/static/app.js"):
            assert_error(c.get(path), 401, "unauthorized")
        assert_error(c.post("/predict", content=jpg("red"), headers={"content-type": JPEG}), 401, "unauthorized")
        r = c.post("/predict", content=jpg("red"), headers={"content-type": JPEG, "x-api-key": "wrong"})
        assert_error(r, 401) and r.headers["www-authenticate"].startswith("Basic")
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        basic = base64.b64encode(b"anyone:s3cret").decode()
        for headers in ({"x-api-key": "s3cret"}, {"authorization": "Bearer s3cret"},
                        {"authorization": f"Basic {basic}"}):
            r = c.post("/predict", content=jpg("red"), headers={"content-type": JPEG, **headers})
            assert r.status_code == 200 and r.json()["label"] == "red"
        assert c.get("/", auth=("u", "s3cret")).status_code == 200
    finally:
        c.__exit__(None, None, None)


# --- seed-compatible GET /predict ----------------------------------------------------------------

@pytest.fixture(scope="module")
def path_setup(colour_bundle, tmp_path_factory):
    base = tmp_path_factory.mktemp("paths")
    root, outside = base / "root", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "green.jpg").write_bytes(jpg("green"))
    (root / "weird%2e%2e").mkdir()
    (outside / "secret.jpg").write_bytes(jpg("red"))
    os.symlink(outside / "secret.jpg", root / "link.jpg")
    os.symlink(outside, root / "linkdir")
    c = ready_client(ServeSettings(bundles=[colour_bundle], allow_path_root=[root]))
    yield c, root, outside
    c.__exit__(None, None, None)


def test_seed_get_predict_disabled_by_default(client):
    assert_error(client.get("/predict", params={"image_path": "x.jpg"}), 403, "path_access_disabled")


def test_seed_get_predict_reads_under_root(path_setup):
    c, root, _ = path_setup
    for p in ("sub/green.jpg", str(root / "sub" / "green.jpg"), "sub/../sub/green.jpg"):
        r = c.get("/predict", params={"model_type": "colour", "image_path": p})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"label", "label_idx", "confidence"} and body["label"] == "green"
    assert c.get("/predict", params={"image_path": "sub/green.jpg"}).json()["label"] == "green"  # default model
    assert_error(c.get("/predict", params={"model_type": "nope", "image_path": "sub/green.jpg"}), 404)


@pytest.mark.parametrize("raw_query", [
    "image_path=../outside/secret.jpg",
    "image_path=sub/../../outside/secret.jpg",
    "image_path=%2e%2e%2foutside%2fsecret.jpg",
    "image_path=%2E%2E/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
    "image_path=/etc/passwd",
    "image_path=%2Fetc%2Fpasswd",
    "image_path=//etc/passwd",
    "image_path=link.jpg",
    "image_path=linkdir/secret.jpg",
    "image_path=../outside/no-such-file.jpg",
])
def test_seed_get_predict_refuses_escapes(path_setup, raw_query):
    c, _, outside = path_setup
    assert_error(c.get(f"/predict?{raw_query}"), 403, "path_forbidden")
    r = c.get("/predict", params={"image_path": str(outside / "secret.jpg")})
    assert_error(r, 403, "path_forbidden")


@pytest.mark.parametrize("raw_query,status", [
    ("image_path=%252e%252e%252foutside%252fsecret.jpg", 404),  # decoded once: a literal '%2e%2e' name
    ("image_path=weird%252e%252e", 404),  # a directory, not a file
    ("image_path=sub/missing.jpg", 404),
    ("image_path=sub%00/green.jpg", 422),
    ("image_path=", 422),
])
def test_seed_get_predict_odd_paths(path_setup, raw_query, status):
    c, _, _ = path_setup
    assert_error(c.get(f"/predict?{raw_query}"), status)


# --- several models, variants, reload ------------------------------------------------------------

def test_models_dir_with_several_models_and_variants(tmp_path):
    from food_classifier.bundle import update_meta

    make_colour_bundle(tmp_path / "colour" / "v1")
    for name, recommended in (("tint", True), ("shade", False)):
        b = make_colour_bundle(tmp_path / name / "v1", name=name, version="t1")
        (b / "model.int8.onnx").write_bytes((b / "model.onnx").read_bytes())  # stands in for a real int8 file
        update_meta(b, {"variants": {"fp32": {"file": "model.onnx"},
                                     "int8": {"file": "model.int8.onnx", "recommended": recommended}}})
    c = ready_client(ServeSettings(bundles=[tmp_path], default_model="tint", variant=["auto"]))
    try:
        listing = c.get("/v1/models").json()
        assert listing["default"] == "tint"
        assert {m["name"]: m["variant"] for m in listing["models"]} == {"colour": "fp32", "tint": "int8",
                                                                         "shade": "fp32"}
        assert c.post("/predict", content=jpg("red"), headers={"content-type": JPEG}).json()["model"] == "tint"
        r = c.post("/v1/models/colour/predict", content=jpg("red"), headers={"content-type": JPEG})
        assert r.json()["model"] == "colour"
    finally:
        c.__exit__(None, None, None)
    c = ready_client(ServeSettings(bundles=[tmp_path], variant=["int8", "colour=fp32"]))  # explicit, per model
    try:
        variants = {m["name"]: m["variant"] for m in c.get("/v1/models").json()["models"]}
        assert variants == {"colour": "fp32", "tint": "int8", "shade": "int8"}
    finally:
        c.__exit__(None, None, None)


def test_missing_variant_fails_loading_with_a_clear_reason(colour_bundle):
    with TestClient(create_app(ServeSettings(bundles=[colour_bundle], variant=["int8"]))) as client:
        deadline = time.monotonic() + 10
        while client.get("/readyz").json().get("detail", "loading").startswith("models are loading"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert "no 'int8' variant" in client.get("/readyz").json()["detail"]


def test_reload_swaps_to_newest_version_and_survives_a_broken_one(tmp_path):
    model_dir = tmp_path / "colour"
    make_colour_bundle(model_dir / "v1", version="v1", created_at="2026-01-01T00:00:00")
    c = ready_client(ServeSettings(bundles=[model_dir]))
    try:
        predict = lambda: c.post("/predict", content=jpg("red"), headers={"content-type": JPEG}).json()  # noqa: E731
        assert predict()["model_version"] == "v1"
        make_colour_bundle(model_dir / "v2", version="v2", created_at="2026-02-01T00:00:00", scale=8.0)
        r = c.post("/v1/models/colour/reload")
        assert r.status_code == 200 and r.json() == {"model": "colour", "previous_version": "v1", "version": "v2",
                                                     "variant": "fp32"}
        assert predict()["model_version"] == "v2" and c.get("/readyz").json()["models"] == {"colour": "v2"}
        broken = make_colour_bundle(model_dir / "v3", version="v3", created_at="2026-03-01T00:00:00")
        (broken / "model.onnx").write_bytes(b"not onnx")
        assert_error(c.post("/v1/models/colour/reload"), 409, "reload_failed")
        assert predict()["model_version"] == "v2"
        assert_error(c.post("/v1/models/nope/reload"), 404, "unknown_model")
        assert 'food_classifier_model_reloads_total{model="colour",outcome="failed"} 1.0' in c.get("/metrics").text
    finally:
        c.__exit__(None, None, None)


def test_create_app_refuses_missing_bundle(tmp_path):
    from food_classifier.bundle import BundleError

    with pytest.raises(BundleError):
        create_app(ServeSettings(bundles=[tmp_path / "nothing"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError):
        create_app(ServeSettings(bundles=[tmp_path / "empty"]))


def test_duplicate_model_names_fail_loading(tmp_path):
    make_colour_bundle(tmp_path / "a" / "v1")
    make_colour_bundle(tmp_path / "b" / "v1")  # also named "colour"
    client = TestClient(create_app(ServeSettings(bundles=[tmp_path / "a", tmp_path / "b"])))
    with client:
        deadline = time.monotonic() + 10
        while "failed" not in client.get("/readyz").json()["detail"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert "two sources" in client.get("/readyz").json()["detail"]


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FOOD_CLASSIFIER_BUNDLES", f"{tmp_path}/a,{tmp_path}/b")
    monkeypatch.setenv("FOOD_CLASSIFIER_API_KEY", "k")
    monkeypatch.setenv("FOOD_CLASSIFIER_PORT", "9000")
    monkeypatch.setenv("FOOD_CLASSIFIER_VARIANT", "auto,food=int8")
    s = ServeSettings()
    assert s.bundles == [tmp_path / "a", tmp_path / "b"] and s.port == 9000 and s.api_key_value() == "k"
    assert s.variant_for("food") == "int8" and s.variant_for("other") == "auto"
    assert ServeSettings(port=1234).port == 1234  # explicit (CLI) values win over the environment
    assert ServeSettings(variant=[]).variant_for("x") == "fp32"


def test_model_sources(tmp_path):
    from food_classifier.serving.registry import model_sources

    b1 = make_colour_bundle(tmp_path / "models" / "colour" / "v1", version="v1")
    make_colour_bundle(tmp_path / "models" / "tint" / "v1", name="tint")
    assert model_sources([b1]) == [b1]
    assert model_sources([tmp_path / "models" / "colour"]) == [tmp_path / "models" / "colour"]
    assert model_sources([tmp_path / "models"]) == [tmp_path / "models" / "colour", tmp_path / "models" / "tint"]


def test_bad_model_path_does_not_escape_as_500(client):
    r = client.post("/v1/models/..%2F..%2Fetc/predict", content=jpg("red"), headers={"content-type": JPEG})
    assert r.status_code in (404, 422) and set(r.json()) == {"error", "detail"}


def test_png_with_alpha_and_grey_images(client):
    from PIL import Image

    rgba = colour_image("blue").convert("RGBA")
    grey = Image.new("L", (50, 50), 128)
    for data, ctype in ((image_bytes(rgba, "PNG"), "image/png"), (image_bytes(grey, "PNG"), "image/png")):
        assert client.post("/predict", content=data, headers={"content-type": ctype}).status_code == 200


def test_path_guard_unit(tmp_path):
    from food_classifier.serving.errors import Forbidden
    from food_classifier.serving.paths import PathGuard

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "a.jpg").write_bytes(b"x")
    guard = PathGuard([tmp_path / "r"])
    assert guard.resolve("a.jpg") == Path(os.path.realpath(tmp_path / "r" / "a.jpg"))
    with pytest.raises(Forbidden):
        guard.resolve(str(tmp_path / "r" / ".." / "r2" / "a.jpg"))
    assert not PathGuard([]).enabled


def test_micro_batching_through_the_app(colour_bundle):
    c = ready_client(ServeSettings(bundles=[colour_bundle], batch_max_size=8, batch_max_wait_ms=100,
                                   inference_workers=1))
    try:
        files = [("files", (f"{i}.png", image_bytes(colour_image("red", seed=i), "PNG"), "image/png"))
                 for i in range(6)]
        body = c.post("/v1/models/colour/predict-batch", files=files).json()
        sizes = [r["timing"]["batch_size"] for r in body["results"]]
        assert max(sizes) > 1 and all(r["label"] == "red" for r in body["results"])
        assert "food_classifier_batch_size_count" in c.get("/metrics").text
    finally:
        c.__exit__(None, None, None)


def test_fuzzed_bodies_are_always_json_4xx(client):
    """Random bytes, cut and corrupted real images, odd content types: never a 5xx, never a crash."""
    import random

    rng = random.Random(1234)
    real = [image_bytes(colour_image("red", size=(120, 90)), fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP")]
    ctypes = ["image/jpeg", "image/png", "application/octet-stream", "", "image/anything"]
    for i in range(60):
        base = bytearray(rng.choice(real))
        kind = i % 3
        if kind == 0:
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))
        elif kind == 1:
            body = bytes(base[: rng.randint(1, len(base) - 1)])
        else:
            for _ in range(20):
                base[rng.randrange(16, len(base))] = rng.getrandbits(8)
            body = bytes(base)
        r = client.post("/predict", content=body, headers={"content-type": rng.choice(ctypes)})
        assert r.status_code in (200, 413, 415, 422), (i, r.status_code, r.text)
        assert set(r.json()) >= ({"label"} if r.status_code == 200 else {"error", "detail"})
    assert client.get("/readyz").status_code == 200
