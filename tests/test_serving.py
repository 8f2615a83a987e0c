"""The HTTP service through TestClient, on the real colour bundle (a genuine ONNX model).

Every endpoint, every bad-input case, the API key and path traversal on the seed-compatible GET.
"""

from __future__ import annotations

import base64

import pytest
from conftest import colour_image, image_bytes
from fastapi.testclient import TestClient
from helpers import JPEG, assert_error, jpg, png_with_size, ready_client

from food_classifier.serving.http.app import create_app
from food_classifier.serving.settings import ServeSettings


@pytest.fixture(scope="module")
def client(colour_bundle):
    c = ready_client(ServeSettings(bundles=[colour_bundle], max_body_bytes=200_000, max_batch_images=8))
    yield c
    c.__exit__(None, None, None)


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
    for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = client.get(page)
        assert html.status_code == 200 and f"/docs-assets/{asset}" in html.text
        assert "cdn" not in html.text.lower()  # offline machines get the same page
        js = client.get(f"/docs-assets/{asset}")
        assert js.status_code == 200 and len(js.content) > 100_000
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
        for path in ("/v1/models", "/metrics", "/", "/docs", "/openapi.json", "/static/app.js",
                     "/docs-assets/swagger-ui.css"):
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


def test_bad_model_path_does_not_escape_as_500(client):
    r = client.post("/v1/models/..%2F..%2Fetc/predict", content=jpg("red"), headers={"content-type": JPEG})
    assert r.status_code in (404, 422) and set(r.json()) == {"error", "detail"}


def test_png_with_alpha_and_grey_images(client):
    from PIL import Image

    rgba = colour_image("blue").convert("RGBA")
    grey = Image.new("L", (50, 50), 128)
    for data, ctype in ((image_bytes(rgba, "PNG"), "image/png"), (image_bytes(grey, "PNG"), "image/png")):
        assert client.post("/predict", content=data, headers={"content-type": ctype}).status_code == 200


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
