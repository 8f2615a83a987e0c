"""Does the labelling queue pay? Labels chosen by the product's queue vs at random, on food101_ten.

    python bench/bench_active.py [--data DIR] [--seeds 5] [--rounds 16] [--out FILE] [--plot FILE] [--cold]

The split is bench_quality.py's (per class: 100 photos of "traffic", 50 fixed test photos, seeded). Each
seed starts from 20 labelled photos per class drawn at random from the traffic; the rest is unlabelled.
Each round adds 50 labels (oracle: the folder names), chosen by

- queue:  `labeling.queue.order` on the current model's answers, the order the `label` page shows:
          informativeness (1 - top-2 margin), near-duplicates (dHash) collapsed, predicted classes in turn;
- margin: the 50 smallest top-2 margins, nothing else (what the queue's extras add over plain uncertainty);
- random: 50 photos drawn uniformly;

then retrains the default recipe's heads (frozen Lite0+Lite1 288 px features, the same views, L2 and L-BFGS
solver as `train`, `head.solve_head`) and scores the 500 test photos. A retrain reuses every cached feature:
only the head is fitted again (its seconds are reported; a `train --data` on the grown folder adds the
extraction of the new photos, ~40 ms each here). The no-human row, self-training: from each random labelled
set, confident pseudo-labels on the unlabelled traffic (`training.self_train`, what `train --unlabeled` runs)
and the heads refitted on both. Results go to --out (JSON), the table to stdout, the curves to --plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_quality import DATA, write_split  # noqa: E402  (the same fixed split)

START, STEP = 20, 50  # labelled photos per class at the start; labels added per round
STRATEGIES = ("queue", "margin", "random")


def features(data: Path, work: Path) -> dict:
    """Every photo's cached features [N, views, D] of the default recipe, with labels and tiers."""
    import torch

    from food_classifier.training.config import TrainConfig
    from food_classifier.training.data import read_manifest
    from food_classifier.training.head import extract_features
    from food_classifier.training.models import create_model, default_preprocessing

    manifest = work / "split.csv"
    write_split(data, manifest)
    rows = read_manifest(manifest)
    labels = sorted({r.label for r in rows})
    config = TrainConfig()
    model = create_model(config.arch, num_classes=len(labels))
    t0 = time.perf_counter()
    x = extract_features(rows, model, config, default_preprocessing(config.arch), views=1 + config.aug_views,
                         aug_strength=config.aug_strength, seed=config.seed)
    seconds = time.perf_counter() - t0
    return {"rows": rows, "labels": labels, "config": config, "template": model.classifier,
            "x": torch.from_numpy(x), "y": torch.tensor([labels.index(r.label) for r in rows]),
            "test": np.array([r.tier == "test" for r in rows]), "extract_seconds": seconds}


def dhashes(rows: list) -> list[int]:
    from food_classifier.preprocessing import open_image
    from food_classifier.training.duplicates import dhash

    return [dhash(open_image(r.path)) for r in rows]


def choose(strategy: str, probs: np.ndarray, pool: np.ndarray, d: dict, hashes: list[int],
           rng: np.random.Generator, n: int) -> np.ndarray:
    """Indices (into the rows) of the next `n` photos to label, from the unlabelled `pool`."""
    from food_classifier.labeling.queue import Item, order
    from food_classifier.monitoring.keep import margin_score

    if strategy == "random":
        return rng.choice(pool, size=min(n, len(pool)), replace=False)
    scores = np.array([margin_score(p, float(p.max())) for p in probs])
    if strategy == "margin":
        return pool[np.argsort(-scores, kind="stable")[:n]]
    labels, rows = d["labels"], d["rows"]
    items = [Item(rows[i].sha256, rows[i].path, float(s), labels[int(p.argmax())],
                  [(labels[int(k)], float(p[k])) for k in np.argsort(-p)[:3]], {})
             for i, p, s in zip(pool, probs, scores, strict=True)]
    by_sha = {rows[i].sha256: i for i in pool}
    ranked = order(items, hashes=[hashes[i] for i in pool])
    return np.array([by_sha[it.sha256] for it in ranked[:n]])


def fit_score(d: dict, labelled: np.ndarray, extra: tuple | None = None):
    """Heads fitted on the labelled photos (plus pseudo-labelled ones); (test accuracy, seconds, model)."""
    import torch

    from food_classifier.training.head import solve_head

    x, y = d["x"][labelled], d["y"][labelled]
    if extra is not None:
        x, y = torch.cat([x, extra[0]]), torch.cat([y, extra[1]])
    t0 = time.perf_counter()
    head = solve_head(d["template"], x, y, d["config"])
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        pred = head(d["x"][d["test"], 0]).argmax(1)
    return float((pred == d["y"][d["test"]]).float().mean()), seconds, head


def probabilities(head, x) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.softmax(head(x[:, 0]), 1).numpy()


