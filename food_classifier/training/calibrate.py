"""Calibrated confidence and abstention, fitted on held-out logits.

Why: label smoothing makes the raw head under-confident (and a long training run can make a network
over-confident), so "confidence 0.9" means nothing until one scalar temperature T is fitted:
probabilities become softmax(logits / T). T only rescales, so the arg-max (accuracy) never changes.
The abstention threshold is then chosen on calibrated held-out probabilities by an `AbstentionRule`
(by default one sized to the task: a fixed 0.98 answered 42 % of the photos of a ten-class task),
and both are stored in bundle.json, where `inference.Classifier` applies them.
Held-out = `<run>/oof_logits.npz` (out-of-fold train+validation, left by the cached-feature head
path) when present, else the validation tier of `<run>/logits.npz` (written by `evaluate.score`).
No second pass over images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from food_classifier.inference import softmax
from food_classifier.monitoring.statistics import reference_stats
from food_classifier.training import runs
from food_classifier.training.config import ABSTAIN_MARGIN, ABSTAIN_MAX_PRECISION, TrainConfig, abstention_check
from food_classifier.training.evaluate import tier_report
from food_classifier.training.metrics import ECE_BINS, expected_calibration_error, nll, reliability_bins
from food_classifier.training.runs import HeldOut, Scores

if TYPE_CHECKING:
    from food_classifier.bundle import BundleMeta

__all__ = ["AbstentionRule", "Calibrated", "abstention_stats", "calibrate", "calibrate_run", "choose_abstention",
           "choose_threshold", "coverage_curve", "ece_noise_floor", "expected_calibration_error", "fit_temperature",
           "format_calibration", "format_tradeoff", "nll", "reliability_bins", "rule_line", "served_tradeoff",
           "threshold_for_coverage"]
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


def threshold_for_coverage(probs: np.ndarray, target_coverage: float) -> float:
    """Highest threshold that still answers at least `target_coverage` of these images (midpoint as in
    `choose_threshold`; 0.0 when only answering everything reaches it)."""
    curve = coverage_curve(probs, np.zeros(len(probs), dtype=int))
    t, cov = np.array(curve["threshold"]), np.array(curve["coverage"])
    ok = np.flatnonzero(cov >= target_coverage - 1e-12)  # a prefix: coverage falls as the threshold rises
    i = int(ok[-1]) if len(ok) else 0
    return 0.0 if i == 0 else float((t[i] + t[i - 1]) / 2)


@dataclass(frozen=True)
class AbstentionRule:
    """How the abstention threshold is chosen: for a precision, for a coverage, or (neither set) "auto":
    the most coverage whose held-out precision reaches min(0.98, held-out accuracy + 0.07).

    Why auto: a fixed precision 0.98 answered 42 % of a ten-class task's photos (out-of-fold accuracy
    ~0.80) and ~98 % of an easy three-class one's. Asking the answered photos to be 7 points more
    accurate than the model is overall keeps "unsure" to about the least confident fifth of the photos
    of a calibrated model from ~70 % to ~95 % accuracy (simulated; at 88 %: precision 0.95 at ~81 %
    coverage, tests/test_calibrate.py), and the cap keeps the easy tasks' 0.98.
    """

    target_precision: float | None = None
    target_coverage: float | None = None

    def __post_init__(self) -> None:
        if problem := abstention_check(self.target_precision, self.target_coverage):
            raise ValueError(problem)

    @classmethod
    def of(cls, config: TrainConfig) -> AbstentionRule:
        return cls(config.target_precision, config.target_coverage)

    @property
    def name(self) -> str:
        return ("target-precision" if self.target_precision is not None
                else "target-coverage" if self.target_coverage is not None else "auto")


def choose_abstention(probs: np.ndarray, y: np.ndarray, rule: AbstentionRule) -> dict:
    """The threshold `rule` picks on these held-out probabilities, with what it is and what it reaches
    there: bundle.json's `abstention` keys `threshold`, `rule`, `rule_text`, `target_*`, `fit_*`."""
    accuracy = float((probs.argmax(1) == y).mean()) if len(y) else 0.0
    out: dict = {"rule": rule.name, "accuracy_fit": accuracy}
    if rule.target_coverage is not None:
        threshold, met = threshold_for_coverage(probs, rule.target_coverage), len(y) > 0
        out |= {"target_coverage": rule.target_coverage,
                "rule_text": f"answer the {100 * rule.target_coverage:g} % most confident photos (--target-coverage)"}
    elif rule.target_precision is not None:
        threshold, met = choose_threshold(probs, y, rule.target_precision)
        out |= {"target_precision": rule.target_precision,
                "rule_text": f"most coverage at precision >= {rule.target_precision:g} (--target-precision)"}
    else:
        target = round(min(ABSTAIN_MAX_PRECISION, accuracy + ABSTAIN_MARGIN), 4)
        threshold, met = choose_threshold(probs, y, target)
        out |= {"target_precision": target, "margin": ABSTAIN_MARGIN, "max_precision": ABSTAIN_MAX_PRECISION,
                "rule_text": f"most coverage at precision >= min({ABSTAIN_MAX_PRECISION:g}, accuracy {accuracy:.3f} "
                             f"+ {ABSTAIN_MARGIN:g}) = {target:g} (default)"}
    s = abstention_stats(probs, y, threshold)
    return {"threshold": threshold, "target_met": met, **out,
            "fit_coverage": s["coverage"], "fit_precision": s["accuracy_covered"]}


