"""Bundle format (atomic, versioned) and the ONNX Runtime Classifier on the real colour bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import colour_image, image_bytes, make_colour_bundle

from food_classifier.bundle import (
    FORMAT,
    BundleError,
    load_bundle,
    model_sources,
    newest_bundle,
    versions,
    write_bundle,
)
from food_classifier.inference import UNSURE, Classifier
from food_classifier.preprocessing import PreprocessSpec


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


def test_newest_version_wins_and_the_walk(tmp_path):
    make_colour_bundle(tmp_path / "colour" / "v1", version="v1", created_at="2026-01-01T00:00:00+00:00")
    make_colour_bundle(tmp_path / "colour" / "v2", version="v2", created_at="2026-02-01T00:00:00+00:00")
    assert newest_bundle(tmp_path / "colour").name == "v2"
    assert newest_bundle(tmp_path / "colour" / "v1").name == "v1"  # a bundle dir pins itself
    assert {p.name for s in model_sources([tmp_path]) for p in versions(s)} == {"v1", "v2"}
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


# --- schema /2, format /1 ------------------------------------------------------------------------------

V1 = Path(__file__).parent / "fixtures" / "bundle_v1"  # bundle.json as the /1 code wrote it (see its README)


def test_format_1_bundle_written_by_the_old_code_loads_typed():
    b = load_bundle(V1)
    m = b.meta
    assert m.format == "food_classifier.bundle/1" and (b.name, b.labels) == ("tiny", ["blue", "green", "red"])
    assert b.preprocessing == PreprocessSpec(resize=146, crop=128, mean=(0.485, 0.456, 0.406),
                                             std=(0.229, 0.224, 0.225))
    assert b.temperature == pytest.approx(0.0807769, rel=1e-5) and b.abstain_threshold == 0.0
    int8 = b.variants["int8"]
    assert (int8.recommended, int8.not_recommended_because) == (False, ["slower than fp32 at batch32"])
    assert int8.speedup == {"batch1": 1.165, "batch32": 0.943} and int8.quantization["calibration"]["n_images"] == 66
    assert m.recommended_variant() == "fp32"  # measured slower: auto serves fp32
    assert m.fit_tiers == ["train"] and m.training.arch == "base_cnn" and m.training.model_extra["refit"] is True
    assert [(t, v.n, v.held_out) for t, v in m.metrics.items()] == [("train", 66, False), ("validation", 12, True),
                                                                    ("test", 12, True)]
    assert m.parity.top1_agreement == 1.0 and m.dataset.manifest_sha256.startswith("22a335b3")
    assert (m.input_name, m.output.name, m.abstention.target_precision) == ("image", "logits", 0.98)
    # nothing is lost: the typed model gives back exactly what the /1 code wrote
    assert m.to_json_dict() == json.loads((V1 / "bundle.json").read_text())
    for variant in ("fp32", "int8"):
        clf = Classifier(b, variant=variant, threads=1)
        assert [p.label for p in clf.predict_batch([colour_image(c) for c in ("red", "green", "blue")])] == \
            ["red", "green", "blue"]


def test_republishing_a_format_1_bundle_writes_format_2(tmp_path):
    old = load_bundle(V1)
    target = write_bundle(tmp_path / "tiny" / old.version, old.meta,
                          lambda d: [shutil.copy(V1 / f, d / f) for f in ("model.onnx", "model.int8.onnx")])
    raw = json.loads((target / "bundle.json").read_text())
    assert raw["format"] == FORMAT == "food_classifier.bundle/2"
    assert {**raw, "format": old.meta.format} == json.loads((V1 / "bundle.json").read_text())
    assert load_bundle(target).meta == old.meta.model_copy(update={"format": FORMAT})


def test_newer_format_is_a_clear_error(tmp_path):
    b = make_colour_bundle(tmp_path / "c" / "v1", version="v1")
    meta = json.loads((b / "bundle.json").read_text())
    assert meta["format"] == FORMAT
    (b / "bundle.json").write_text(json.dumps({**meta, "format": "food_classifier.bundle/3"}))
    with pytest.raises(BundleError, match=r"bundle.json: bundle format version 3 .* newer .* upgrade"):
        load_bundle(b)
