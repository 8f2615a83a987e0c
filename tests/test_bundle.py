"""Bundle format (atomic, versioned) and the ONNX Runtime Classifier on the real colour bundle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import colour_image, image_bytes, make_colour_bundle

from food_classifier.bundle import BundleError, find_bundles, load_bundle, newest_bundle, write_bundle
from food_classifier.inference import UNSURE, Classifier


def test_write_bundle_is_atomic_on_failure(tmp_path):
    def boom(d):
        (d / "model.onnx").write_bytes(b"half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_bundle(tmp_path / "m" / "v1", {"name": "m", "version": "v1", "labels": ["a", "b"]}, boom)
    assert not (tmp_path / "m" / "v1").exists()
    assert list((tmp_path / "m").iterdir()) == []  # no temp dir left behind either


def test_bundles_are_immutable(tmp_path):
    make_colour_bundle(tmp_path / "c" / "v1", version="v1")
    with pytest.raises(BundleError, match="already exists"):
        make_colour_bundle(tmp_path / "c" / "v1", version="v1")


def test_newest_version_wins_and_find_bundles(tmp_path):
    make_colour_bundle(tmp_path / "colour" / "v1", version="v1", created_at="2026-01-01T00:00:00+00:00")
    make_colour_bundle(tmp_path / "colour" / "v2", version="v2", created_at="2026-02-01T00:00:00+00:00")
    assert newest_bundle(tmp_path / "colour").name == "v2"
    assert newest_bundle(tmp_path / "colour" / "v1").name == "v1"  # a bundle dir pins itself
    assert {p.name for p in find_bundles(tmp_path)} == {"v1", "v2"}
    assert load_bundle(tmp_path / "colour" / "v2").labels == ["red", "green", "blue"]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="no model bundle found"):
        newest_bundle(tmp_path)
    b = make_colour_bundle(tmp_path / "c" / "v1", version="v1")
    (b / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(b)
    (b / "bundle.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(BundleError, match="unknown bundle format"):
        load_bundle(b)


def test_classifier_predicts_every_input_kind(colour_bundle, tmp_path):
    clf = Classifier(colour_bundle, threads=1)
    path = tmp_path / "g.png"
    colour_image("green").save(path)
    assert clf.predict(path).label == "green"
    assert clf.predict(image_bytes(colour_image("blue"))).label == "blue"
    p = clf.predict(colour_image("red"), top_k=2)
    assert (p.label, p.label_idx) == ("red", 0)
    assert len(p.top_k) == 2 and p.top_k[0]["label"] == "red"
    assert p.confidence == pytest.approx(p.top_k[0]["probability"]) and 0.5 < p.confidence <= 1
    batch = clf.predict_batch([colour_image(c, seed=i) for i, c in enumerate(["blue", "red", "green", "red"])])
    assert [b.label for b in batch] == ["blue", "red", "green", "red"]
    assert clf.predict_batch([]) == []


def test_threshold_abstains_but_keeps_top_k(colour_bundle):
    clf = Classifier(colour_bundle)
    p = clf.predict(colour_image("red"), threshold=0.999)
    assert p.abstained and p.label == UNSURE and p.top_k[0]["label"] == "red"
    assert not clf.predict(colour_image("red"), threshold=0.5).abstained


def test_temperature_from_bundle_softens_probabilities(tmp_path):
    hot = make_colour_bundle(tmp_path / "a" / "v1", version="v1")
    meta = json.loads((hot / "bundle.json").read_text())
    meta["calibration"] = {"temperature": 4.0}
    (hot / "bundle.json").write_text(json.dumps(meta))
    cold = make_colour_bundle(tmp_path / "b" / "v1", version="v1")
    img = colour_image("green")
    assert Classifier(hot).predict(img).confidence < Classifier(cold).predict(img).confidence


def test_importing_inference_does_not_import_torch(colour_bundle):
    code = ("import sys; from food_classifier.inference import Classifier; "
            f"Classifier({str(colour_bundle)!r}).predict_batch([]); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
