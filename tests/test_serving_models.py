"""Several models, variants, reload, loading failures, settings and model sources (TestClient)."""

from __future__ import annotations

import time

import pytest
from conftest import make_colour_bundle
from fastapi.testclient import TestClient
from helpers import JPEG, assert_error, jpg, ready_client

from food_classifier.serving.http.app import create_app
from food_classifier.serving.settings import ServeSettings

# --- several models, variants, reload ------------------------------------------------------------

def test_models_dir_with_several_models_and_variants(tmp_path):
    from helpers import update_meta

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
    c = ready_client(ServeSettings(bundles=[model_dir], admin_key="admin-key"))
    c.headers["X-API-Key"] = "admin-key"  # reload needs the admin key
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
    assert ServeSettings(variant=[]).variant_for("x") == "auto"  # issue 16: the recommended variant by default


def test_model_sources(tmp_path):
    from food_classifier.bundle import model_sources

    b1 = make_colour_bundle(tmp_path / "models" / "colour" / "v1", version="v1")
    make_colour_bundle(tmp_path / "models" / "tint" / "v1", name="tint")
    assert model_sources([b1]) == [b1]
    assert model_sources([tmp_path / "models" / "colour"]) == [tmp_path / "models" / "colour"]
    assert model_sources([tmp_path / "models"]) == [tmp_path / "models" / "colour", tmp_path / "models" / "tint"]
