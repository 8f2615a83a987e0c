"""Evaluation of the exported bundle itself (the artefact that is served), per tier.

`score(bundle, manifest)` runs every manifest image through ONNX Runtime once, keeps the logits
(`logits.npz`, reused by calibration and the report) and returns metrics per tier.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from food_classifier.bundle import BundleMeta
from food_classifier.inference import Classifier, softmax
from food_classifier.training.calibrate import expected_calibration_error
from food_classifier.training.data import read_manifest

TIERS = ("train", "validation", "test")


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: honest even at 100% on small n."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def compute_logits(clf: Classifier, paths: list[Path], batch_size: int = 32) -> np.ndarray:
    out = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for s in tqdm(range(0, len(paths), batch_size), desc="evaluate", unit="batch", leave=False):
            x = np.stack(list(pool.map(clf.preprocess, paths[s:s + batch_size])))
            out.append(clf.logits(x))
    return np.concatenate(out) if out else np.zeros((0, len(clf.labels)), np.float32)


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


def fitted_tiers(bundle_meta: BundleMeta | None) -> list[str]:
    """Tiers the bundle's model was fitted on (train, and validation for a refitted head)."""
    return bundle_meta.fit_tiers if bundle_meta is not None else ["train"]


def per_tier(y: np.ndarray, probs: np.ndarray, tier: np.ndarray, labels: list[str], fit_tiers: list[str]) -> dict:
    """Metrics per tier; `held_out: false` marks tiers the model was fitted on (optimistic by construction)."""
    return {t: tier_metrics(y[tier == t], probs[tier == t], labels) | {"held_out": t not in fit_tiers}
            for t in TIERS if (tier == t).any()}


def score(bundle: str | Path, manifest: str | Path, out_dir: str | Path | None = None,
          known: dict[str, np.ndarray] | None = None) -> dict:
    """Metrics per tier for a bundle; with `out_dir`, also writes metrics.json and logits.npz there.

    `known` maps image paths to logits already computed by the same model (the head's own eval-view
    logits of the tiers it was fitted on, equal to the bundle's within the export parity tolerance):
    those rows skip ONNX Runtime. Everything else -- always the held-out tiers -- runs the bundle.
    """
    clf = Classifier(bundle)
    rows = read_manifest(manifest)
    index = {lab: i for i, lab in enumerate(clf.labels)}
    unknown = sorted({r.label for r in rows} - set(index))
    if unknown:
        raise ValueError(f"manifest has labels the model does not know: {', '.join(unknown)}")
    known = known or {}
    todo = [r.path for r in rows if str(r.path) not in known]
    computed = iter(compute_logits(clf, todo))
    logits = np.stack([known[str(r.path)] if str(r.path) in known else next(computed) for r in rows]) \
        if rows else np.zeros((0, len(clf.labels)), np.float32)
    y = np.array([index[r.label] for r in rows])
    tiers = np.array([r.tier for r in rows])
    probs = softmax(logits, clf.bundle.temperature)
    metrics = {"model": clf.name, "version": clf.version, "temperature": clf.bundle.temperature,
               "tiers": per_tier(y, probs, tiers, clf.labels, fitted_tiers(clf.bundle.meta))}
    if out_dir:
        out = Path(out_dir)
        np.savez_compressed(out / "logits.npz", logits=logits, y=y, tier=tiers,
                            path=np.array([str(r.path) for r in rows]), labels=np.array(clf.labels))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def summary(metrics: dict) -> dict:
    """The small per-tier summary stored in bundle.json and shown by /v1/models."""
    return {t: {k: m[k] for k in ("n", "accuracy", "accuracy_ci95", "macro_f1", "nll", "ece", "held_out") if k in m}
            for t, m in metrics["tiers"].items()}


def format_table(metrics: dict) -> str:
    lines = [f"{'tier':<11} {'n':>5} {'accuracy':>9} {'95% CI':>15} {'macro P':>8} {'macro R':>8} {'macro F1':>9}"]
    fitted = {t for t, m in metrics["tiers"].items() if not m.get("held_out", t != "train")}
    for t, m in metrics["tiers"].items():
        lo, hi = m["accuracy_ci95"]
        lines.append(f"{t + '*' * (t in fitted):<11} {m['n']:>5} {m['accuracy']:>9.4f} {f'[{lo:.3f}, {hi:.3f}]':>15} "
                     f"{m['macro_precision']:>8.4f} {m['macro_recall']:>8.4f} {m['macro_f1']:>9.4f}")
    if fitted:
        lines.append("* fitted on: not a held-out estimate")
    test = metrics["tiers"].get("test")
    if test:
        lines.append("")
        lines.append(f"{'test class':<20} {'precision':>9} {'recall':>7} {'f1':>7} {'n':>5}")
        for lab, c in test["per_class"].items():
            lines.append(f"{lab:<20} {c['precision']:>9.4f} {c['recall']:>7.4f} {c['f1']:>7.4f} {c['support']:>5}")
        lines.append("confusion matrix (rows = true, cols = predicted): " + json.dumps(test["confusion_matrix"]))
    return "\n".join(lines)
