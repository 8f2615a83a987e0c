"""Model monitoring without labels: reference statistics, rolling windows and drift statistics.

numpy only, so the training side (which stores the reference in the bundle) and the serving side
(which compares live traffic with it) share one definition of every statistic.

    ref = reference_stats(oof_probs, abstain_threshold)       # training: bundle.json "reference"
    window = RollingWindow(1000); window.add(probs_row, abstained)
    drift(ref, window.arrays())                               # serving: PSI, chi2 p, KS, ...

Confidence is the calibrated top-1 probability; entropy is normalised by log(C) so it lies in [0, 1].
Both pile up near one end for a good model, so their histogram edges are log-spaced towards that end.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any

import numpy as np

# bins uniform in log(1 - p): from 0.5 % resolution at p = 0.9 down to 1e-5 next to 1
CONFIDENCE_EDGES = [0.0, *(1.0 - np.geomspace(1.0, 1e-5, 31)[1:]).round(6).tolist(), 1.0]
ENTROPY_EDGES = [0.0, *np.geomspace(1e-5, 1.0, 31).round(6).tolist()]
SMOOTHING = 0.5  # pseudo-count per class: an empty class in a small window is not an infinite PSI


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row divided by log(C): 0 = certain, 1 = uniform."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    c = p.shape[1]
    return (-(p * np.log(p)).sum(axis=1) / math.log(c)) if c > 1 else np.zeros(len(p))


def histogram(values: np.ndarray, edges: list[float]) -> list[int]:
    return np.histogram(np.clip(values, edges[0], edges[-1]), bins=np.asarray(edges))[0].astype(int).tolist()


def reference_stats(probs: np.ndarray, abstain_threshold: float | None, targets: np.ndarray | None = None,
                    source: str = "out-of-fold train+validation") -> dict[str, Any]:
    """What live traffic is compared with, from held-out calibrated probabilities [N, C] (the bundle's
    `reference` section). `targets` (true class indices), when given, adds the accuracy on them."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"reference_stats needs probabilities of shape [N, C] with N > 0, got {probs.shape}")
    conf = probs.max(axis=1)
    counts = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
    ref: dict[str, Any] = {
        "source": source, "n": int(len(probs)),
        "class_counts": counts.astype(int).tolist(),
        "class_fractions": (counts / counts.sum()).round(6).tolist(),
        "confidence_hist": {"edges": CONFIDENCE_EDGES, "counts": histogram(conf, CONFIDENCE_EDGES)},
        "entropy_hist": {"edges": ENTROPY_EDGES, "counts": histogram(entropy(probs), ENTROPY_EDGES)},
        "abstain_threshold": abstain_threshold,
        "abstention_rate": float((conf < abstain_threshold).mean()) if abstain_threshold is not None else 0.0,
        "mean_confidence": round(float(conf.mean()), 6),
    }
    if targets is not None:
        ref["accuracy"] = round(float((probs.argmax(axis=1) == np.asarray(targets)).mean()), 6)
    return ref


# --- statistics ------------------------------------------------------------------------------------

def _smoothed(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64) + SMOOTHING
    return counts / counts.sum()


def psi(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    """Population stability index of two count vectors over the same bins, both smoothed. Rule of
    thumb: < 0.1 stable, > 0.2 shifted. Without any shift it is still about (C - 1) / N (sampling
    noise of an N-sized window), so the window must be large against the number of classes."""
    r, c = _smoothed(ref_counts), _smoothed(cur_counts)
    return float(((c - r) * np.log(c / r)).sum())


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi2(df): the regularized upper incomplete gamma Q(df/2, x/2)."""
    if x <= 0 or df <= 0:
        return 1.0
    a, z = df / 2.0, x / 2.0
    log_front = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        n = a
        for _ in range(10_000):
            n += 1
            term *= z / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    # continued fraction for Q (modified Lentz)
    tiny = 1e-300
    b = z + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        step = d * c
        h *= step
        if abs(step - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)


def chi2_pvalue(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    """Goodness of fit of the window's class counts to the reference fractions (smoothed). Every
    difference becomes significant in a big enough window: read it with the PSI, which measures size."""
    cur = np.asarray(cur_counts, dtype=np.float64)
    n = cur.sum()
    if n == 0:
        return 1.0
    expected = _smoothed(ref_counts) * n
    stat = float(((cur - expected) ** 2 / expected).sum())
    return chi2_sf(stat, len(cur) - 1)


def ks_binned(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic between two histograms over the same edges: the largest gap of
    their CDFs at the edges (a lower bound of the exact statistic; the edges are fine where it matters)."""
    r, c = np.asarray(ref_counts, dtype=np.float64), np.asarray(cur_counts, dtype=np.float64)
    if r.sum() == 0 or c.sum() == 0:
        return 0.0
    return float(np.abs(np.cumsum(r) / r.sum() - np.cumsum(c) / c.sum()).max())


def drift(reference: dict[str, Any] | None, labels: np.ndarray, confidence: np.ndarray, entropies: np.ndarray,
          abstained: np.ndarray) -> dict[str, float]:
    """Statistics of one window of predictions (class indices, confidences, normalised entropies,
    abstained flags), compared with `reference` when there is one."""
    n = len(labels)
    out = {"n": float(n)}
    if n == 0:
        return out
    out["abstention_rate"] = float(np.mean(abstained))
    out["estimated_accuracy"] = float(np.mean(confidence))  # valid while the model stays calibrated
    out["mean_entropy"] = float(np.mean(entropies))
    if reference:
        ref_counts = np.asarray(reference["class_counts"])
        counts = np.bincount(labels, minlength=len(ref_counts))[:len(ref_counts)]
        out["class_psi"] = psi(ref_counts, counts)
        out["class_chi2_pvalue"] = chi2_pvalue(ref_counts, counts)
        ch = reference["confidence_hist"]
        out["confidence_ks"] = ks_binned(ch["counts"], histogram(confidence, ch["edges"]))
        eh = reference["entropy_hist"]
        out["entropy_psi"] = psi(eh["counts"], histogram(entropies, eh["edges"]))
    return out


class RollingWindow:
    """The last `size` predictions of one model version: what the drift gauges are computed over.
    Thread-safe (the event loop adds, a scrape or another transport's thread may read)."""

    def __init__(self, size: int, version: str = ""):
        self.size, self.version = size, version
        self._rows: deque[tuple[int, float, float, bool]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, probs: np.ndarray, abstained: bool) -> None:
        row = np.asarray(probs, dtype=np.float64)
        idx = int(row.argmax())
        ent = float(entropy(row[None])[0])
        with self._lock:
            self._rows.append((idx, float(row[idx]), ent, bool(abstained)))

    def __len__(self) -> int:
        return len(self._rows)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(class indices, confidences, entropies, abstained) of the window, oldest first."""
        with self._lock:
            rows = list(self._rows)
        if not rows:
            return np.zeros(0, int), np.zeros(0), np.zeros(0), np.zeros(0, bool)
        idx, conf, ent, abst = zip(*rows, strict=True)
        return np.array(idx), np.array(conf), np.array(ent), np.array(abst)
