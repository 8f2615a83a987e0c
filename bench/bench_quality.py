"""Quality on ten classes: which recipe wins on food101_ten, measured row by row.

    python bench/bench_quality.py [--data DIR] [--rows fast,best0] [--out FILE] [--shared-cache]

The split is fixed and seeded: per class (sorted file names, shuffled with SEED) 100 photos for
training (85 train + 15 validation) and 50 for test, so 500 test photos on food101_ten. Each row
fits with the real trainer (`fit_run`, the same code `train --quality ...` runs) in a run dir and,
unless --shared-cache, a cold feature cache of its own (so its train time is a cold `train`), exports
the fitted model to ONNX and scores validation + test with ONNX Runtime (the serving runtime):

- test top-1 with its 95 % Wilson interval;
- ECE on test after temperature scaling (15 bins; T fitted on the held-out logits the trainer
  calibrates on: out-of-fold for a head refitted on train+validation, else validation);
- coverage on test at the stated threshold rule: the lowest confidence threshold whose held-out
  predictions (after T) are >= 95 % right; with the accuracy on the answered photos;
- cold train wall time (fit only) and serving ms per image (ONNX Runtime, batch 1, model only,
  threads = all cores).

A `combine` row averages the logits of rows already measured (what an `Ensemble` of those members
computes): its train time and serving time are the sums of theirs. Results accumulate in --out (JSON,
one entry per row, written after each row), so rows can be run in pieces; the markdown table of
every row in the file is printed at the end. Cross-validation is not run here (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets" / "food101_ten"
SEED, TRAIN, VAL, TEST = 0, 85, 15, 50
TARGET = 0.95  # the threshold rule's validation precision
L0, L1, L2 = "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"

ROWS: dict[str, dict] = {
    "fast": {"desc": "frozen Lite0+Lite1 288 px, linear heads (today's default)", "config": {}},
    "fast3": {"desc": "frozen Lite0+Lite1+Lite2 288 px, linear heads", "config": {"arch": f"{L0}+{L1}+{L2}"}},
    "best0": {"desc": "Lite0 288 px, last stage + head conv tuned on cached trunk activations",
              "config": {"arch": L0, "quality": "best", "fine_tune_blocks": 1}},
    "best0s2": {"desc": "Lite0 288 px, last 2 stages tuned on cached trunk activations",
                "config": {"arch": L0, "quality": "best", "fine_tune_blocks": 2}},
    "best1": {"desc": "Lite1 288 px, last stage + head conv tuned on cached trunk activations",
              "config": {"arch": L1, "quality": "best", "fine_tune_blocks": 1}},
    "best2": {"desc": "Lite2 288 px, last stage + head conv tuned on cached trunk activations",
              "config": {"arch": L2, "quality": "best", "fine_tune_blocks": 1}},
    "best1s2": {"desc": "Lite1 288 px, last 2 stages tuned on cached trunk activations",
                "config": {"arch": L1, "quality": "best", "fine_tune_blocks": 2}},
    "best2s2": {"desc": "Lite2 288 px, last 2 stages tuned on cached trunk activations",
                "config": {"arch": L2, "quality": "best", "fine_tune_blocks": 2}},
    "best01": {"desc": "tuned Lite0 + tuned Lite1 (last stage each), logits averaged",
               "combine": ["best0", "best1"]},
    "best01s2": {"desc": "tuned Lite0 + tuned Lite1 (last 2 stages each), logits averaged (= --quality best, "
                         "default arch)", "combine": ["best0s2", "best1s2"]},
    "best012": {"desc": "tuned Lite0 + Lite1 + Lite2 (last stage each), logits averaged",
                "combine": ["best0", "best1", "best2"]},
    "best012s2": {"desc": "tuned Lite0 + Lite1 + Lite2 (last 2 stages each), logits averaged (= --quality best "
                          "--arch efficientnet_lite0+efficientnet_lite1+efficientnet_lite2)",
                  "combine": ["best0s2", "best1s2", "best2s2"]},
    "fast+best0": {"desc": "the frozen Lite0+Lite1 ensemble's logits averaged with the tuned Lite0's (does the "
                           "tuned member add anything?)", "combine": ["fast", "best0"]},
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_split(data: Path, manifest: Path) -> None:
    from food_classifier.training.data import Row, write_manifest

    rows = []
    for d in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        random.Random(f"{SEED}:{d.name}").shuffle(files)
        if len(files) < TRAIN + VAL + TEST:
            sys.exit(f"{d} has {len(files)} photos; the split needs {TRAIN + VAL + TEST}")
        tiers = ["train"] * TRAIN + ["validation"] * VAL + ["test"] * TEST
        rows += [Row(f, d.name, t, sha256(f)) for f, t in zip(files, tiers, strict=False)]
    write_manifest(rows, manifest)


def onnx_scores(model, spec, rows, tmp: Path) -> tuple[np.ndarray, float]:
    """Logits of `rows` from the exported graph, and model-only ms/img at batch 1."""
    from food_classifier import runtime
    from food_classifier.training import features as F

    path = F.export_onnx(model, tmp / "model.onnx", spec.crop, "logits")
    sess = runtime.create_session(path)
    x = np.stack([F.load_view(r.path, spec, 0, None, None) for r in rows])
    logits = np.concatenate([runtime.run(sess, x[i:i + 32]) for i in range(0, len(x), 32)])
    for i in range(5):
        runtime.run(sess, x[i:i + 1])
    n = min(60, len(x))
    t0 = time.perf_counter()
    for i in range(n):
        runtime.run(sess, x[i:i + 1])
    return logits, 1000 * (time.perf_counter() - t0) / n


def measure(name: str, manifest: Path, shared_cache: bool) -> dict:
    from food_classifier.training.config import TrainConfig
    from food_classifier.training.data import read_manifest
    from food_classifier.training.train import fit_run

    row = ROWS[name]
    config = TrainConfig(**row["config"])
    rows = read_manifest(manifest)
    with tempfile.TemporaryDirectory(prefix=f"bq-{name}-") as tmp:
        if not shared_cache:
            os.environ["FOOD_CLASSIFIER_CACHE"] = str(Path(tmp) / "cache")
        t0 = time.monotonic()
        fitted = fit_run(manifest, config, runs_dir=Path(tmp) / "runs")
        seconds = time.monotonic() - t0
        held = [r for r in rows if r.tier in ("validation", "test")]
        logits, ms = onnx_scores(fitted.model, fitted.meta.preprocessing, held, Path(tmp))
    labels = fitted.meta.labels
    extra = {}
    if fitted.oof is not None:  # a head refitted on train+validation: T and threshold come from out-of-fold logits
        extra = {"oof_logits": np.round(fitted.oof.logits, 4).tolist(), "oof_y": fitted.oof.y.tolist()}
    return extra | {"desc": row["desc"], "config": row["config"], "train_seconds": round(seconds, 1),
            "serve_ms": round(ms, 2), "stopped": fitted.stopped, "labels": labels,
            "tier": [r.tier for r in held], "y": [labels.index(r.label) for r in held],
            "logits": np.round(logits, 4).tolist()}


def combine(name: str, results: dict) -> dict:
    parts = [results[p] for p in ROWS[name]["combine"]]
    missing = [p for p in ROWS[name]["combine"] if p not in results]
    if missing:
        sys.exit(f"row {name} averages {missing}: measure those first")
    logits = np.mean([np.array(p["logits"]) for p in parts], 0)
    return {"desc": ROWS[name]["desc"], "combine": ROWS[name]["combine"],
            "train_seconds": round(sum(p["train_seconds"] for p in parts), 1),
            "serve_ms": round(sum(p["serve_ms"] for p in parts), 2), "stopped": "",
            "labels": parts[0]["labels"], "tier": parts[0]["tier"], "y": parts[0]["y"],
            "logits": np.round(logits, 4).tolist()} | (
        {"fitted_on_validation": True} if any("oof_logits" in p or "fitted_on_validation" in p for p in parts) else {})


def softmax(z: np.ndarray) -> np.ndarray:
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def metrics(r: dict) -> dict:
    from food_classifier.training.calibrate import abstention_stats, choose_threshold, fit_temperature
    from food_classifier.training.metrics import expected_calibration_error, wilson_interval

    logits, y, tier = np.array(r["logits"]), np.array(r["y"]), np.array(r["tier"])
    val, test = tier == "validation", tier == "test"
    if "oof_logits" in r:  # the held-out logits the trainer itself calibrates on
        held, y_held = np.array(r["oof_logits"]), np.array(r["oof_y"])
    elif "fitted_on_validation" in r:  # measured before oof logits were kept: no held-out calibration set
        held = y_held = None
    else:
        held, y_held = logits[val], y[val]
    t = fit_temperature(held, y_held) if held is not None else 1.0
    p, p_held = softmax(logits / t), softmax(held / t) if held is not None else None
    correct = int((p[test].argmax(1) == y[test]).sum())
    lo, hi = wilson_interval(correct, int(test.sum()))
    ab = {"coverage": None, "accuracy_covered": None}
    if p_held is not None:
        thr, _ = choose_threshold(p_held, y_held, TARGET)
        ab = abstention_stats(p[test], y[test], thr)
    k = len(r["labels"])
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (y[test], p[test].argmax(1)), 1)
    ece = expected_calibration_error(p[test], y[test]) if p_held is not None else None
    return {"top1": correct / test.sum(), "ci": (lo, hi), "ece": ece,
            "T": t, "coverage": ab["coverage"], "acc_covered": ab["accuracy_covered"],
            "confusion": confusion.tolist()}


def table(results: dict) -> str:
    lines = ["| row | recipe | test top-1 (95 % CI) | ECE after T | coverage @ val-precision 0.95 "
             "(acc. answered) | cold train | serve ms/img |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        m = metrics(r)
        m_s, s_s = divmod(round(r["train_seconds"]), 60)
        acc = f"{100 * m['acc_covered']:.1f} %" if m["acc_covered"] is not None else "-"
        cov = f"{100 * m['coverage']:.0f} % ({acc})" if m["coverage"] is not None else "n/a"
        ece = f"{m['ece']:.3f}" if m["ece"] is not None else "n/a"
        lines.append(f"| {name} | {r['desc']}{' (' + r['stopped'] + ')' if r.get('stopped') else ''} | "
                     f"{100 * m['top1']:.1f} % ({100 * m['ci'][0]:.1f}–{100 * m['ci'][1]:.1f}) | {ece} | "
                     f"{cov} | {m_s} min {s_s:02d} s | {r['serve_ms']:.1f} |")
    return "\n".join(lines)


def confusions(r: dict, top: int = 8) -> str:
    m, labels = metrics(r), r["labels"]
    c = np.array(m["confusion"])
    pairs = sorted(((c[i, j], labels[i], labels[j]) for i in range(len(c)) for j in range(len(c)) if i != j),
                   reverse=True)[:top]
    per_class = ", ".join(f"{labels[i]} {c[i, i] / c[i].sum():.0%}" for i in range(len(c)))
    return (f"per-class test recall: {per_class}\nmost frequent confusions (true -> predicted): "
            + "; ".join(f"{a} -> {b} {n}" for n, a, b in pairs if n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--rows", default="", help=f"comma-separated, of: {', '.join(ROWS)} (default: none, "
                                                "just print the table of --out)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality_ten.json")
    ap.add_argument("--shared-cache", action="store_true", help="reuse the user's feature cache (not cold)")
    ap.add_argument("--confusions", default="", help="print per-class recall and confusions of this row")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    manifest = args.out.with_suffix(".split.csv")
    if not manifest.is_file():
        write_split(args.data, manifest)
    for name in filter(None, args.rows.split(",")):
        if name not in ROWS:
            sys.exit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
        print(f"== {name}: {ROWS[name]['desc']}", flush=True)
        results[name] = combine(name, results) if "combine" in ROWS[name] else \
            measure(name, manifest, args.shared_cache)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(args.out)
        print(table({name: results[name]}), flush=True)
    import subprocess

    cpu = subprocess.run("lscpu | grep -o 'avx512_vnni\\|avx2' | sort -u | tr '\\n' ' '", shell=True,
                         capture_output=True, text=True).stdout.strip()
    print(f"\n{args.data.name}, split {TRAIN}+{VAL}/{TEST} per class (seed {SEED}); CPU flags: {cpu}; "
          f"{os.cpu_count()} cores\n{table(results)}")
    if args.confusions:
        print(confusions(results[args.confusions]))


if __name__ == "__main__":
    main()
