"""Temperature scaling, ECE and abstention on synthetic logits with a known truth, plus the run/bundle step.

Synthetic data: labels are *drawn* from softmax(z), so z is perfectly calibrated; logits z * s are then
over-confident (s > 1) or under-confident (s < 1), and the fitted temperature must undo s.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import colour_image, make_colour_bundle

from food_classifier.bundle import load_bundle
from food_classifier.inference import UNSURE, Classifier, softmax
from food_classifier.training.calibrate import (
    AbstentionRule,
    abstention_stats,
    calibrate_run,
    choose_abstention,
    choose_threshold,
    coverage_curve,
    ece_noise_floor,
    expected_calibration_error,
    fit_temperature,
    format_calibration,
    format_tradeoff,
    nll,
    reliability_bins,
    threshold_for_coverage,
)


def calibrated_logits(n: int, classes: int = 5, seed: int = 0, spread: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(0, spread, size=(n, classes))
    p = softmax(z).astype(np.float64)
    y = (rng.random((n, 1)) * p.sum(1, keepdims=True) > p.cumsum(1)).sum(1)
    return z, y


@pytest.mark.parametrize("scale", [3.0, 0.4])
def test_temperature_undoes_miscalibration_and_lowers_held_out_nll(scale):
    z, y = calibrated_logits(8000)
    logits = z * scale
    fit_idx, held = np.arange(4000), np.arange(4000, 8000)
    t = fit_temperature(logits[fit_idx], y[fit_idx])
    assert t == pytest.approx(scale, rel=0.08)  # recovers the distortion
    assert (t > 1) == (scale > 1)  # over-confident -> T > 1, under-confident (label smoothing) -> T < 1
    before, after = nll(logits[held], y[held]), nll(logits[held], y[held], t)
    assert after < before - 0.02
    ece_before = expected_calibration_error(softmax(logits[held]), y[held])
    ece_after = expected_calibration_error(softmax(logits[held], t), y[held])
    assert ece_after < 0.03 < ece_before


def test_temperature_is_nll_minimum():
    z, y = calibrated_logits(2000, seed=1)
    logits = z * 2.0
    t = fit_temperature(logits, y)
    assert nll(logits, y, t) <= min(nll(logits, y, t * 0.9), nll(logits, y, t * 1.1))
    assert np.array_equal(softmax(logits, t).argmax(1), logits.argmax(1))  # accuracy unchanged


def test_ece_by_hand():
    # bin (0.6, 0.667]: confidences 0.62 and 0.64, one right -> |0.5 - 0.63| * 2/4
    # bin (0.933, 1]:   confidences 0.95 and 0.99, both right -> |1 - 0.97| * 2/4
    probs = np.array([[0.62, 0.38], [0.36, 0.64], [0.95, 0.05], [0.01, 0.99]])
    y = np.array([0, 0, 0, 1])
    assert expected_calibration_error(probs, y) == pytest.approx(0.13 * 0.5 + 0.03 * 0.5)
    bins = reliability_bins(probs, y)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 4
    assert [b for b in bins if b["count"]][0]["accuracy"] == 0.5


def test_ece_noise_floor_is_what_a_perfect_model_shows_on_small_tiers():
    z, _ = calibrated_logits(150, classes=3, seed=2)
    floor = ece_noise_floor(softmax(z))
    assert 0.02 < floor < 0.12  # far from 0: a small tier cannot demonstrate ECE ~ 0.01
    z, _ = calibrated_logits(5000, classes=3, seed=3)
    assert ece_noise_floor(softmax(z), n_sim=20) < 0.02


def test_threshold_is_the_lowest_that_meets_the_target():
    # confidences descending; correctness: the 5th most confident is wrong, and the 8th
    conf = np.array([0.99, 0.97, 0.95, 0.93, 0.90, 0.85, 0.80, 0.70, 0.60, 0.55])
    right = np.array([1, 1, 1, 1, 0, 1, 1, 0, 1, 1], bool)
    probs = np.stack([conf, 1 - conf], 1)
    y = np.where(right, 0, 1)
    curve = coverage_curve(probs, y)
    assert curve["coverage"][-1] == pytest.approx(0.1) and curve["accuracy"][-1] == 1.0
    thr, met = choose_threshold(probs, y, target_precision=1.0)
    assert met and 0.90 < thr < 0.93  # keeps the 4 perfect ones
    thr, met = choose_threshold(probs, y, target_precision=6 / 7)  # 6 of the top 7 are right
    assert met and 0.70 < thr < 0.80
    stats = abstention_stats(probs, y, thr)
    assert stats["kept"] == 7 and stats["accuracy_covered"] == pytest.approx(6 / 7)
    thr, met = choose_threshold(probs, y, target_precision=0.5)  # everything qualifies: never abstain
    assert met and thr == 0.0
    wrong = np.stack([conf, 1 - conf], 1)
    thr, met = choose_threshold(wrong, np.ones(10, int), target_precision=0.9)  # all wrong: unreachable
    assert not met


def held_out_pair(classes: int, spread: float, n: int = 20000) -> tuple[tuple, tuple]:
    """Two independent samples of one perfectly calibrated model: one to choose on, one to check on."""
    z, y = calibrated_logits(2 * n, classes=classes, seed=7, spread=spread)
    p = softmax(z)
    return (p[:n], y[:n]), (p[n:], y[n:])


def test_default_rule_answers_most_photos_of_a_hard_task():
    """Issue 24: ten classes at ~88 % accuracy. Precision 0.98 answers barely two thirds of the
    photos; the default (precision >= accuracy + 0.07) answers >= 80 % at >= 95 % on unseen photos."""
    fit, check = held_out_pair(classes=10, spread=9.5)
    accuracy = float((fit[0].argmax(1) == fit[1]).mean())
    assert 0.88 < accuracy < 0.89
    old, _ = choose_threshold(*fit, target_precision=0.98)
    assert abstention_stats(*check, old)["coverage"] < 0.7
    chosen = choose_abstention(*fit, AbstentionRule())
    assert chosen["rule"] == "auto" and chosen["target_met"]
    assert chosen["target_precision"] == pytest.approx(accuracy + 0.07, abs=1e-4)
    assert chosen["fit_coverage"] >= 0.8 and chosen["fit_precision"] >= chosen["target_precision"]
    s = abstention_stats(*check, chosen["threshold"])
    assert s["coverage"] >= 0.8 and s["accuracy_covered"] >= 0.95
    assert s["accuracy_covered"] == pytest.approx(chosen["target_precision"], abs=0.005)  # holds on unseen photos


def test_default_rule_keeps_the_easy_tasks_098():
    """Three easy classes (~96 % accurate): accuracy + 0.07 is past the cap, so the old 0.98 threshold."""
    fit, _ = held_out_pair(classes=3, spread=14.0, n=3000)
    assert (fit[0].argmax(1) == fit[1]).mean() > 0.95
    chosen = choose_abstention(*fit, AbstentionRule())
    assert chosen["target_precision"] == 0.98
    assert chosen["threshold"] == choose_threshold(*fit, target_precision=0.98)[0] > 0


def test_the_user_sets_a_precision_or_a_coverage_never_both():
    fit, check = held_out_pair(classes=10, spread=9.0, n=5000)
    strict = choose_abstention(*fit, AbstentionRule(target_precision=0.99))
    assert strict["rule"] == "target-precision" and strict["fit_precision"] >= 0.99 and strict["fit_coverage"] < 0.7
    half = choose_abstention(*fit, AbstentionRule(target_coverage=0.5))
    assert half["rule"] == "target-coverage" and half["target_coverage"] == 0.5 and "target_precision" not in half
    assert half["fit_coverage"] == pytest.approx(0.5, abs=1e-3)
    assert abstention_stats(*check, half["threshold"])["coverage"] == pytest.approx(0.5, abs=0.02)
    for bad, match in (({"target_precision": 0.9, "target_coverage": 0.8}, "exclude each other"),
                       ({"target_coverage": 0.0}, r"in \(0, 1\]"), ({"target_precision": 1.5}, r"in \(0, 1\]")):
        with pytest.raises(ValueError, match=match):
            AbstentionRule(**bad)


def test_coverage_threshold_is_the_highest_that_answers_enough():
    conf = np.array([0.99, 0.97, 0.95, 0.93, 0.90, 0.85, 0.80, 0.70, 0.60, 0.55])
    probs = np.stack([conf, 1 - conf], 1)
    assert 0.80 < threshold_for_coverage(probs, 0.6) < 0.85  # the 6 most confident
    assert 0.80 < threshold_for_coverage(probs, 0.55) < 0.85  # 5.5 photos: 6
    assert threshold_for_coverage(probs, 1.0) == 0.0  # everything: never abstain
    assert 0.97 < threshold_for_coverage(probs, 0.1) < 0.99
    tied = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 4)
    assert 0.6 < threshold_for_coverage(tied, 0.3) < 0.9  # ties: all four or none of them


def test_the_tradeoff_line_says_what_the_user_gets():
    ab = {"threshold": 0.62, "rule": "auto", "chosen_on": "out-of-fold train+validation", "fit_coverage": 0.861,
          "fit_precision": 0.9612, "test_coverage": 0.85, "test_accuracy_covered": 0.953}
    line = format_tradeoff(ab)
    assert line.startswith("abstention: answers 86 % of photos, 96 % of those right; 'unsure' on the rest")
    assert "rule auto" in line and "test photos: answers 85 %, 95.3 % right" in line
    assert "never" in format_tradeoff({"threshold": None})


def test_classifier_abstains_as_configured(tmp_path):
    from helpers import update_meta

    bundle = make_colour_bundle(tmp_path / "b")
    clf = Classifier(bundle)
    probs = np.array([[0.9, 0.06, 0.04], [0.5, 0.3, 0.2]], np.float32)
    assert [p.abstained for p in clf.decide(probs)] == [False, False]  # no threshold stored
    update_meta(bundle, {"abstention": {"threshold": 0.6}})
    clf = Classifier(bundle)
    sure, unsure = clf.decide(probs, top_k=2)
    assert (sure.label, sure.abstained) == ("red", False)
    assert (unsure.label, unsure.abstained, unsure.label_idx) == (UNSURE, True, 0)
    assert [t.label for t in unsure.top_k] == ["red", "green"]  # top-k still returned
    assert not clf.decide(probs, threshold=0.4)[1].abstained  # per-request override
    assert clf.decide(probs, threshold=0.95)[0].abstained


def fake_run(tmp_path, scale: float = 0.3):
    """A run dir with a real (colour) bundle and under-confident synthetic logits for every tier."""
    run = tmp_path / "run"
    make_colour_bundle(run / "bundle")
    z, y = calibrated_logits(3000, classes=3, seed=4)
    tier = np.array(["train"] * 1000 + ["validation"] * 1000 + ["test"] * 1000)
    np.savez_compressed(run / "logits.npz", logits=(z * scale).astype(np.float32), y=y, tier=tier,
                        path=np.array([f"img{i}.jpg" for i in range(3000)]), labels=np.array(["red", "green", "blue"]))
    return run


def test_calibrate_run_stores_everything_in_the_bundle(tmp_path):
    run = fake_run(tmp_path)
    metrics = calibrate_run(run, rule=AbstentionRule(target_precision=0.9))
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    cal, ab = meta["calibration"], meta["abstention"]
    assert cal["fitted"] and cal["temperature"] == pytest.approx(0.3, rel=0.15)
    assert cal["nll_test_after"] < cal["nll_test_before"]
    assert cal["ece_test_after"] < cal["ece_test_before"]
    assert ab["target_met"] and ab["validation_precision"] >= 0.9
    assert ab["test_accuracy_covered"] > ab["test_accuracy_all"] and 0 < ab["test_coverage"] < 1
    # metrics are recomputed with T: stored NLL is the calibrated one; accuracy is untouched
    assert metrics["tiers"]["test"]["nll"] == pytest.approx(cal["nll_test_after"], rel=1e-4)
    assert meta["metrics"]["test"]["ece"] == pytest.approx(cal["ece_test_after"], abs=1e-6)
    assert json.loads((run / "metrics.json").read_text())["temperature"] == cal["temperature"]
    detail = json.loads((run / "calibration.json").read_text())
    assert set(detail["reliability"]["test"]) == {"before", "after"} and detail["coverage_curve"]["test"]["coverage"]
    assert "T=0.3" in format_calibration(run)
    assert ab["rule"] == "target-precision" and "--target-precision" in ab["rule_text"]
    # inference applies both
    b = load_bundle(run / "bundle")
    assert b.temperature == cal["temperature"] and b.abstain_threshold == ab["threshold"]
    pred = Classifier(b).predict(colour_image("red"))
    assert pred.label == "red" and not pred.abstained


def test_calibrate_run_is_idempotent(tmp_path):
    run = fake_run(tmp_path)
    first = calibrate_run(run)["temperature"]
    assert calibrate_run(run)["temperature"] == pytest.approx(first)  # fitted from raw logits each time


def test_calibrate_run_needs_logits(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate"):
        calibrate_run(tmp_path)
