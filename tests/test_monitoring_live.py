"""The QA loop on real food photos through the real server: drift gauges, feedback, the prediction log,
and the `monitor` report (the Grafana / Prometheus files: test_deploy.py).

The model is trained here in a second: a linear softmax on a 4x4 grid of mean colours of Food-101
photos (apple pie, bibimbap, breakfast burrito), built as a real ONNX graph (AveragePool -> Gemm).
About 55 % accurate, but its predicted classes follow the photos it gets, which is what drift is
about. Its reference statistics come from 5-fold out-of-fold probabilities, as in training.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import SHARED_DATA
from prometheus_client.parser import text_string_to_metric_families

from food_classifier.bundle import write_bundle
from food_classifier.monitoring.log import read_log, rotated_files
from food_classifier.monitoring.statistics import reference_stats
from food_classifier.preprocessing import PreprocessSpec, preprocess
from food_classifier.testing import ServerProcess, free_port

CLASSES = ["apple_pie", "bibimbap", "breakfast_burrito"]
SPEC = PreprocessSpec(resize=72, crop=64)
FIT_PER_CLASS, GRID = 150, 4
ROOT = Path(__file__).resolve().parents[1]
KEY = "monitor-key"
pytestmark = [pytest.mark.live, pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs the shared Food-101 photos")]


def _features(paths: list[Path]) -> np.ndarray:
    x = np.stack([preprocess(p, SPEC) for p in paths])
    cell = SPEC.crop // GRID
    return x.reshape(len(x), 3, GRID, cell, GRID, cell).mean(axis=(3, 5)).reshape(len(x), -1)


def _fit(x: np.ndarray, y: np.ndarray, steps: int = 400, l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by gradient descent (standardised inputs); W [C, F], b [C]."""
    w, b = np.zeros((len(CLASSES), x.shape[1])), np.zeros(len(CLASSES))
    onehot = np.eye(len(CLASSES))[y]
    for _ in range(steps):
        p = _softmax(x @ w.T + b)
        w -= 0.5 * ((p - onehot).T @ x / len(x) + l2 * w)
        b -= 0.5 * (p - onehot).mean(axis=0)
    return w, b


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def make_food_bundle(target: Path, fit: list[tuple[Path, int]]) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x, y = _features([p for p, _ in fit]), np.array([c for _, c in fit])
    mu, sigma = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mu) / sigma
    folds = np.arange(len(z)) % 5
    oof = np.zeros((len(z), len(CLASSES)))
    for k in range(5):
        w, b = _fit(z[folds != k], y[folds != k])
        oof[folds == k] = _softmax(z[folds == k] @ w.T + b)
    w, b = _fit(z, y)
    w_raw, b_raw = w / sigma, b - (w / sigma) @ mu  # standardisation folded into the Gemm
    cell = SPEC.crop // GRID
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[cell, cell], strides=[cell, cell]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1)], "food_grid",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SPEC.crop, SPEC.crop])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(CLASSES)])],
        [numpy_helper.from_array(w_raw.astype(np.float32), "W"),
         numpy_helper.from_array(b_raw.astype(np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"name": "food", "version": "v1", "arch": "colour_grid_softmax", "labels": CLASSES,
            "preprocessing": SPEC.to_dict(), "abstention": {"threshold": 0.5},
            "reference": reference_stats(oof, 0.5, y)}
    return write_bundle(target, meta, lambda d: onnx.save(model, str(d / "model.onnx")))


@pytest.fixture(scope="module")
def food(tmp_path_factory):
    """The bundle, and the held-out photos (not in the fit) per class."""
    photos = {c: sorted((SHARED_DATA / c).glob("*.jpg")) for c in CLASSES}
    fit = [(p, i) for i, c in enumerate(CLASSES) for p in photos[c][:FIT_PER_CLASS]]
    root = tmp_path_factory.mktemp("food_models")
    make_food_bundle(root / "food" / "v1", fit)
    return root / "food", {c: photos[c][FIT_PER_CLASS:] for c in CLASSES}


def metrics(client: httpx.Client) -> dict[tuple[str, str | None], float]:
    """Sample values by (name, model label); samples differing in other labels are summed."""
    out: dict[tuple[str, str | None], float] = {}
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            key = (s.name, s.labels.get("model"))
            out[key] = out.get(key, 0.0) + s.value
    return out


def classify(client: httpx.Client, path: Path) -> dict:
    r = client.post("/v1/models/food/predict", content=path.read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    return r.json()


def test_one_class_drives_the_psi_gauge_up_and_a_training_mix_keeps_it_low(food):
    model, held_out = food
    with ServerProcess([model], args=["--monitor-window", "150"]) as srv, httpx.Client(base_url=srv.url) as c:
        mix = [p for trio in zip(*(held_out[k][:50] for k in CLASSES), strict=True) for p in trio]
        answers = [classify(c, p) for p in mix]
        m = metrics(c)
        assert m["food_classifier_monitor_window_predictions", "food"] == 150
        assert m["food_classifier_drift_class_psi", "food"] < 0.05
        assert m["food_classifier_drift_class_chi2_pvalue", "food"] > 0.05
        assert m["food_classifier_drift_confidence_ks", "food"] < 0.15
        assert m["food_classifier_abstention_rate", "food"] == pytest.approx(np.mean([a["abstained"] for a in answers]))
        estimated = np.mean([a["confidence"] for a in answers])
        assert m["food_classifier_estimated_accuracy", "food"] == pytest.approx(estimated)
        accuracy = np.mean([a["label_idx"] == i % 3 for i, a in enumerate(answers)])
        assert abs(estimated - accuracy) < 0.08, (estimated, accuracy)  # calibrated enough to estimate accuracy

        for p in mix[:10]:  # the same photos again: cache hits, counted apart, the window unchanged
            assert classify(c, p)["cache"] == "hit-bytes"
        m = metrics(c)
        assert m["food_classifier_monitor_cache_hits_total", "food"] == 10
        assert m["food_classifier_estimated_accuracy", "food"] == pytest.approx(estimated)

        for p in held_out["bibimbap"][50:200]:  # only one class: the window now holds nothing else
            classify(c, p)
        m = metrics(c)
        assert m["food_classifier_drift_class_psi", "food"] > 0.2
        assert m["food_classifier_drift_class_chi2_pvalue", "food"] < 1e-6
        assert m["food_classifier_monitor_window_predictions", "food"] == 150


@pytest.fixture(scope="module")
def logged(food, tmp_path_factory):
    """A server with the prediction log (tiny rotation size), gRPC, feedback; traffic sent once."""
    model, held_out = food
    log_dir = tmp_path_factory.mktemp("predlog")
    grpc_port = free_port()
    srv = ServerProcess([model], env={"FOOD_CLASSIFIER_API_KEY": KEY},
                        args=["--prediction-log", str(log_dir), "--prediction-log-max-bytes", "4096",
                              "--log-images-sample", "0.1", "--grpc-port", str(grpc_port)])
    with srv, httpx.Client(base_url=srv.url, headers={"X-API-Key": KEY}, timeout=30) as c:
        photos = [(p, i) for i, k in enumerate(CLASSES) for p in held_out[k][:20]]
        answers = [(classify(c, p), i) for p, i in photos]
        before = metrics(c)
        fb = "/v1/models/food/feedback"
        for a, truth in answers:
            assert c.post(fb, json={"request_id": a["request_id"], "label": CLASSES[truth]}).status_code == 200
        after_truth = metrics(c)
        wrong = [a for a, truth in answers if a["label_idx"] != truth]
        for a in wrong:  # say every wrong one was right after all: live accuracy must reach 1
            assert c.post(fb, json={"request_id": a["request_id"], "label": a["top_k"][0]["label"]}).json()["correct"]
        after_fix = metrics(c)
        from food_classifier.client import GrpcClient

        with GrpcClient(f"127.0.0.1:{grpc_port}", api_key=KEY) as g:  # gRPC predictions are logged too
            grpc_answer = g.predict(held_out["apple_pie"][30])
    yield {"log": log_dir, "answers": answers, "wrong": wrong, "before": before, "after_truth": after_truth,
           "after_fix": after_fix, "grpc": grpc_answer, "model": model}


def test_feedback_moves_live_accuracy(logged):
    answers, wrong = logged["answers"], logged["wrong"]
    assert ("food_classifier_live_accuracy", "food") not in logged["before"]  # no feedback yet: no figure
    accuracy = np.mean([a["label_idx"] == truth for a, truth in answers])
    assert 0 < len(wrong) < len(answers)
    assert logged["after_truth"]["food_classifier_live_accuracy", "food"] == pytest.approx(accuracy)
    assert logged["after_truth"]["food_classifier_feedback_window", "food"] == len(answers)
    assert logged["after_fix"]["food_classifier_live_accuracy", "food"] == 1.0
    assert logged["after_fix"]["food_classifier_feedback_total", "food"] == len(answers) + len(wrong)


def test_the_log_keeps_every_prediction_and_feedback_across_rotations(logged):
    log_dir, answers = logged["log"], logged["answers"]
    assert len(rotated_files(log_dir)) >= 3
    records = list(read_log(log_dir))
    predictions = [r for r in records if r["kind"] == "prediction"]
    ids = [r["request_id"] for r in predictions]
    assert ids == [a["request_id"] for a, _ in answers] + [logged["grpc"]["request_id"]]
    assert sum(r["kind"] == "feedback" for r in records) == len(answers) + len(logged["wrong"])
    first, answer = predictions[0], answers[0][0]
    assert (first["label"], first["confidence"], first["version"]) == (answer["label"],
                                                                       pytest.approx(answer["confidence"]), "v1")
    saved = [r for r in predictions if "image" in r]
    assert saved and all((log_dir / r["image"]).is_file() for r in saved)  # ~10 % of the images kept
    assert logged["after_fix"]["food_classifier_prediction_log_lines_total", None] == len(records) - 1  # + gRPC


def test_monitor_command_reports_the_log(logged, tmp_path):
    out = tmp_path / "report.html"
    cmd = [sys.executable, "-m", "food_classifier.cli", "monitor", str(logged["log"]), "--model",
           str(logged["model"]), "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    header, _, *rows = run.stdout.splitlines()[:3]
    assert "PSI" in header and "fb acc" in header and rows[0].startswith("food")
    html = out.read_text()
    assert html.count("<svg") == 4 and "apple_pie" in html
    bad = subprocess.run(cmd[:4] + [str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "holds no prediction log" in bad.stderr and "Traceback" not in bad.stderr
