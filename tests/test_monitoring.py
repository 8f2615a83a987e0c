"""Monitoring pieces on their own: the drift statistics, reference stats, the prediction log, the hook.

The statistics are checked against hand-computed values and scipy; the log against crashes, threads
and restarts; the serving hook on a real colour-bundle classifier.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import colour_image, image_bytes, make_colour_bundle

from food_classifier.answer import Timings
from food_classifier.bundle import BundleMeta, load_bundle
from food_classifier.inference import Classifier
from food_classifier.monitoring.log import PredictionLog, log_files, read_log, rotated_files
from food_classifier.monitoring.statistics import (
    CONFIDENCE_EDGES,
    RollingWindow,
    chi2_pvalue,
    chi2_sf,
    drift,
    entropy,
    ks_binned,
    psi,
    reference_stats,
)
from food_classifier.serving.errors import ServiceError
from food_classifier.serving.observer import ServingMonitor
from food_classifier.serving.settings import ServeSettings


def test_chi2_survival_matches_known_values_and_scipy():
    assert chi2_sf(3.841459, 1) == pytest.approx(0.05, abs=1e-6)
    assert chi2_sf(5.991465, 2) == pytest.approx(0.05, abs=1e-6)
    assert chi2_sf(0.0, 3) == 1.0
    stats = pytest.importorskip("scipy.stats")
    for x in (0.01, 0.5, 1.0, 2.5, 7.0, 30.0, 150.0):
        for df in (1, 2, 3, 10, 100):
            assert chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-8, abs=1e-300)


def test_psi_chi2_and_ks_on_hand_computed_cases():
    ref = np.array([100, 100, 100])
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert chi2_pvalue(ref, [50, 50, 50]) == pytest.approx(1.0)
    # smoothed fractions by hand: (c + 0.5) / (n + 1.5)
    r, c = np.array([100.5] * 3) / 301.5, np.array([200.5, 0.5, 0.5]) / 201.5
    assert psi(ref, [200, 0, 0]) == pytest.approx(float(((c - r) * np.log(c / r)).sum()))
    assert psi(ref, [200, 0, 0]) > 3
    assert chi2_pvalue(ref, [200, 0, 0]) < 1e-30
    assert ks_binned([1, 0, 0, 1], [1, 0, 0, 1]) == 0.0
    assert ks_binned([1, 1, 0, 0], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert ks_binned([2, 1, 1], [1, 1, 2]) == pytest.approx(0.25)


def test_reference_stats_and_the_typed_bundle_section():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 4)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    targets = rng.integers(0, 4, 500)
    ref = reference_stats(probs, 0.6, targets)
    conf = probs.max(axis=1)
    assert ref["n"] == 500 and sum(ref["class_counts"]) == 500
    assert ref["class_counts"] == np.bincount(probs.argmax(1), minlength=4).tolist()
    assert ref["abstention_rate"] == pytest.approx((conf < 0.6).mean())
    assert ref["mean_confidence"] == pytest.approx(conf.mean(), abs=1e-6)
    assert ref["accuracy"] == pytest.approx((probs.argmax(1) == targets).mean(), abs=1e-6)
    assert sum(ref["confidence_hist"]["counts"]) == 500 and sum(ref["entropy_hist"]["counts"]) == 500
    assert ref["confidence_hist"]["edges"] == CONFIDENCE_EDGES
    meta = {"name": "m", "version": "1", "labels": list("abcd"), "reference": ref}
    assert BundleMeta.model_validate(meta).reference.class_counts == ref["class_counts"]
    with pytest.raises(ValueError, match="class_counts has 4 entries for 3 labels"):
        BundleMeta.model_validate({**meta, "labels": list("abc")})
    bad_hist = {**ref, "entropy_hist": {"edges": [0, 1], "counts": [1, 2]}}
    with pytest.raises(ValueError, match="one count per bin"):
        BundleMeta.model_validate({**meta, "reference": bad_hist})
    with pytest.raises(ValueError, match=r"shape \[N, C\]"):
        reference_stats(np.zeros((0, 3)), None)


def test_entropy_is_normalised_and_the_window_rolls():
    assert entropy(np.array([[1.0, 0, 0], [1 / 3, 1 / 3, 1 / 3]])) == pytest.approx([0.0, 1.0], abs=1e-9)
    w = RollingWindow(3, "v1")
    for row, abst in ([0.9, 0.1], False), ([0.2, 0.8], True), ([0.6, 0.4], False), ([0.3, 0.7], False):
        w.add(np.array(row), abst)
    idx, conf, _, abstained = w.arrays()
    assert len(w) == 3 and idx.tolist() == [1, 0, 1] and conf.tolist() == pytest.approx([0.8, 0.6, 0.7])
    assert abstained.tolist() == [True, False, False]
    stats = drift(None, idx, conf, np.zeros(3), abstained)
    assert stats == pytest.approx({"n": 3, "abstention_rate": 1 / 3, "estimated_accuracy": 0.7, "mean_entropy": 0})


def test_same_distribution_keeps_psi_near_its_noise_floor():
    """PSI without any shift is about (C - 1) / N; a one-class window is far above 0.2."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet([0.3] * 5, size=4000)
    ref = reference_stats(probs[:3000], None)
    window = probs[3000:]
    idx, conf = window.argmax(1), window.max(1)
    same = drift(ref, idx, conf, entropy(window), np.zeros(len(window), bool))
    assert same["class_psi"] < 3 * 4 / 1000 and same["confidence_ks"] < 0.06 and same["class_chi2_pvalue"] > 0.01
    one = window[idx == 2]
    shifted = drift(ref, one.argmax(1), one.max(1), entropy(one), np.zeros(len(one), bool))
    assert shifted["class_psi"] > 2 and shifted["class_chi2_pvalue"] < 1e-10


