"""Calibrated confidence and abstention, fitted on held-out logits.

Why: label smoothing makes the raw head under-confident (and a long training run can make a network
over-confident), so "confidence 0.9" means nothing until one scalar temperature T is fitted:
probabilities become softmax(logits / T). T only rescales, so the arg-max (accuracy) never changes.
The abstention threshold is then chosen on calibrated held-out probabilities for a target
precision, and both are stored in bundle.json, where `inference.Classifier` applies them.
Held-out = `<run>/oof_logits.npz` (out-of-fold train+validation, left by the cached-feature head
path) when present, else the validation tier of `<run>/logits.npz` (written by `evaluate.score`).
No second pass over images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from food_classifier.inference import softmax
from food_classifier.monitoring.statistics import reference_stats
from food_classifier.training import runs
from food_classifier.training.config import DEFAULT_TARGET_PRECISION
from food_classifier.training.evaluate import tier_report
from food_classifier.training.metrics import ECE_BINS, expected_calibration_error, nll, reliability_bins
from food_classifier.training.runs import HeldOut, Scores

__all__ = ["DEFAULT_TARGET_PRECISION", "Calibrated", "abstention_stats", "calibrate", "calibrate_run",
           "choose_threshold", "coverage_curve", "ece_noise_floor", "expected_calibration_error", "fit_temperature",
           "format_calibration", "nll", "reliability_bins"]
T_BOUNDS = (0.05, 20.0)


@dataclass
class Calibrated:
    """What calibration decides and measures: bundle.json sections, metrics.json, calibration.json."""

    calibration: dict  # bundle.json "calibration": T and how it was fitted
    abstention: dict   # bundle.json "abstention": threshold and its coverage
    metrics: dict      # per-tier metrics with T applied (metrics.json; its summary goes into bundle.json)
    detail: dict       # everything above plus reliability bins and coverage curves (calibration.json)
    reference: dict | None = None  # bundle.json "reference": what live traffic is compared with (monitoring/)

    @property
    def temperature(self) -> float:
        return float(self.calibration["temperature"])


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The T minimising NLL. NLL is convex in 1/T, so a bounded 1-D search over 1/T finds the optimum."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        return 1.0
    res = minimize_scalar(lambda beta: nll(logits, y, 1.0 / beta), bounds=(1.0 / bounds[1], 1.0 / bounds[0]),
                          method="bounded", options={"xatol": 1e-6})
    return float(1.0 / res.x)


def ece_noise_floor(probs: np.ndarray, n_sim: int = 200, n_bins: int = ECE_BINS, seed: int = 0) -> float:
    """Mean ECE of a *perfectly calibrated* model with these confidences (labels drawn from `probs`).

    Why: ECE is biased upwards on small tiers (168 test images give ~0.04 for a perfect model), so a
    measured ECE is only meaningful next to this floor.
    """
    if len(probs) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    cum = np.cumsum(probs.astype(np.float64), axis=1)
    draws = (rng.random((n_sim, len(probs), 1)) * cum[:, -1:] > cum[None]).sum(-1)
    return float(np.mean([expected_calibration_error(probs, d, n_bins) for d in draws]))


def coverage_curve(probs: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    """For each distinct confidence t (ascending): the share of images with confidence >= t (kept)
    and the accuracy on those. A prediction abstains when its confidence is below the threshold."""
    conf = probs.max(1).astype(np.float64)
    correct = (probs.argmax(1) == y).astype(np.float64)
    order = np.argsort(-conf, kind="stable")
    conf, correct = conf[order], correct[order]
    kept = np.arange(1, len(conf) + 1)
    acc = np.cumsum(correct) / kept
    last = np.r_[conf[1:] != conf[:-1], True]  # ties: only the point that keeps all of them
    t, cov, a = conf[last][::-1], (kept[last] / max(len(conf), 1))[::-1], acc[last][::-1]
    return {"threshold": t.tolist(), "coverage": cov.tolist(), "accuracy": a.tolist()}


def choose_threshold(probs: np.ndarray, y: np.ndarray, target_precision: float) -> tuple[float, bool]:
    """Lowest threshold whose kept predictions reach `target_precision` (most coverage at that precision).

    Returned as the midpoint between the lowest kept confidence and the next lower one, so it does not
    sit exactly on a validation value. If no threshold reaches the target, the one with the best
    precision is returned with `met=False` (the caller reports it; the bundle stays usable).
    """
    curve = coverage_curve(probs, y)
    t, acc = np.array(curve["threshold"]), np.array(curve["accuracy"])
    if len(t) == 0:
        return 1.0, False
    ok = np.flatnonzero(acc >= target_precision - 1e-12)
    met = len(ok) > 0
    i = int(ok[0]) if met else int(np.argmax(acc))
    if i == 0:  # keeping everything is already the answer: never abstain
        return 0.0, met
    return float((t[i] + t[i - 1]) / 2), met


def abstention_stats(probs: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    """Coverage and accuracy on the kept images (confidence >= threshold), as `Classifier.decide` abstains."""
    keep = probs.max(1) >= threshold
    correct = probs.argmax(1) == y
    return {"n": int(len(y)), "kept": int(keep.sum()), "coverage": float(keep.mean()) if len(y) else 0.0,
            "accuracy_covered": float(correct[keep].mean()) if keep.any() else None,
            "accuracy_all": float(correct.mean()) if len(y) else None}


def calibrate(scores: Scores, held_out: HeldOut | None, fit_tiers: list[str], model: str, version: str,
              target_precision: float = DEFAULT_TARGET_PRECISION) -> Calibrated:
    """Fit T and the abstention threshold on held-out logits (out-of-fold when training left them,
    else the validation tier of `scores`), measure both on validation and test, and recompute the
    per-tier metrics with T applied."""
    logits, y, tier = scores.logits, scores.y, scores.tier
    val, test = tier == "validation", tier == "test"
    if not val.any():
        raise ValueError("the logits have no validation rows to fit the temperature on")
    # Fit on out-of-fold logits of train+validation when training left them (cached-feature head path):
    # ~6x more images than the validation tier alone, so T and the threshold wobble far less.
    if held_out is not None:
        fit_logits, fit_y, method = held_out.logits, held_out.y, "out-of-fold train+validation"
    else:
        fit_logits, fit_y, method = logits[val], y[val], "validation"
    temperature = fit_temperature(fit_logits, fit_y)
    raw, cal = softmax(logits, 1.0), softmax(logits, temperature)

    def on(mask: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return probs[mask], y[mask]

    threshold, met = choose_threshold(softmax(fit_logits, temperature), fit_y, target_precision)
    f_stats = abstention_stats(softmax(fit_logits, temperature), fit_y, threshold)
    v_stats = abstention_stats(*on(val, cal), threshold)
    t_stats = abstention_stats(*on(test, cal), threshold) if test.any() else None
    calibration = {
        "temperature": temperature, "fitted": True, "method": f"temperature scaling, {method} NLL",
        "fitted_on": method, "n_fit": int(len(fit_y)),
        # the held-out set T was fitted on: its accuracy is the recipe's out-of-fold accuracy
        "accuracy_fit": float((fit_logits.argmax(1) == fit_y).mean()),
        "nll_fit_before": nll(fit_logits, fit_y), "nll_fit_after": nll(fit_logits, fit_y, temperature),
        # at a search bound: the held-out logits carry no usable confidence signal (e.g. all correct)
        "at_bound": bool(min(abs(temperature - b) / b for b in T_BOUNDS) < 1e-3),
        "n_validation": int(val.sum()), "ece_bins": ECE_BINS,
        "nll_validation_before": nll(logits[val], y[val]),
        "nll_validation_after": nll(logits[val], y[val], temperature),
        "ece_validation_before": expected_calibration_error(*on(val, raw)),
        "ece_validation_after": expected_calibration_error(*on(val, cal)),
    }
    if test.any():
        calibration |= {"nll_test_before": nll(logits[test], y[test]),
                        "nll_test_after": nll(logits[test], y[test], temperature),
                        "ece_test_before": expected_calibration_error(*on(test, raw)),
                        "ece_test_after": expected_calibration_error(*on(test, cal)),
                        "ece_test_floor": ece_noise_floor(cal[test])}
    abstention = {"threshold": threshold, "target_precision": target_precision, "target_met": met,
                  "chosen_on": method, "fit_coverage": f_stats["coverage"],
                  "fit_precision": f_stats["accuracy_covered"],
                  "validation_coverage": v_stats["coverage"], "validation_precision": v_stats["accuracy_covered"]}
    if t_stats:
        abstention |= {"test_coverage": t_stats["coverage"], "test_accuracy_covered": t_stats["accuracy_covered"],
                       "test_accuracy_all": t_stats["accuracy_all"]}
    metrics = tier_report(scores, temperature, fit_tiers, model, version)
    detail = {"calibration": calibration, "abstention": abstention,
              "reliability": {name: {"before": reliability_bins(*on(m, raw)), "after": reliability_bins(*on(m, cal))}
                              for name, m in (("validation", val), ("test", test)) if m.any()},
              "coverage_curve": {name: coverage_curve(*on(m, cal)) for name, m in (("validation", val), ("test", test))
                                 if m.any()}}
    reference = reference_stats(softmax(fit_logits, temperature), threshold, fit_y, source=method)
    return Calibrated(calibration, abstention, metrics, detail, reference)


def format_calibration(run: str | Path) -> str:
    """Two lines for the CLI: what calibration and abstention did on the test tier."""
    c = runs.read_json(run, runs.CALIBRATION)
    cal, ab = c["calibration"], c["abstention"]
    bound = " (at the search bound: no usable confidence signal)" if cal.get("at_bound") else ""
    lines = [f"calibration: T={cal['temperature']:.3f} fitted on {cal['fitted_on']} (n={cal['n_fit']}, "
             f"accuracy {cal['accuracy_fit']:.4f}){bound}: NLL {cal['nll_fit_before']:.4f} -> "
             f"{cal['nll_fit_after']:.4f}"]
    if "ece_test_before" in cal:
        lines.append(f"  test: ECE({cal['ece_bins']} bins) {cal['ece_test_before']:.4f} -> {cal['ece_test_after']:.4f}"
                     f" (a perfectly calibrated model would show ~{cal.get('ece_test_floor', float('nan')):.3f}"
                     f" on this many images), NLL {cal['nll_test_before']:.4f} -> {cal['nll_test_after']:.4f}")
    line = (f"abstention: threshold {ab['threshold']:.4f} for precision >= {ab['target_precision']:g} on "
            f"{ab.get('chosen_on', 'validation')}"
            f"{'' if ab['target_met'] else ' (NOT reached; best available)'}"
            f"{' (met without abstaining: never abstains)' if ab['threshold'] == 0 else ''}; coverage there "
            f"{ab['fit_coverage']:.3f}")
    if "test_coverage" in ab:
        acc = ab["test_accuracy_covered"]
        line += (f"; test coverage {ab['test_coverage']:.3f}, accuracy on kept "
                 f"{'n/a' if acc is None else f'{acc:.4f}'} (all: {ab['test_accuracy_all']:.4f})")
    return "\n".join(lines + [line])


def calibrate_run(run: str | Path, bundle: str | Path | None = None,
                  target_precision: float = DEFAULT_TARGET_PRECISION) -> dict:
    """Refit calibration of a finished run from what it saved (logits.npz, oof_logits.npz), rewrite
    its metrics.json and calibration.json, and republish its own bundle (default `<run>/bundle`) with
    the new temperature and threshold. Returns the metrics. The train pipeline calls `calibrate`."""
    from food_classifier.bundle import BundleMeta, load_bundle
    from food_classifier.training.metrics import summary
    from food_classifier.training.publish import republish

    run = Path(run)
    scores = runs.read_scores(run)
    b = load_bundle(bundle or runs.bundle_dir(run) or run / runs.BUNDLE_DIR)
    c = calibrate(scores, runs.read_oof(run), b.meta.fit_tiers, b.name, b.version, target_precision)
    runs.write_json(run, runs.METRICS, c.metrics)
    runs.write_json(run, runs.CALIBRATION, c.detail)
    republish(b, BundleMeta.model_validate(b.meta.to_json_dict() | {
        "calibration": c.calibration, "abstention": c.abstention, "metrics": summary(c.metrics)}))
    return c.metrics
