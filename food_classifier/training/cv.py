"""K-fold cross-validation of the training recipe: how much does the accuracy number wobble?

Why: with ~800 photos one test tier of ~170 images gives one number whose 95% interval is +-4
points; re-splitting and retraining K times shows the spread directly.

What is folded: only the manifest's train + validation rows. The test tier is never touched, so it
stays a one-shot held-out estimate. Each fold holds out 1/K of those rows (stratified by class,
duplicate groups kept together) and re-splits the rest into train/validation with the manifest's
own validation share, so every fold runs the real recipe (`train.fit_run`: the head path refits on the
fold's train+validation, end-to-end paths early-stop on its validation rows) and is scored on rows
it never saw. Fine-tuning is switched off: with cached backbone features a fold takes seconds;
end-to-end models (base_cnn) work too, just slower.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from food_classifier.training import runs
from food_classifier.training.data import Row, read_manifest, write_manifest
from food_classifier.training.duplicates import UnionFind

if TYPE_CHECKING:
    from food_classifier.training.train import Fitted


def row_groups(rows: list[Row], manifest: str | Path | None = None) -> np.ndarray:
    """A group id per row: identical files share one, and so do the near-duplicate groups that
    `data split` recorded in `<manifest stem>.report.json` (if present)."""
    uf = UnionFind(len(rows))
    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        uf.union(first.setdefault(r.sha256, i), i)
    report = Path(manifest).with_name(Path(manifest).stem + ".report.json") if manifest else None
    if report and report.is_file():
        index = {str(Path(r.path).resolve()): i for i, r in enumerate(rows)}
        for g in json.loads(report.read_text()).get("duplicate_groups", []):
            members = [index[p] for p in (str(Path(p).resolve()) for p in g["paths"]) if p in index]
            for m in members[1:]:
                uf.union(members[0], m)
    return np.array([uf.find(i) for i in range(len(rows))])


def make_folds(labels: np.ndarray, groups: np.ndarray, k: int, val_fraction: float, seed: int = 42,
               repeats: int = 1) -> list[dict[str, np.ndarray]]:
    """Index sets {train, validation, held_out} per fold; held-out sets of one repeat partition the rows."""
    from sklearn.model_selection import StratifiedGroupKFold

    if k < 2:
        raise ValueError(f"--cv needs K >= 2 folds, got {k}")
    folds = []
    for r in range(repeats):
        outer = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + r)
        for rest, held in outer.split(np.zeros(len(labels)), labels, groups):
            inner_k = max(2, round(1 / max(val_fraction, 1e-6)))
            inner = StratifiedGroupKFold(n_splits=inner_k, shuffle=True, random_state=seed + r)
            tr, va = next(inner.split(np.zeros(len(rest)), labels[rest], groups[rest]))
            folds.append({"train": rest[tr], "validation": rest[va], "held_out": held})
    return folds


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1: the folds are a sample of possible splits)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def fold_logits(fitted: Fitted, rows: list[Row]) -> np.ndarray:
    """Logits of a fold's trained model on `rows`: cached eval features + head for pretrained
    backbones (no image decoding), a plain forward pass otherwise."""
    import torch

    from food_classifier.preprocessing import preprocess
    from food_classifier.training.head import extract_features
    from food_classifier.training.models import is_pretrained

    model, config, spec = fitted.model.eval(), fitted.meta.config, fitted.meta.preprocessing
    with torch.inference_mode():
        # cached features are the frozen backbones': a tuned model (fine_tune, quality best) runs whole
        if is_pretrained(config.arch, config.weights) and not config.fine_tune and config.quality != "best":
            feats = extract_features(rows, model, config, spec)[:, 0]
            return model.classifier(torch.from_numpy(feats)).numpy()
        out = [model(torch.from_numpy(np.stack([preprocess(r.path, spec) for r in rows[s:s + 32]]))).numpy()
               for s in range(0, len(rows), 32)]
    return np.concatenate(out)


def cross_validate(manifest: str | Path, config, k: int = 5, repeats: int = 1, seed: int | None = None,
                   out_dir: str | Path | None = None) -> dict:
    """Train the recipe on K folds of train+validation and score each on its held-out fold.

    Returns (and with `out_dir` writes `cv.json`): per-fold accuracy / macro-F1 and their mean +- std.
    """
    import torch
    from sklearn.metrics import f1_score

    from food_classifier.training.models import is_pretrained
    from food_classifier.training.train import fit_run

    t0 = time.time()
    rows = [r for r in read_manifest(manifest) if r.tier in ("train", "validation")]
    label_names = sorted({r.label for r in rows})
    y = np.array([label_names.index(r.label) for r in rows])
    n_val = sum(r.tier == "validation" for r in rows)
    seed = config.seed if seed is None else seed
    folds = make_folds(y, row_groups(rows, manifest), k, n_val / len(rows), seed=seed, repeats=repeats)
    # one thread for a linear head: 4x faster than all cores on a shared 2-core box, same numbers
    head_only = is_pretrained(config.arch, config.weights)
    fold_config = replace(config, fine_tune=False, threads=1 if head_only else config.threads)
    threads = torch.get_num_threads()  # fit() sets the process-wide count; restored below
    results = []
    with tempfile.TemporaryDirectory(prefix="food-cv-") as tmp:
        for i, f in enumerate(folds):
            tf = time.time()
            fold_rows = [replace(rows[j], tier=tier) for tier, key in
                         (("train", "train"), ("validation", "validation"), ("test", "held_out")) for j in f[key]]
            fold_manifest = Path(tmp) / f"fold{i}.csv"
            write_manifest(fold_rows, fold_manifest)
            fitted = fit_run(fold_manifest, fold_config, runs_dir=Path(tmp) / f"fold{i}")
            held = [rows[j] for j in f["held_out"]]
            pred = fold_logits(fitted, held).argmax(1)
            yt = y[f["held_out"]]
            results.append({"fold": i, "repeat": i // k, "n_train": len(f["train"]),
                            "n_validation": len(f["validation"]), "n_held_out": len(held),
                            "accuracy": float((pred == yt).mean()),
                            "macro_f1": float(f1_score(yt, pred, average="macro", labels=range(len(label_names)),
                                                       zero_division=0)),
                            "seconds": round(time.time() - tf, 1)})
            print(f"cv fold {i + 1}/{len(folds)}: accuracy {results[-1]['accuracy']:.4f} "
                  f"macro-F1 {results[-1]['macro_f1']:.4f} on {len(held)} held-out images")
    torch.set_num_threads(threads)
    out = {"k": k, "repeats": repeats, "seed": seed, "manifest": str(Path(manifest).resolve()),
           "rows": "train+validation tiers (test tier untouched)", "n_rows": len(rows),
           "config": asdict(fold_config),
           "accuracy": mean_std([r["accuracy"] for r in results]),
           "macro_f1": mean_std([r["macro_f1"] for r in results]),
           "folds": results, "seconds": round(time.time() - t0, 1)}
    if out_dir:
        runs.write_json(Path(out_dir), runs.CV, out)
    return out


def format_cv(cv: dict) -> str:
    """One line per metric for the CLI."""
    n = len(cv["folds"])
    held = round(np.mean([f["n_held_out"] for f in cv["folds"]]))
    rep = f" x{cv['repeats']} repeats" if cv["repeats"] > 1 else ""
    lines = [f"{cv['k']}-fold cross-validation{rep} over {cv['n_rows']} train+validation images "
             f"(test tier untouched), ~{held} held out per fold, {cv['seconds']:.0f} s:"]
    for key, name in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        s = cv[key]
        lines.append(f"  {name:<9} {s['mean']:.4f} ± {s['std']:.4f}  (std over {n} folds; min {s['min']:.4f}, "
                     f"max {s['max']:.4f})")
    return "\n".join(lines)
