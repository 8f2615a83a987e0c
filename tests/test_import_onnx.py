"""import-onnx: a real Keras 3 model (torch backend) exported to ONNX inside the test — NHWC, raw
0-255 pixels, softmax output — becomes a bundle that Classifier, predict and serve answer right.

The Keras model is the colour classifier of conftest in Keras form: it rescales by 1/255 itself,
averages the pixels, and a fixed Dense+softmax picks the dominant channel. Its own predictions are
the reference for the bundle's probabilities.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, colour_image, image_bytes

from food_classifier.inference import Classifier

CLI = [sys.executable, "-m", "food_classifier.cli"]
KERAS_FLAGS = ["--resize", "36", "--crop", "32", "--scale", "255", "--outputs", "probs"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory):
    """(keras model, its ONNX export). Keras 3 on the torch backend; skips when keras is missing."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras", reason="Keras 3 is in the dev extra")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras was already imported with the {keras.backend.backend()} backend")
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(3, activation="softmax")
    model = keras.Model(inputs, dense(x))
    dense.set_weights([np.eye(3, dtype=np.float32) * 10, np.array([0.1, -0.2, 0.05], np.float32)])
    model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0)  # Keras exports only called models
    path = tmp_path_factory.mktemp("keras") / "colour.onnx"
    model.export(str(path), format="onnx", verbose=False)
    return model, path


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(COLOURS) + "\n")
    return path


@pytest.fixture(scope="module")
def check_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("check")
    for c, name in enumerate(COLOURS):
        (root / name).mkdir()
        for i in range(4):
            colour_image(name, size=(60 + 7 * i, 50), noise=40, seed=10 * c + i).save(root / name / f"{i}.jpg")
    (root / "red" / "broken.jpg").write_bytes(b"not a jpeg")  # skipped and counted, not fatal
    return root


