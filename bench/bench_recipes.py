"""Which training recipe wins on small data on this CPU? Each recipe runs the real pipeline
(fit -> export -> calibrate -> evaluate) on the same split, with a cold feature cache of its own.

    python bench/bench_recipes.py [--data DIR] [--slow]     # --slow adds base_cnn and --fine-tune

Prints a markdown table: test accuracy with its Wilson 95% interval, macro F1, ECE, wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "food101_mini3"

RECIPES: dict[str, dict] = {
    "Lite0 224 px, head on clean features": {"image_size": 224, "aug_views": 0},
    "Lite0 224 px, head + 4 augmented views": {"image_size": 224},
    "Lite0 288 px, head on clean features": {"aug_views": 0},
    "Lite0 288 px, head + 4 augmented views (default)": {},
    "Lite0 288 px, default without label smoothing": {"label_smoothing": 0.0},
    "Lite0 288 px, head + 8 augmented views": {"aug_views": 8},
    "Lite0 320 px, head + 4 augmented views": {"image_size": 320},
}
SLOW = {
    "base_cnn 128 px from scratch (30 epochs max)": {"arch": "base_cnn"},
    "Lite0 288 px, default + --fine-tune last 2 stages (6 epochs)": {"fine_tune": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--slow", action="store_true")
    ap.add_argument("--only", help="run only recipes whose name contains this text")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from food_classifier.training.data import split
        from food_classifier.training.pipeline import train_and_publish
        from food_classifier.training.train import TrainConfig

        split(args.data, tmp / "manifest.csv", progress=False)
        recipes = {**RECIPES, **(SLOW if args.slow else {})}
        lines = []
        for i, (name, overrides) in enumerate(recipes.items()):
            if args.only and args.only not in name:
                continue
            os.environ["FOOD_CLASSIFIER_CACHE"] = str(tmp / f"cache{i}")  # cold: every recipe pays its features
            t0 = time.perf_counter()
            _, _, metrics = train_and_publish(tmp / "manifest.csv", TrainConfig(**overrides), runs_dir=tmp / "runs",
                                              models_dir=None, int8=False)
            secs = time.perf_counter() - t0
            m = metrics["tiers"]["test"]
            lo, hi = m["accuracy_ci95"]
            lines.append(f"| {name} | {m['accuracy']:.4f} [{lo:.3f}, {hi:.3f}] | {m['macro_f1']:.4f} "
                         f"| {m.get('ece', float('nan')):.3f} | {secs:.0f} s |")
            print(lines[-1], file=sys.stderr, flush=True)
    print(f"\nrecipes on {args.data.name}, test tier (n={m['n']}), {os.cpu_count()} cores, cold feature cache\n")
    print("| recipe | test accuracy [95% CI] | macro F1 | ECE (calibrated) | train+export+eval |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