def run_seed(d: dict, hashes: list[int], seed: int, rounds: int) -> dict:
    from food_classifier.training.self_train import pseudo_label

    rng0 = np.random.default_rng(seed)
    y = d["y"].numpy()
    traffic = np.flatnonzero(~d["test"])
    start = np.concatenate([rng0.choice(traffic[y[traffic] == c], START, replace=False)
                            for c in range(len(d["labels"]))])
    out: dict = {}
    for strategy in STRATEGIES:
        rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
        labelled, curve = start.copy(), []
        for r in range(rounds + 1):
            acc, seconds, head = fit_score(d, labelled)
            point = {"labels": len(labelled), "acc": acc, "fit_seconds": round(seconds, 2)}
            pool = np.setdiff1d(traffic, labelled)
            probs = probabilities(head, d["x"][pool]) if len(pool) else None  # the current model's answers
            if strategy == "random" and len(pool):  # the no-human row, from the same labelled set
                idx, pseudo = pseudo_label(probs, y[labelled], len(d["labels"]))
                extra = (d["x"][pool[idx]], d["y"].new_tensor(pseudo))
                point |= {"self_train_acc": fit_score(d, labelled, extra)[0], "pseudo": len(idx),
                          "pseudo_right": float((pseudo == y[pool[idx]]).mean()) if len(idx) else None}
            curve.append(point)
            print(f"seed {seed} {strategy:>6} {len(labelled):5d} labels: {acc:.4f}"
                  + (f"  self-trained {point['self_train_acc']:.4f} (+{point['pseudo']} pseudo, "
                     f"{point['pseudo_right']:.1%} right)" if "self_train_acc" in point else ""), flush=True)
            if r == rounds or not len(pool):
                break
            labelled = np.concatenate([labelled, choose(strategy, probs, pool, d, hashes, rng, STEP)])
        out[strategy] = curve
    return out


def summarize(results: dict) -> tuple[dict, str]:
    """Mean ± std accuracy per label count and strategy; the labels the queue needs for random's last point."""
    seeds = list(results["seeds"].values())
    table: dict = {}
    for s in (*STRATEGIES, "self_train"):
        key, src = ("self_train_acc", "random") if s == "self_train" else ("acc", s)
        by_n: dict[int, list] = {}
        for run in seeds:
            for p in run[src]:
                if key in p:
                    by_n.setdefault(p["labels"], []).append(p[key])
        table[s] = {n: (float(np.mean(v)), float(np.std(v))) for n, v in sorted(by_n.items())}
    lines = ["| labels | " + " | ".join(f"{s} (mean ± std)" for s in table) + " |",
             "|---|" + "---|" * len(table)]
    for n in table["random"]:
        lines.append(f"| {n} | " + " | ".join(
            f"{100 * table[s][n][0]:.1f} ± {100 * table[s][n][1]:.1f}" if n in table[s] else "-" for s in table)
            + " |")
    return table, "\n".join(lines)


def reach(table: dict, budget: int) -> str:
    """How many labels each strategy needs to match random's mean accuracy at `budget` labels."""
    target = table["random"][budget][0]
    start = min(table["random"])
    out = [f"random at {budget} labels ({budget - start} chosen): {100 * target:.1f} %"]
    for s in ("queue", "margin"):
        hit = next((n for n, (m, _) in table[s].items() if m >= target), None)
        out.append(f"{s}: " + (f"reaches it with {hit} labels ({hit - start} chosen: "
                               f"{100 * (hit - start) / (budget - start):.0f} % of the chosen labels, "
                               f"{100 * hit / budget:.0f} % of all)" if hit else "does not reach it"))
    return "\n".join(out)


def plot(table: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s, style in zip((*STRATEGIES, "self_train"), ("-o", "-s", "-^", "--"), strict=True):
        n = np.array(list(table[s]))
        m, sd = (np.array([table[s][k][i] for k in table[s]]) * 100 for i in (0, 1))
        name = "random + self-training (no extra human)" if s == "self_train" else s
        ax.plot(n, m, style, ms=3, label=name)
        ax.fill_between(n, m - sd, m + sd, alpha=0.15)
    ax.set(xlabel="labelled photos", ylabel="test top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=16, help="rounds of 50 labels (16 = every traffic photo)")
    ap.add_argument("--budget", type=int, default=700, help="labels at which random's accuracy is the target")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "active.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "active_learning.png")
    ap.add_argument("--cold", action="store_true", help="a fresh feature cache (extraction time of a cold train)")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no photos at {args.data}: pass --data (an ImageFolder, e.g. ../shared/datasets/food101_ten)")
    with tempfile.TemporaryDirectory(prefix="bench-active-") as tmp:
        if args.cold:
            os.environ["FOOD_CLASSIFIER_CACHE"] = str(Path(tmp) / "cache")
        d = features(args.data, Path(tmp))
        print(f"features of {len(d['rows'])} photos: {d['extract_seconds']:.1f} s", flush=True)
        traffic = [r for r, t in zip(d["rows"], d["test"], strict=True) if not t]
        hashes = [0] * len(d["rows"])
        for i, h in zip(np.flatnonzero(~d["test"]), dhashes(traffic), strict=True):
            hashes[i] = h
        results = {"data": str(args.data), "extract_seconds": d["extract_seconds"], "photos": len(d["rows"]),
                   "cpu_count": os.cpu_count(), "seeds": {}}
        for seed in range(args.seeds):
            results["seeds"][str(seed)] = run_seed(d, hashes, seed, args.rounds)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results))
    table, text = summarize(results)
    fits = [p["fit_seconds"] for run in results["seeds"].values() for c in run.values() for p in c]
    print(f"\n{args.data.name}: {args.seeds} seeds, start {START}/class, +{STEP} per round, "
          f"{int((~d['test']).sum())} traffic / {int(d['test'].sum())} test photos\n{text}\n"
          f"retrain (heads only, features cached): median {np.median(fits):.1f} s, max {max(fits):.1f} s\n"
          + reach(table, args.budget))
    plot(table, args.plot, f"{args.data.name}: labels chosen by the queue vs at random ({args.seeds} seeds)")
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