def _record(i: int) -> dict:
    return {"kind": "prediction", "request_id": f"r{i}", "label": "é" * (i % 7), "n": i}


def test_log_rotation_keeps_every_line_across_threads_and_restarts(tmp_path):
    log = PredictionLog(tmp_path, max_bytes=4096)
    threads = [threading.Thread(target=lambda k=k: [log.write(_record(k * 1000 + i)) for i in range(500)])
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert log.rotations >= 10 and len(rotated_files(tmp_path)) == log.rotations
    assert all(p.stat().st_size <= 4096 for p in log_files(tmp_path))
    ids = [r["request_id"] for r in read_log(tmp_path)]
    assert sorted(ids) == sorted(f"r{k * 1000 + i}" for k in range(4) for i in range(500))  # none lost, none twice
    per_thread = [[int(x[1:]) for x in ids if int(x[1:]) // 1000 == k] for k in range(4)]
    assert all(seq == sorted(seq) for seq in per_thread)  # each writer's lines in its order

    again = PredictionLog(tmp_path, max_bytes=4096)  # a restart appends, numbering goes on
    for i in range(200):
        again.write(_record(10_000 + i))
    again.close()
    assert len(list(read_log(tmp_path))) == 2200
    numbers = [int(p.stem.split("-")[1]) for p in rotated_files(tmp_path)]
    assert numbers == list(range(1, len(numbers) + 1))


def test_a_torn_last_line_is_skipped_and_lines_reach_the_file_at_once(tmp_path):
    log = PredictionLog(tmp_path)
    log.write(_record(1))
    assert json.loads((tmp_path / "predictions.jsonl").read_text())["n"] == 1  # line-buffered: no close needed
    with open(tmp_path / "predictions.jsonl", "a") as f:
        f.write('{"kind": "prediction", "request_id": "torn"')  # the process died mid-line
    assert [r["request_id"] for r in read_log(tmp_path)] == ["r1"]


def test_images_are_sampled(tmp_path):
    jpeg = image_bytes(colour_image("red"))
    sha = hashlib.sha256(jpeg).hexdigest()
    none = PredictionLog(tmp_path / "none", images_sample=0.0)
    assert none.write({"sha256": sha}, jpeg) is None and not (tmp_path / "none" / "images").exists()
    every = PredictionLog(tmp_path / "all", images_sample=1.0)
    assert every.write({"sha256": sha}, jpeg) == f"images/{sha}.jpg"
    assert (tmp_path / "all" / "images" / f"{sha}.jpg").read_bytes() == jpeg
    some = PredictionLog(tmp_path / "some", images_sample=0.1, seed=3)
    saved = sum(some.write({"sha256": f"{i:064x}"}, jpeg) is not None for i in range(2000))
    assert 150 < saved < 250
    assert next(read_log(tmp_path / "all"))["image"] == f"images/{sha}.jpg"


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("mon")
    path = make_colour_bundle(root / "colour" / "v1", version="v1")
    clf = Classifier(load_bundle(path))
    return SimpleNamespace(name="colour", version="v1", labels=clf.labels, classifier=clf)


def _observe(monitor: ServingMonitor, model, colour: str, rid: str, cache: str = "off", seed: int = 0) -> dict:
    data = image_bytes(colour_image(colour, seed=seed))
    probs = model.classifier.predict_proba(model.classifier.preprocess(data)[None])[0]
    answer = replace(model.classifier.decide(probs[None], outcomes=[cache])[0], request_id=rid,
                     timings=Timings(total_ms=1.0))
    monitor.observe(model, answer, data)
    return {"data": data, **answer.to_dict()}


def test_cache_hits_stay_out_of_the_window(colour_model):
    monitor = ServingMonitor(ServeSettings(monitor_window=10))
    for i in range(4):
        _observe(monitor, colour_model, "red", f"a{i}", seed=i)
    for i in range(6):
        _observe(monitor, colour_model, "red", f"h{i}", cache="hit-bytes")
    (snap,) = monitor.snapshot()
    assert snap["cache_hits"] == 6 and snap["stats"]["n"] == 4


def test_feedback_by_request_id_and_sha256(colour_model, tmp_path):
    monitor = ServingMonitor(ServeSettings(monitor_window=50, feedback_memory=3, prediction_log=tmp_path))
    seen = [_observe(monitor, colour_model, c, f"id{i}", seed=i) for i, c in enumerate(["red", "green", "blue"])]
    assert monitor.feedback("colour", "red", request_id="id0")["correct"] is True
    sha = hashlib.sha256(seen[1]["data"]).hexdigest()
    wrong = monitor.feedback("colour", "blue", sha256=sha.upper())
    assert wrong == {"request_id": "id1", "model": "colour", "model_version": "v1", "label": "blue",
                     "predicted": "green", "correct": False, "vote": "new"}
    assert monitor.snapshot()[0]["stats"]["live_accuracy"] == 0.5
    monitor.feedback("colour", "green", request_id="id1")  # a correction replaces the earlier feedback
    assert monitor.snapshot()[0]["stats"]["live_accuracy"] == 1.0
    assert monitor.feedback_counts == {("colour", "correct"): 2, ("colour", "wrong"): 1}
    for bad, status, code in [({"request_id": "nope"}, 404, "unknown_prediction"),
                              ({"request_id": "id2", "label": "purple"}, 422, "unknown_label")]:
        with pytest.raises(ServiceError) as e:
            monitor.feedback("colour", bad.pop("label", "red"), **bad)
        assert (e.value.status, e.value.code) == (status, code)
    with pytest.raises(ServiceError, match="remembers the last 3"):
        _observe(monitor, colour_model, "red", "id3", seed=9)
        monitor.feedback("colour", "red", request_id="id0")  # forgotten: memory holds 3
    monitor.close()
    kinds = [r["kind"] for r in read_log(tmp_path)]
    assert kinds == ["prediction"] * 3 + ["feedback"] * 3 + ["prediction"]
    first = next(read_log(tmp_path))
    assert first["sha256"] == hashlib.sha256(seen[0]["data"]).hexdigest() and first["label"] == "red"
    assert math.isclose(sum(p for _, p in first["top_k"]), 1.0, abs_tol=1e-3)
