"""The cascade against today's default, in one run: CPU per image from bytes to answer, accuracy, stage mix.

Every mode is the real prediction core (`Classifier.predict_batch`: decode in a thread pool, ONNX
Runtime in batches, decide) on the same photos of a trained bundle's test tier (or all shared photos):

  * plain fp32   - the whole ensemble graph (`model.onnx`): today's default, the baseline of the ratios
  * plain int8   - its int8 variant, when the bundle has one
  * cascade      - stage 1 for every photo, later stages only below each stage's threshold (served default)
  * stage mixes  - the same cascade with the first threshold forced to 0 (stage 1 answers all) and to 1
                   (every photo escalates), and at a few thresholds between, to show the trade-off.

CPU is process CPU time (all threads) per image; ORT runs on `--threads` threads (1 = the cost of one
core, the figure that scales with cores). Prints `lscpu`'s AVX flags: int8 gains depend on them.

    python bench/bench_cascade.py --bundle models/food --manifest data/manifest.csv
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from food_classifier.bundle import CASCADE, Bundle, BundleMeta, load_newest  # noqa: E402
from food_classifier.inference import Classifier  # noqa: E402


def photos(manifest: Path | None, images: Path, tier: str) -> list[tuple[bytes, str]]:
    if manifest:
        import csv

        with manifest.open() as f:
            rows = [r for r in csv.DictReader(f) if r["tier"] == tier]
        return [(Path(r["path"]).read_bytes(), r["label"]) for r in rows]
    return [(p.read_bytes(), p.parent.name) for p in sorted(images.glob("*/*.jpg"))]


def with_threshold(bundle: Bundle, threshold: float) -> Bundle:
    data = bundle.meta.to_json_dict()
    data["cascade"]["stages"][0]["threshold"] = threshold
    return Bundle(bundle.path, BundleMeta.model_validate(data))


def run_mode(name: str, clf: Classifier, data: list[tuple[bytes, str]], repeats: int) -> dict:
    images = [b for b, _ in data]
    clf.predict_batch(images[:32])  # warm-up: first-run allocations are not the steady cost
    best = None
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        preds = clf.predict_batch(images)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        best = cpu if best is None else min(best, cpu)
    correct = np.mean([p.top_k[0].label == lab for p, (_, lab) in zip(preds, data, strict=True)])
    stages = np.array([p.stage for p in preds])
    return {"mode": name, "cpu_ms_img": round(best / len(data) * 1000, 2), "img_s_wall": round(len(data) / wall, 1),
            "accuracy": round(float(correct), 4),
            "escalated": round(float((stages > 1).mean()), 4), "n": len(data)}


def cpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    flags = sorted({f for f in out.split() if f.startswith(("avx512", "avx2", "avx_vnni"))})
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    return f"{model}; {' '.join(flags) or 'no AVX2'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "models" / "food")
    ap.add_argument("--manifest", type=Path, help="use this manifest's --tier photos (default: all shared photos)")
    ap.add_argument("--tier", default="test")
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "datasets" / "food101_mini3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.5, 0.9, 0.97])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bundle = load_newest(args.bundle)
    if bundle.meta.cascade is None:
        sys.exit(f"{bundle.path} has no cascade: train an ensemble (the default) to get one")
    data = photos(args.manifest, args.images, args.tier)
    print(f"bundle {bundle.name}:{bundle.version}, {len(data)} photos, ORT threads {args.threads}")
    print(f"CPU: {cpu_flags()}")
    modes = [("plain fp32 (today's default)", bundle, "fp32")]
    if "int8" in bundle.variants:
        modes.append(("plain int8", bundle, "int8"))
    chosen = bundle.meta.cascade.stages[0].threshold
    modes.append((f"cascade (threshold {chosen:.3f}, served)", bundle, CASCADE))
    for t in [0.0, *args.thresholds, 1.01]:
        label = "stage 1 only" if t == 0 else ("every photo escalates" if t > 1 else f"threshold {t}")
        modes.append((f"cascade, {label}", with_threshold(bundle, t), CASCADE))
    rows = []
    for name, b, variant in modes:
        rows.append(run_mode(name, Classifier(b, threads=args.threads, variant=variant), data, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["cpu_ms_img"]
    print("\n| mode | CPU ms/img | vs plain fp32 | accuracy | escalated | img/s (wall) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['cpu_ms_img']} | {base / r['cpu_ms_img']:.2f}x | {r['accuracy']:.4f} "
              f"| {100 * r['escalated']:.1f} % | {r['img_s_wall']} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_flags(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