def format_tradeoff(ab: dict, what: str = "") -> str:
    """The one line `train` prints about abstention: how many photos get an answer and how many of
    those are right, held out (where the threshold was chosen), then on the test tier if measured."""
    if ab.get("threshold") is None:
        return f"abstention{what}: never says 'unsure' (no threshold)"
    if ab.get("fit_coverage") is None:  # a bundle that did not record where its threshold came from
        return f"abstention{what}: 'unsure' below confidence {ab['threshold']:.3f}"
    prec = ab.get("fit_precision")
    line = (f"abstention{what}: answers {100 * ab['fit_coverage']:.0f} % of photos, "
            f"{'n/a' if prec is None else f'{100 * prec:.0f} %'} of those right; 'unsure' on the rest "
            f"({ab.get('chosen_on', 'held out')}, rule {ab.get('rule', 'target-precision')}")
    if ab.get("test_coverage") is not None:
        acc = ab.get("test_accuracy_covered")
        line += (f"; test photos: answers {100 * ab['test_coverage']:.0f} %, "
                 f"{'n/a' if acc is None else f'{100 * acc:.1f} %'} right")
    return line + ")"


def served_tradeoff(meta: BundleMeta) -> str:
    """`format_tradeoff` of what `serve` uses by default: the cascade's own abstention when the bundle
    ships one (its answers mix stages), else the bundle's."""
    ab = meta.cascade.model_dump().get("abstention") if meta.cascade is not None else None
    if ab:
        return format_tradeoff(ab, " (cascade, as served)")
    return format_tradeoff(meta.abstention.model_dump(exclude_none=True))


def rule_line(ab: dict, what: str = "") -> str:
    """The threshold and the rule that chose it, for the detailed `train` output."""
    rule = ab.get("rule_text") or f"precision >= {ab.get('target_precision')}"
    return (f"abstention threshold{what} {ab['threshold']:.4f}: {rule}, on {ab.get('chosen_on', 'validation')}"
            f"{'' if ab.get('target_met', True) else ' (NOT reached: best available)'}"
            f"{' (never abstains)' if ab['threshold'] == 0 else ''}")


def abstention_stats(probs: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    """Coverage and accuracy on the kept images (confidence >= threshold), as `Classifier.decide` abstains."""
    keep = probs.max(1) >= threshold
    correct = probs.argmax(1) == y
    return {"n": int(len(y)), "kept": int(keep.sum()), "coverage": float(keep.mean()) if len(y) else 0.0,
            "accuracy_covered": float(correct[keep].mean()) if keep.any() else None,
            "accuracy_all": float(correct.mean()) if len(y) else None}


def calibrate(scores: Scores, held_out: HeldOut | None, fit_tiers: list[str], model: str, version: str,
              rule: AbstentionRule | None = None) -> Calibrated:
    """Fit T and the abstention threshold on held-out logits (out-of-fold when training left them,
    else the validation tier of `scores`), measure both on validation and test, and recompute the
    per-tier metrics with T applied. `rule`: how the threshold is chosen (default: auto)."""
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

    fit_probs = softmax(fit_logits, temperature)
    chosen = choose_abstention(fit_probs, fit_y, rule or AbstentionRule())
    threshold = chosen["threshold"]
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
    abstention = chosen | {"chosen_on": method, "validation_coverage": v_stats["coverage"],
                           "validation_precision": v_stats["accuracy_covered"]}
    if t_stats:
        abstention |= {"test_coverage": t_stats["coverage"], "test_accuracy_covered": t_stats["accuracy_covered"],
                       "test_accuracy_all": t_stats["accuracy_all"]}
    metrics = tier_report(scores, temperature, fit_tiers, model, version)
    detail = {"calibration": calibration, "abstention": abstention,
              "reliability": {name: {"before": reliability_bins(*on(m, raw)), "after": reliability_bins(*on(m, cal))}
                              for name, m in (("validation", val), ("test", test)) if m.any()},
              "coverage_curve": {name: coverage_curve(*on(m, cal)) for name, m in (("validation", val), ("test", test))
                                 if m.any()} | {"fit": coverage_curve(fit_probs, fit_y)}}
    reference = reference_stats(fit_probs, threshold, fit_y, source=method)
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
    return "\n".join(lines + [rule_line(ab)])


def calibrate_run(run: str | Path, bundle: str | Path | None = None, rule: AbstentionRule | None = None) -> dict:
    """Refit calibration of a finished run from what it saved (logits.npz, oof_logits.npz), rewrite
    its metrics.json and calibration.json, and republish its own bundle (default `<run>/bundle`) with
    the new temperature and threshold. Returns the metrics. The train pipeline calls `calibrate`."""
    from food_classifier.bundle import BundleMeta, load_bundle
    from food_classifier.training.metrics import summary
    from food_classifier.training.publish import republish

    run = Path(run)
    scores = runs.read_scores(run)
    b = load_bundle(bundle or runs.bundle_dir(run) or run / runs.BUNDLE_DIR)
    c = calibrate(scores, runs.read_oof(run), b.meta.fit_tiers, b.name, b.version, rule)
    runs.write_json(run, runs.METRICS, c.metrics)
    runs.write_json(run, runs.CALIBRATION, c.detail)
    republish(b, BundleMeta.model_validate(b.meta.to_json_dict() | {
        "calibration": c.calibration, "abstention": c.abstention, "metrics": summary(c.metrics)}))
    return c.metrics
