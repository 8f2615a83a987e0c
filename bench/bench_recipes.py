"""Which training recipe wins on small data on this CPU? Each recipe runs the real pipeline
(fit -> export -> calibrate -> evaluate) on the same split with a cold feature cache of its own,
then repeated 5-fold cross-validation over train+validation (test tier untouched).

    python bench/bench_recipes.py [--data DIR] [--slow] [--only TEXT] [--repeats 2]

Why both: one test image is 0.6 points on a 168-image tier, so the test column alone cannot rank
recipes that are 1-2 points apart; the CV column (955 images x repeats) can, and it is what the
default was chosen on. Prints a markdown table.
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
L0, L1, L2 = "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"

RECIPES: dict[str, dict] = {
    "Lite0 288 px": {"arch": L0},
    "Lite1 288 px": {"arch": L1},
    "Lite2 288 px": {"arch": L2},
    "Lite0+Lite1 288 px, without label smoothing": {"label_smoothing": 0.0},
    "Lite0+Lite1 288 px, head fitted on train only (--no-refit)": {"refit": False},
    "Lite0+Lite1 288 px (default)": {},
    "Lite0+Lite2 288 px": {"arch": f"{L0}+{L2}"},
    "Lite0+Lite1+Lite2 288 px": {"arch": f"{L0}+{L1}+{L2}"},
}
SLOW = {
    "base_cnn 128 px from scratch (30 epochs max)": {"arch": "base_cnn"},
    "Lite0 288 px + --fine-tune last 2 stages (6 epochs)": {"arch": L0, "fine_tune": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--slow", action="store_true", help="add base_cnn and --fine-tune (tens of minutes)")
    ap.add_argument("--only", help="run only recipes whose name contains this text")
    ap.add_argument("--repeats", type=int, default=2, help="repeats of the 5-fold CV (0 = no CV)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from food_classifier.training.cv import cross_validate
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
            config = TrainConfig(**overrides)
            t0 = time.perf_counter()
            _, _, metrics = train_and_publish(tmp / "manifest.csv", config, runs_dir=tmp / "runs",
                                              models_dir=None, int8=False)
            secs = time.perf_counter() - t0
            m = metrics["tiers"]["test"]
            lo, hi = m["accuracy_ci95"]
            cv = "—"
            if args.repeats and config.arch != "base_cnn" and not config.fine_tune:
                s = cross_validate(tmp / "manifest.csv", config, k=5, repeats=args.repeats)["accuracy"]
                cv = f"{s['mean']:.4f} ± {s['std']:.4f}"
            lines.append(f"| {name} | {cv} | {m['accuracy']:.4f} [{lo:.3f}, {hi:.3f}] | {m['macro_f1']:.4f} "
                         f"| {m.get('ece', float('nan')):.3f} | {secs:.0f} s |")
            print(lines[-1], file=sys.stderr, flush=True)
    print(f"\nrecipes on {args.data.name}: test tier n={m['n']}; CV = 5-fold x{args.repeats} over train+validation "
          f"(mean ± std over folds); {os.cpu_count()} cores, cold feature cache, int8 step skipped\n")
    print("| recipe | CV accuracy | test accuracy [95% CI] | test macro F1 | test ECE (calibrated) "
          "| train+export+eval |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
