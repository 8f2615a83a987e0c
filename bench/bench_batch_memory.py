"""predict-dir's memory: peak RSS of the local engine on 1,000 vs 10,000 photos, this checkout vs another.

The photos are the shared Food-101 ones made distinct: photo i is shared photo i mod 1,123 with a JPEG
comment "copy i" inserted after the SOI marker (other bytes, so another sha256: every one is scored, none
copied; the same pixels, so the work per image is the real one). They sit in class folders, so the
accuracy table is built too. Each run is `predict-dir --engine local` as a fresh process, Parquet out,
default batch size; its peak RSS is the kernel's (ru_maxrss of the child, from wait4), and RSS is also
sampled every 0.2 s to show when the peak came.

    python bench/bench_batch_memory.py [--bundle DIR] [--sizes 1000,10000] [--baseline /work/main]

`--baseline DIR` also runs the same sizes with DIR's food_classifier (e.g. the main branch), in the same
run, for a before/after ratio.
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_cache import DATA, cpu_flags  # noqa: E402


def distinct_copies(n: int, root: Path) -> Path:
    """`n` photos in class folders: the shared ones, each copy with its own JPEG comment."""
    photos = sorted(DATA.rglob("*.jpg"))
    for i in range(n):
        src = photos[i % len(photos)]
        data = src.read_bytes()
        text = f"copy {i}".encode()
        out = root / src.parent.name / f"{i:05d}_{src.name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + data[2:])
    return root


def run(code: Path, source: Path, bundle: str, out: Path, batch_size: int | None) -> dict:
    cmd = [sys.executable, "-m", "food_classifier.cli", "predict-dir", str(source), "--model", bundle,
           "--out", str(out)] + (["--batch-size", str(batch_size)] if batch_size else [])
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env={**os.environ, "PYTHONPATH": str(code)},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples: list[tuple[float, float]] = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            rss = next(int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:")) / 1024
            samples.append((time.perf_counter() - start, rss))
        except (OSError, StopIteration):
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - start
    summary = proc.stdout.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{summary}")
    half = max((r for t, r in samples if t < wall / 2), default=0.0)
    return {"peak": usage.ru_maxrss / 1024, "peak_first_half": half, "wall": wall,
            "cpu": usage.ru_utime + usage.ru_stime}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="Bundle or model dir (default: the built-in model).")
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--baseline", type=Path, help="Another checkout whose food_classifier to run the same way.")
    ap.add_argument("--baseline-sizes", help="Sizes to run the baseline on (default: all of --sizes).")
    ap.add_argument("--batch-size", type=int, help="Default: predict-dir's own.")
    args = ap.parse_args()
    bundle = args.bundle or subprocess.run([sys.executable, "-m", "food_classifier.cli", "builtin"], cwd=ROOT,
                                           capture_output=True, text=True, check=True).stdout.strip()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"CPU: {cpu_flags()}, {len(os.sched_getaffinity(0))} usable cores; load average "
          f"{os.getloadavg()[0]:.1f}\nbundle: {bundle}\n")
    print("| code | photos | peak RSS MiB | peak in the first half MiB | wall s | img/s | CPU ms/img |\n"
          "|---|---|---|---|---|---|---|")
    codes = [("this checkout", ROOT)] + ([("baseline " + str(args.baseline), args.baseline)] if args.baseline else [])
    peaks: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        for n in sizes:
            source = distinct_copies(n, Path(tmp) / f"photos{n}")
            for name, code in codes:
                if code != ROOT and args.baseline_sizes and str(n) not in args.baseline_sizes.split(","):
                    continue
                r = run(code, source, bundle, Path(tmp) / f"out-{n}-{len(peaks.get(name, {}))}-{name[:4]}.parquet",
                        args.batch_size)
                peaks.setdefault(name, {})[n] = r["peak"]
                print(f"| {name} | {n} | {r['peak']:.0f} | {r['peak_first_half']:.0f} | {r['wall']:.0f} | "
                      f"{n / r['wall']:.1f} | {1000 * r['cpu'] / n:.1f} |", flush=True)
    for name, by_size in peaks.items():
        if len(by_size) > 1:
            lo, hi = min(by_size), max(by_size)
            print(f"{name}: peak RSS at {hi} photos / at {lo} = {by_size[hi] / by_size[lo]:.2f}")
    if args.baseline:
        base = peaks.get("baseline " + str(args.baseline), {})
        for n in sizes:
            if n in base:
                print(f"{n} photos: this checkout's peak / baseline's = {peaks['this checkout'][n] / base[n]:.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
