"""Evaluation of the exported model itself (the graph that is served), per tier.

`evaluate_bundle(bundle, rows)` runs every manifest image through ONNX Runtime once (through
`Classifier`, the serving path) and returns its raw logits (`Scores`); `tier_report` turns them
into metrics per tier at a temperature. The pipeline calls both in memory; `score(bundle,
manifest)` is the `evaluate` command's version, which also leaves logits.npz and metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from food_classifier import runtime
from food_classifier.bundle import Bundle, load_bundle, newest_bundle
from food_classifier.inference import Classifier, softmax
from food_classifier.training import runs
from food_classifier.training.data import Row, read_manifest
from food_classifier.training.metrics import per_tier
from food_classifier.training.progress import progress_bar
from food_classifier.training.runs import Scores


def compute_logits(clf: Classifier, paths: list[Path], batch_size: int = 32) -> np.ndarray:
    with progress_bar(total=len(paths), desc="evaluate", unit="img", leave=False) as bar:
        out = runtime.map_batched(paths, clf.preprocess, clf.logits, batch_size, progress=bar.update)
    return np.concatenate(out) if out else np.zeros((0, len(clf.labels)), np.float32)


def evaluate_bundle(bundle: Bundle, rows: list[Row], known: dict[str, np.ndarray] | None = None) -> Scores:
    """Logits of the bundle's fp32 graph for every row (`bundle` may be the in-memory view of a run
    that is not published yet).

    `known` maps image paths to logits already computed by the same model (the head's own eval-view
    logits of the tiers it was fitted on, equal to the bundle's within the export parity tolerance):
    those rows skip ONNX Runtime. Everything else -- always the held-out tiers -- runs the bundle.
    """
    clf = Classifier(bundle)
    index = {lab: i for i, lab in enumerate(clf.labels)}
    unknown = sorted({r.label for r in rows} - set(index))
    if unknown:
        raise ValueError(f"manifest has labels the model does not know: {', '.join(unknown)}")
    known = known or {}
    todo = [r.path for r in rows if str(r.path) not in known]
    computed = iter(compute_logits(clf, todo))
    logits = np.stack([known[str(r.path)] if str(r.path) in known else next(computed) for r in rows]) \
        if rows else np.zeros((0, len(clf.labels)), np.float32)
    return Scores(logits=logits, y=np.array([index[r.label] for r in rows]), tier=np.array([r.tier for r in rows]),
                  path=np.array([str(r.path) for r in rows]), labels=list(clf.labels))


def tier_report(scores: Scores, temperature: float, fit_tiers: list[str], model: str, version: str) -> dict:
    """metrics.json: per-tier metrics of `scores` with softmax(logits / temperature)."""
    probs = softmax(scores.logits, temperature)
    return {"model": model, "version": version, "temperature": temperature,
            "tiers": per_tier(scores.y, probs, scores.tier, scores.labels, fit_tiers)}


def score(bundle: str | Path, manifest: str | Path, out_dir: str | Path | None = None) -> dict:
    """Metrics per tier of a published bundle on a manifest, at the bundle's temperature; with
    `out_dir` (a run dir), also writes its logits.npz and metrics.json."""
    b = load_bundle(newest_bundle(bundle))
    scores = evaluate_bundle(b, read_manifest(manifest))
    metrics = tier_report(scores, b.temperature, b.meta.fit_tiers, b.name, b.version)
    if out_dir:
        runs.write_scores(Path(out_dir), scores)
        runs.write_json(Path(out_dir), runs.METRICS, metrics)
    return metrics


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