@pytest.fixture(scope="module")
def keras_bundle(keras_model, labels_file, check_dir, tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models")
    out = run("import-onnx", keras_model[1], "--labels", labels_file, "--name", "keras_colour",
              *KERAS_FLAGS, "--check-images", check_dir, "--min-accuracy", "0.9", "--models-dir", models)
    assert out.returncode == 0, out.stderr
    assert f"accuracy on {check_dir}: 1.0000 (12 images, 1 unreadable skipped)" in out.stdout
    bundle = Path(out.stdout.strip().splitlines()[-1])
    assert bundle.parent == models / "keras_colour"
    return bundle


def test_bundle_records_layout_scale_and_probability_output(keras_bundle):
    meta = json.loads((keras_bundle / "bundle.json").read_text())
    assert meta["preprocessing"] == {"resize": 36, "crop": 32, "mean": [0.0] * 3, "std": [1.0] * 3,
                                     "interpolation": "bicubic", "layout": "NHWC", "scale": 255.0}
    assert meta["input"]["shape"] == ["N", 32, 32, 3] and meta["output"]["kind"] == "probs"
    assert meta["metrics"]["check"]["accuracy"] == 1.0 and meta["metrics"]["check"]["n"] == 12
    assert meta["source"]["batch_made_dynamic"] is False


def test_classifier_matches_the_keras_model_itself(keras_model, keras_bundle):
    model, _ = keras_model
    clf = Classifier(keras_bundle, threads=1)
    images = [colour_image(name, size=(70, 50), noise=50, seed=i) for i, name in enumerate([*COLOURS] * 2)]
    x = np.stack([clf.preprocess(img) for img in images])
    assert x.shape == (6, 32, 32, 3) and 100 < x.max() <= 255  # raw pixels, channels last
    reference = np.asarray(model.predict(x, verbose=0))
    probs = clf.predict_proba(x)  # log of the softmax output, then softmax again: the same numbers
    np.testing.assert_allclose(probs, reference, atol=1e-5)
    assert [p.label for p in clf.predict_batch(images)] == [*COLOURS] * 2


@pytest.mark.live
def test_predict_command_and_server_answer_right(keras_bundle, tmp_path):
    from food_classifier.client import Client
    from food_classifier.testing import ServerProcess

    path = tmp_path / "green.png"
    colour_image("green", size=(80, 64)).save(path)
    out = run("predict", "--model", keras_bundle.parent, "--json", path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["label"] == "green"
    local = Classifier(keras_bundle).predict(path)
    with ServerProcess([keras_bundle.parent], args=["--ort-threads", "1"]) as srv, Client(srv.url) as client:
        got = client.predict(image_bytes(colour_image("green", size=(80, 64)), "PNG"))
    assert got["label"] == local.label == "green"
    assert got["confidence"] == pytest.approx(local.confidence, abs=1e-6)


def test_below_min_accuracy_nothing_is_published(keras_model, check_dir, tmp_path):
    shuffled = tmp_path / "labels.txt"
    shuffled.write_text("green\nblue\nred\n")  # wrong order: every answer is wrong
    models = tmp_path / "models"
    out = run("import-onnx", keras_model[1], "--labels", shuffled, "--name", "bad", *KERAS_FLAGS,
              "--check-images", check_dir, "--min-accuracy", "0.5", "--models-dir", models)
    assert out.returncode == 1
    assert "accuracy on" in out.stdout and "0.0000" in out.stdout
    assert "below --min-accuracy 0.5: not published" in out.stderr and "Traceback" not in out.stderr
    assert not (models / "bad").exists() or not any((models / "bad").iterdir())


def test_nchw_logits_model_imports_with_the_same_answers(colour_bundle, tmp_path):
    """The conftest bundle's own graph (NCHW, logits), re-imported: bit-for-bit the same probabilities."""
    original = Classifier(colour_bundle)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(original.labels))
    out = run("import-onnx", original.bundle.model_file(), "--labels", labels, "--name", "again",
              "--resize", "36", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--models-dir", tmp_path)
    assert out.returncode == 0, out.stderr
    again = Classifier(tmp_path / "again")
    assert again.spec == original.spec and again.spec.layout == "NCHW"  # crop and layout from the graph
    images = [colour_image(n, seed=3) for n in COLOURS]
    x = np.stack([original.preprocess(i) for i in images])
    np.testing.assert_array_equal(again.predict_proba(x), original.predict_proba(x))


def test_batch_one_graph_gets_a_batch_axis(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from food_classifier.training.import_onnx import import_onnx

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(np.eye(3, dtype=np.float32) * 5, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "fixed.onnx")
    result = import_onnx(tmp_path / "fixed.onnx", list(COLOURS), "fixed", models_dir=tmp_path / "m")
    meta = json.loads((result.bundle / "bundle.json").read_text())
    assert meta["source"]["batch_made_dynamic"] is True and meta["preprocessing"]["crop"] == 16
    preds = Classifier(result.bundle).predict_batch([colour_image(n, seed=5) for n in COLOURS])
    assert [p.label for p in preds] == list(COLOURS)


@pytest.mark.parametrize("extra, message", [
    (["--outputs", "logits", "--layout", "NCHW"], "channels in NCHW; expected 3 (wrong --layout?)"),
    (["--crop", "64"], "--crop 64 does not match the model's input size 32"),
    (["--mean", "1,2"], "--mean needs three comma-separated numbers"),
    (["--std", "0,1,1"], "std > 0"),
])
def test_user_errors_are_one_clear_line(keras_model, labels_file, tmp_path, extra, message):
    out = run("import-onnx", keras_model[1], "--labels", labels_file, "--name", "x", "--models-dir", tmp_path, *extra)
    assert out.returncode == 1 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_wrong_label_count_and_probs_on_a_logits_model_are_refused(colour_bundle, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\n")
    model = Classifier(colour_bundle).bundle.model_file()
    out = run("import-onnx", model, "--labels", labels, "--name", "x", "--models-dir", tmp_path)
    assert out.returncode == 1 and "expected [N, 4] (one column per label" in out.stderr
    labels.write_text("a\nb\nc\n")
    out = run("import-onnx", model, "--labels", labels, "--name", "x", "--outputs", "probs", "--models-dir", tmp_path)
    assert out.returncode == 1 and "rows are not probabilities" in out.stderr
    assert not (tmp_path / "x").exists()
