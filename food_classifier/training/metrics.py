"""Metrics shared by evaluation, calibration and the report: per-tier accuracy with its interval,
macro P/R/F1, NLL and calibration error. The bottom of the evaluation side, so `evaluate`,
`calibrate` and the report all import it downward.
"""

from __future__ import annotations

import math

import numpy as np

from food_classifier.training.data import TIERS

ECE_BINS = 15


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits / T)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()) if len(y) else float("nan")


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


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: honest even at 100% on small n."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def tier_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support

    y_pred = probs.argmax(1)
    k = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=k, zero_division=0)
    correct = int((y_pred == y_true).sum())
    m = {
        "n": int(len(y_true)),
        "accuracy": correct / max(len(y_true), 1),
        "accuracy_ci95": list(wilson_interval(correct, len(y_true))),
        "macro_precision": float(p.mean()), "macro_recall": float(r.mean()), "macro_f1": float(f.mean()),
        "nll": float(log_loss(y_true, probs, labels=k)) if len(y_true) else None,
        "ece": expected_calibration_error(probs, y_true) if len(y_true) else None,
        "per_class": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, lab in enumerate(labels)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=k).tolist(),
    }
    if len(labels) == 2:  # the seed reported the positive class (index 1)
        m["positive_class"] = {"label": labels[1], "precision": float(p[1]), "recall": float(r[1]), "f1": float(f[1])}
    return m


def per_tier(y: np.ndarray, probs: np.ndarray, tier: np.ndarray, labels: list[str], fit_tiers: list[str]) -> dict:
    """Metrics per tier; `held_out: false` marks tiers the model was fitted on (optimistic by construction)."""
    return {t: tier_metrics(y[tier == t], probs[tier == t], labels) | {"held_out": t not in fit_tiers}
            for t in TIERS if (tier == t).any()}


def summary(metrics: dict) -> dict:
    """The small per-tier summary stored in bundle.json and shown by /v1/models."""
    return {t: {k: m[k] for k in ("n", "accuracy", "accuracy_ci95", "macro_f1", "nll", "ece", "held_out") if k in m}
            for t, m in metrics["tiers"].items()}
