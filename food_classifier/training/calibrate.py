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

import json
from pathlib import Path

import numpy as np

from food_classifier.inference import softmax

ECE_BINS = 15
DEFAULT_TARGET_PRECISION = 0.98
T_BOUNDS = (0.05, 20.0)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits / T)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()) if len(y) else float("nan")


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The T minimising NLL. NLL is convex in 1/T, so a bounded 1-D search over 1/T finds the optimum."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        return 1.0
    res = minimize_scalar(lambda beta: nll(logits, y, 1.0 / beta), bounds=(1.0 / bounds[1], 1.0 / bounds[0]),
                          method="bounded", options={"xatol": 1e-6})
    return float(1.0 / res.x)


def reliability_bins(probs: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Top-label confidence in equal-width bins: per bin, count, mean confidence and accuracy."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)  # bins are (lo, hi]
    out = []
    for b in range(n_bins):
        m = idx == b
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(m.sum()),
                    "confidence": float(conf[m].mean()) if m.any() else None,
                    "accuracy": float(correct[m].mean()) if m.any() else None})
    return out


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    if len(y) == 0:
        return float("nan")
    bins = reliability_bins(probs, y, n_bins)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / len(y))


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


def load_logits(run: str | Path) -> dict[str, np.ndarray]:
    path = Path(run) / "logits.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `food-classifier evaluate {run}` first")
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def calibrate_run(run: str | Path, bundle: str | Path | None = None,
                  target_precision: float = DEFAULT_TARGET_PRECISION) -> dict:
    """Fit T and the abstention threshold on held-out logits (out-of-fold, else the validation tier of
    `<run>/logits.npz`), measure them on test, store them in the bundle (default `<run>/bundle`) and
    rewrite metrics.json with T applied.

    Writes `<run>/calibration.json` (everything, incl. reliability bins and coverage curves for the
    report) and returns the recomputed metrics (same shape as `evaluate.score`).
    """
    from food_classifier.bundle import load_bundle, update_meta
    from food_classifier.training.evaluate import fitted_tiers, per_tier, summary

    run = Path(run)
    bundle = Path(bundle) if bundle else run / "bundle"
    d = load_logits(run)
    logits, y, tier = d["logits"], d["y"], d["tier"]
    labels = [str(x) for x in d["labels"]]
    val, test = tier == "validation", tier == "test"
    if not val.any():
        raise ValueError(f"{run}/logits.npz has no validation rows to fit the temperature on")
    # Fit on out-of-fold logits of train+validation when training left them (cached-feature head path):
    # ~6x more images than the validation tier alone, so T and the threshold wobble far less.
    oof = run / "oof_logits.npz"
    if oof.is_file():
        with np.load(oof) as o:
            fit_logits, fit_y, method = o["logits"], o["y"], "out-of-fold train+validation"
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

    b = load_bundle(bundle)
    metrics = {"model": b.name, "version": b.version, "temperature": temperature,
               "tiers": per_tier(y, cal, tier, labels, fitted_tiers(b.meta))}
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    update_meta(bundle, {"calibration": calibration, "abstention": abstention, "metrics": summary(metrics)})

    detail = {"calibration": calibration, "abstention": abstention,
              "reliability": {name: {"before": reliability_bins(*on(m, raw)), "after": reliability_bins(*on(m, cal))}
                              for name, m in (("validation", val), ("test", test)) if m.any()},
              "coverage_curve": {name: coverage_curve(*on(m, cal)) for name, m in (("validation", val), ("test", test))
                                 if m.any()}}
    (run / "calibration.json").write_text(json.dumps(detail, indent=2))
    return metrics


def format_calibration(run: str | Path) -> str:
    """Two lines for the CLI: what calibration and abstention did on the test tier."""
    c = json.loads((Path(run) / "calibration.json").read_text())
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
