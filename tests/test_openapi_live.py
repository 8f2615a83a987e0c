"""Live responses of the real server (uvicorn, over HTTP) match the schema it publishes at /openapi.json.

Every JSON operation in the spec is called, with successes and errors; each body is validated with
jsonschema against the response schema the spec documents for that status (an undocumented status
fails too), $refs resolved within the spec.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re

import httpx
import pytest
from conftest import colour_image, image_bytes, make_colour_bundle
from jsonschema import Draft202012Validator, ValidationError

from food_classifier.testing import ServerProcess

KEY = "schema-test-key"
ADMIN = {"X-API-Key": "schema-admin-key"}
JPEG = {"content-type": "image/jpeg"}


def jpg(colour: str, seed: int = 0) -> bytes:
    return image_bytes(colour_image(colour, seed=seed))


class Spec:
    """The published spec; `check` validates one live response against it and records the operation."""

    def __init__(self, spec: dict):
        self.spec, self.seen = spec, set()

    def template(self, method: str, path: str) -> str:
        for template, ops in self.spec["paths"].items():
            pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
            if method in ops and re.match(pattern, path):
                return template
        raise AssertionError(f"{method.upper()} {path} is not in /openapi.json")

    def validator(self, method: str, template: str, status: int) -> Draft202012Validator:
        responses = self.spec["paths"][template][method]["responses"]
        assert str(status) in responses, f"{method.upper()} {template} answered {status}, not documented"
        schema = responses[str(status)]["content"]["application/json"]["schema"]
        return Draft202012Validator({**schema, "components": self.spec["components"]})

    def content_type(self, method: str, template: str) -> str:
        (media,) = self.spec["paths"][template][method]["responses"]["200"]["content"]
        return media

    def check(self, r: httpx.Response, status: int) -> dict:
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json", r.headers
        method = r.request.method.lower()
        template = self.template(method, r.request.url.path)
        body = r.json()
        self.validator(method, template, status).validate(body)
        self.seen.add((method, template))
        return body


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("openapi")
    make_colour_bundle(root / "models" / "colour" / "v1", version="v1")
    (root / "photos").mkdir()
    (root / "photos" / "pie.jpg").write_bytes(jpg("green"))
    return root


@pytest.fixture(scope="module")
def live(models):
    srv = ServerProcess([models / "models" / "colour"], env={"FOOD_CLASSIFIER_API_KEY": KEY,
                                                        "FOOD_CLASSIFIER_ADMIN_KEY": ADMIN["X-API-Key"]},
                        args=["--allow-path-root", str(models / "photos"), "--max-body-bytes", "200000",
                              "--max-batch-images", "4", "--ort-threads", "1"])
    with srv, httpx.Client(base_url=srv.url, headers={"X-API-Key": KEY}, timeout=30) as client:
        yield client, Spec(client.get("/openapi.json").json())


@pytest.mark.live
def test_live_responses_match_the_published_schema(live, models):
    c, spec = live
    check = spec.check
    assert check(c.get("/healthz"), 200) == {"status": "ok"}
    ready = check(c.get("/readyz"), 200)
    assert ready["status"] == "ready" and ready["models"] == {"colour": "v1"}
    assert ready["cache"]["state"] == "ok" and "redis" not in ready["cache"]  # in-process LRU only
    assert check(c.get("/v1/models"), 200)["models"][0]["labels"] == ["red", "green", "blue"]
    assert check(c.get("/v1/models/colour"), 200)["version"] == "v1"
    check(c.get("/v1/models/nope"), 404)
    check(httpx.get(f"{c.base_url}/v1/models"), 401)
    check(httpx.get(f"{c.base_url}/metrics"), 401)
    metrics = c.get("/metrics")
    assert "food_classifier_requests_total" in metrics.text
    assert metrics.headers["content-type"].startswith(spec.content_type("get", "/metrics"))

    # one image: multipart, raw body, JSON base64; the default model and a named one
    assert check(c.post("/predict", files={"file": ("a.jpg", jpg("red"), "image/jpeg")}), 200)["label"] == "red"
    assert check(c.post("/v1/models/colour/predict?top_k=1", content=jpg("blue"), headers=JPEG), 200)["top_k"] == [
        {"label": "blue", "probability": pytest.approx(1, abs=0.05)}]
    abstained = check(c.post("/predict?threshold=0.9999", json={"image": base64.b64encode(jpg("green")).decode()}),
                      200)
    assert abstained["abstained"] is True and abstained["label"] == "unsure"
    for bad, status in [(c.post("/predict", content=b"junk", headers=JPEG), 415),
                        (c.post("/predict", content=b"", headers=JPEG), 422),
                        (c.post("/predict?top_k=0", content=jpg("red"), headers=JPEG), 422),
                        (c.post("/predict", content=b"x" * 300_000, headers=JPEG), 413),
                        (c.post("/predict", content=b"hi", headers={"content-type": "text/plain"}), 415),
                        (c.post("/v1/models/nope/predict", content=jpg("red"), headers=JPEG), 404),
                        (httpx.post(f"{c.base_url}/predict", content=jpg("red"), headers=JPEG), 401)]:
        assert set(check(bad, status)) == {"error", "detail"}

    # batches: good and bad images in one answer, and too many images
    files = [("files", ("r.jpg", jpg("red"), "image/jpeg")), ("files", ("bad.jpg", b"junk", "image/jpeg"))]
    batch = check(c.post("/v1/models/colour/predict-batch", files=files), 200)
    assert (batch["count"], batch["failed"]) == (2, 1) and batch["results"][1]["status"] == 415
    assert check(c.post("/predict-batch", json={"images": [base64.b64encode(jpg("blue")).decode()]}),
                 200)["results"][0]["filename"] is None
    check(c.post("/predict-batch", files=[("files", (f"{i}.jpg", jpg("red", i), "image/jpeg")) for i in range(5)]),
          413)

    # the seed's GET, inside, outside and missing
    assert check(c.get("/predict", params={"image_path": "pie.jpg"}), 200)["label"] == "green"
    check(c.get("/predict", params={"image_path": "/etc/passwd"}), 403)
    check(c.get("/predict", params={"image_path": "missing.jpg"}), 404)

    # feedback on an earlier prediction, by its request_id or the image's sha256; unknown ones are errors
    r = c.post("/v1/models/colour/predict", content=jpg("red", 7), headers=JPEG)
    pred = check(r, 200)
    assert r.headers["x-request-id"] == pred["request_id"]
    feedback = "/v1/models/colour/feedback"
    assert check(c.post(feedback, json={"request_id": pred["request_id"], "label": "red"}), 200)["correct"] is True
    by_sha = {"sha256": hashlib.sha256(jpg("red", 7)).hexdigest(), "label": "blue"}
    assert check(c.post(feedback, json=by_sha), 200) == {
        "request_id": pred["request_id"], "model": "colour", "model_version": "v1", "label": "blue",
        "predicted": "red", "correct": False, "vote": "replaced"}
    check(c.post(feedback, json={"request_id": "nope", "label": "red"}), 404)
    check(c.post(feedback, json={"request_id": pred["request_id"], "label": "purple"}), 422)
    check(c.post(feedback, json={"label": "red"}), 422)
    check(c.post("/v1/models/nope/feedback", json={"request_id": pred["request_id"], "label": "red"}), 404)

    # reload: the same version again, then a broken newer one (409, the old one keeps serving)
    assert check(c.post("/v1/models/colour/reload", headers=ADMIN), 200)["version"] == "v1"
    check(c.post("/v1/models/colour/reload"), 401)  # the API key is not the admin key
    (models / "models" / "colour" / "v2").mkdir()
    (models / "models" / "colour" / "v2" / "bundle.json").write_text("{not json")
    check(c.post("/v1/models/colour/reload", headers=ADMIN), 409)
    check(c.post("/v1/models/nope/reload", headers=ADMIN), 404)

    # the Open Inference Protocol (/v2): its own bodies and its error form {"error": message}
    assert check(c.get("/v2"), 200)["name"] == "food-classifier"
    assert check(c.get("/v2/health/live"), 200) == {"live": True}
    assert check(c.get("/v2/health/ready"), 200) == {"ready": True}
    assert check(c.get("/v2/models/colour"), 200)["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert check(c.get("/v2/models/colour/versions/v1"), 200)["versions"] == ["v1"]
    assert check(c.get("/v2/models/colour/ready"), 200) == {"name": "colour", "ready": True}
    assert check(c.get("/v2/models/colour/versions/v1/ready"), 200)["ready"] is True
    check(c.get("/v2/models/nope"), 404)
    check(c.get("/v2/models/colour/versions/v0/ready"), 404)
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(jpg("blue")).decode()]}
    infer = check(c.post("/v2/models/colour/infer", json={"inputs": [tensor], "id": "x"}), 200)
    assert infer["id"] == "x" and infer["outputs"][0] == {"name": "label", "datatype": "BYTES", "shape": [1],
                                                          "data": ["blue"]}
    assert check(c.post("/v2/models/colour/versions/v1/infer", json={"inputs": [tensor]}), 200)["model_version"] == "v1"
    for bad, status in [(c.post("/v2/models/colour/infer", json={"inputs": []}), 400),
                        (c.post("/v2/models/colour/infer", json={"inputs": [{**tensor, "data": ["eA=="]}]}), 415),
                        (c.post("/v2/models/nope/infer", json={"inputs": [tensor]}), 404),
                        (c.post("/v2/models/colour/infer", json={"inputs": [{**tensor, "shape": [5],
                                                                               "data": tensor["data"] * 5}]}), 413)]:
        assert set(check(bad, status)) == {"error"}
    check(httpx.get(f"{c.base_url}/v2"), 401)

    json_ops = {(m, t) for t, ops in spec.spec["paths"].items() for m, op in ops.items()
                if "application/json" in op["responses"].get("200", {}).get("content", {})}
    assert json_ops - spec.seen == set(), "operations the test does not call yet"


def test_not_ready_answers_match_the_schema(tmp_path):
    """Models still loading: /readyz and the predict endpoints answer 503, as documented. A real server
    whose models fail to load exits (test_serving_startup), so this state is seen in-process, before the
    app's lifespan has loaded anything."""
    from fastapi.testclient import TestClient

    from food_classifier.serving.http.app import create_app
    from food_classifier.serving.settings import ServeSettings

    make_colour_bundle(tmp_path / "colour" / "v1", version="v1")
    app = create_app(ServeSettings(bundles=[tmp_path / "colour"]))
    c = TestClient(app)  # no `with`: the lifespan (model loading) never runs
    spec = Spec(c.get("/openapi.json").json())
    body = spec.check(c.get("/readyz"), 503)
    assert body["error"] == "not_ready" and "loading" in body["detail"]
    spec.check(c.post("/predict", content=jpg("red"), headers=JPEG), 503)
    spec.check(c.get("/v1/models/colour"), 503)
    assert spec.check(c.get("/v1/models"), 200) == {"default": None, "models": []}


@pytest.mark.live
def test_a_default_model_that_does_not_exist_stops_the_server(tmp_path):
    make_colour_bundle(tmp_path / "colour" / "v1", version="v1")
    log = tmp_path / "server.log"
    srv = ServerProcess([tmp_path / "colour"], args=["--default-model", "nope"], log_path=log, ready_timeout=60)
    with pytest.raises(RuntimeError, match="server exited with 3"):
        srv.start()
    assert "default model 'nope' is not among the loaded models" in log.read_text()


@pytest.mark.live
def test_the_validator_is_strict(live):
    """The check can fail: an extra, a missing or a mistyped key is refused, through the $refs."""
    c, spec = live
    good = c.post("/predict", content=jpg("red"), headers=JPEG).json()
    validator = spec.validator("post", "/predict", 200)
    validator.validate(good)
    nested = json.loads(json.dumps(good))
    nested["timing"]["batch_size"] = "one"
    for bad in ({**good, "extra": 1}, {k: v for k, v in good.items() if k != "model"}, nested):
        with pytest.raises(ValidationError):
            validator.validate(bad)
