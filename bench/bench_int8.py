"""fp32 vs int8 of one bundle: img/s at batch 1 and 32 (2 threads), and accuracy on a test tier.

Both graphs run interleaved in this one process (fp32, int8, fp32, ...), so load from other
processes falls on both alike; the ratio is the number to trust when the machine is busy. If the
bundle has no int8 variant yet, one is made in a temporary copy with the same recipe as `train`.

    python bench/bench_int8.py --bundle models/food                 # manifest from bundle.json
    python bench/bench_int8.py --bundle runs/<run>/bundle --manifest data/manifest.csv --seconds 20
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from food_classifier.bundle import load_bundle, newest_bundle  # noqa: E402
from food_classifier.training.data import read_manifest  # noqa: E402
from food_classifier.training.quantize import (  # noqa: E402
    DEFAULT_METHOD,
    METHODS,
    add_int8_variant,
    evaluate_int8,
    measure_speed,
)


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    isa = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags] or (
        ["avx2"] if "avx2" in flags else [])
    return f"{name} ({', '.join(isa) or 'no avx2'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="Bundle dir or model dir (newest version).")
    ap.add_argument("--manifest", type=Path, help="Default: the manifest recorded in bundle.json.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=12.0, help="Timing budget (split over the batch sizes).")
    ap.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                    help="Used only when the bundle has no int8 variant (or with --requantize).")
    ap.add_argument("--requantize", action="store_true", help="Quantize again even if the bundle has int8.")
    args = ap.parse_args()

    bundle = load_bundle(newest_bundle(args.bundle))
    manifest = args.manifest or Path((bundle.meta.dataset and bundle.meta.dataset.manifest) or "")
    if not manifest.is_file():
        sys.exit(f"no manifest: pass --manifest (bundle.json names {str(manifest)!r})")
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        quant_note = "int8 from the bundle"
        if args.requantize or "int8" not in bundle.variants:
            copy = Path(tmp) / "bundle"
            shutil.copytree(bundle.path, copy, ignore=shutil.ignore_patterns("model.int8.onnx"))
            t = time.perf_counter()
            entry = add_int8_variant(copy, manifest, method=args.method, threads=args.threads, speed_seconds=0.5)
            quant_note = f"int8 made now by {entry['method']} in {time.perf_counter() - t:.1f} s " \
                         f"(quantization {entry['quantization']['quantize_seconds']:.1f} s)"
            bundle = load_bundle(copy)
        int8_file = bundle.model_file("int8")
        method = bundle.variants["int8"].method or "?"
        acc, sample = evaluate_int8(bundle, int8_file, read_manifest(manifest), threads=args.threads,
                                    tiers=("test", "validation"))
        load_before = os.getloadavg()[0]
        speed = measure_speed({"fp32": bundle.model_file("fp32"), "int8": int8_file}, sample,
                              threads=args.threads, seconds=args.seconds)
        load_after = os.getloadavg()[0]

    tier = "test" if "test" in acc else next(iter(acc))
    a = acc[tier]
    crop = bundle.preprocessing.crop
    f, q = speed["fp32"], speed["int8"]
    print(f"int8 vs fp32: {bundle.name}:{bundle.version} ({bundle.meta.arch}, {crop} px), "
          f"{args.threads} threads, {cpu_name()}, load avg {load_before:.1f}->{load_after:.1f}; {quant_note}")
    print()
    print(f"| variant | batch 1 img/s | batch 32 img/s | {tier} accuracy (n={a['n']}) |")
    print("|---|---:|---:|---:|")
    for name, m, acc_v in (("fp32", f, a["fp32_accuracy"]), (f"int8 ({method})", q, a["int8_accuracy"])):
        print(f"| {name} | {1000 / m[1]['median']:.0f} | {1000 / m[32]['median']:.0f} | {acc_v:.4f} |")
    print(f"| int8 / fp32 | x{f[1]['median'] / q[1]['median']:.2f} | x{f[32]['median'] / q[32]['median']:.2f} | "
          f"{100 * (a['int8_accuracy'] - a['fp32_accuracy']):+.2f} points, top-1 agreement "
          f"{100 * a['top1_agreement']:.1f}% |")
    print(f"\nimg/s from the median of {q[1]['runs']} / {q[32]['runs']} interleaved runs; best runs: "
          f"fp32 {1000 / f[1]['best']:.0f} / {1000 / f[32]['best']:.0f}, int8 {1000 / q[1]['best']:.0f} / "
          f"{1000 / q[32]['best']:.0f} img/s "
          f"(x{f[1]['best'] / q[1]['best']:.2f} / x{f[32]['best'] / q[32]['best']:.2f})")
    for t, m in acc.items():
        if t != tier:
            print(f"{t} tier (n={m['n']}): fp32 {m['fp32_accuracy']:.4f}, int8 {m['int8_accuracy']:.4f}, "
                  f"top-1 agreement {100 * m['top1_agreement']:.1f}%")


if __name__ == "__main__":
    main()
