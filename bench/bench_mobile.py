"""What a phone gets from each export-mobile folder: size, CPU per image, accuracy.

Phone apps classify one photo at a time on one core, so every `.ort` file runs at batch 1 with one
ONNX Runtime thread, all files interleaved round-robin in this one process (load from other
processes falls on all alike); the CPU time of each run is measured (process_time), not only wall
time. Ratios are against the first folder's fp32 model. Accuracy is the bundle's test-tier number
recorded in mobile.json. A desktop x86 core is not a phone core: trust the ratios, not the ms.
`--bundle` adds bundles' own .onnx files (what a server runs) for comparison: the .ort files are
optimised for ARM, without ONNX Runtime's x86-only NCHWc kernels.

    food-classifier export-mobile models/lite0 --out mobile-lite0
    food-classifier export-mobile models/food --out mobile-food
    python bench/bench_mobile.py mobile-lite0 mobile-food --bundle models/lite0 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_int8 import cpu_name  # noqa: E402

from food_classifier import runtime  # noqa: E402
from food_classifier.bundle import load_newest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", type=Path, nargs="+", help="Folders written by `food-classifier export-mobile`.")
    ap.add_argument("--bundle", type=Path, action="append", default=[], help="Also time this bundle's .onnx files.")
    ap.add_argument("--seconds", type=float, default=20.0, help="Timing budget over all models.")
    args = ap.parse_args()

    models = []  # (name, session, input, mobile.json entry)
    for folder in args.folders:
        info = json.loads((folder / "mobile.json").read_text())
        pre = json.loads((folder / "preprocessing.json").read_text())
        x = np.random.default_rng(0).standard_normal((1, *pre["input"]["shape"][1:])).astype(np.float32)
        for variant, entry in info["variants"].items():
            sess = runtime.create_session(folder / entry["file"], threads=1)
            runtime.run(sess, x)  # warm-up
            models.append((f"{info['bundle']['arch']} {variant}", sess, x, entry))
    for path in args.bundle:
        b = load_newest(path)
        x = np.random.default_rng(0).standard_normal((1, *b.preprocessing.input_shape)).astype(np.float32)
        for variant in b.variants:
            sess = runtime.create_session(b.model_file(variant), threads=1)
            runtime.run(sess, x)
            test = b.meta.metrics.get("test")
            entry = {"size_bytes": b.model_file(variant).stat().st_size,
                     "test_accuracy": b.variants[variant].test_accuracy or (test.accuracy if test else None)}
            models.append((f"{b.meta.arch} {variant} (x86 .onnx)", sess, x, entry))
    cpu: dict[str, list[float]] = {m[0]: [] for m in models}
    wall: dict[str, list[float]] = {m[0]: [] for m in models}
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline or min(map(len, cpu.values())) < 5:
        for name, sess, x, _ in models:
            c, w = time.process_time(), time.perf_counter()
            runtime.run(sess, x)
            cpu[name].append(1000 * (time.process_time() - c))
            wall[name].append(1000 * (time.perf_counter() - w))
    base = statistics.median(cpu[models[0][0]])
    print(f"CPU: {cpu_name()}; batch 1, 1 ONNX Runtime thread, {min(map(len, cpu.values()))}+ interleaved runs each")
    print(f"| model | MB | CPU ms/image (median) | wall ms/image | CPU vs {models[0][0]} | test accuracy |")
    print("|---|---|---|---|---|---|")
    for name, _, _, entry in models:
        c = statistics.median(cpu[name])
        acc = entry.get("test_accuracy")
        print(f"| {name} | {entry['size_bytes'] / 1e6:.1f} | {c:.1f} | {statistics.median(wall[name]):.1f} | "
              f"{c / base:.2f}x | {'-' if acc is None else f'{acc:.1%}'} |")


if __name__ == "__main__":
    main()
