"""predict-dir's engines vs a naive loop of `Classifier.predict`, one run: img/s, CPU per image, peak RSS.

Each contender runs as its own process (the CLI for the engines, exactly as a user runs them) over the
1,123 shared photos, then over eight copies of them (symlinks into class folders, 8,984 files):

- local: `predict-dir --engine local` (decode thread pool + ONNX Runtime batches of 64, Parquet out)
- ray:   `predict-dir --engine ray` on a local Ray it starts (one actor per CPU, same batches)
- naive: `for path in paths: Classifier(bundle).predict(path)` (one image per call, nothing written)

CPU seconds and peak RSS are of the whole process tree (for Ray: driver, GCS, raylet, workers), sampled
from /proc every 0.2 s. `img/s` is end to end (start-up included); `steady img/s` is between the first
and the last progress line (misleading for Ray, whose rows reach the driver in bursts). The two sizes
give each contender's rate once running and its fixed start-up (wall = start-up + images / rate).

    python bench/bench_batch.py [--bundle DIR] [--copies 8] [--only local,ray,naive]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_cache import DATA, cpu_flags  # noqa: E402

from food_classifier.testing import process_tree  # noqa: E402

NAIVE = """
import sys, time
from food_classifier.batch.job import read_source
from food_classifier.inference import Classifier
paths = read_source(sys.argv[1]).paths
clf = Classifier(sys.argv[2])
for i, p in enumerate(paths, 1):
    clf.predict(p)
    if i % max(1, len(paths) // 10) == 0 or i == len(paths):
        print(f"{i}/{len(paths)} images", file=sys.stderr, flush=True)
"""


def sample(pid: int, cpu: dict[int, float]) -> float:
    """Record each process's CPU seconds (its last value survives its exit); return the tree's RSS in MiB."""
    rss, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        cpu[p] = (int(fields[11]) + int(fields[12])) / tick
        rss += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0) / 1024
    return rss


def measure(cmd: list[str], images: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress: list[tuple[float, int]] = []
    tail: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            tail[:] = [*tail[-19:], line]
            m = re.match(r"(\d+)/\d+ images", line)
            if m:
                progress.append((time.perf_counter(), int(m.group(1))))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    cpu: dict[int, float] = {}
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, sample(proc.pid, cpu))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    reader.join(5)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{''.join(tail)}")
    (t0, n0), (t1, n1) = progress[0], progress[-1]
    return {"img_s": images / wall, "steady": (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan"),
            "cpu_ms": 1000 * sum(cpu.values()) / images, "rss": peak, "wall": wall, "load": os.getloadavg()[0]}


def copies(n: int, root: Path) -> Path:
    """`n` copies of the shared photos as symlinks, keeping the class folders."""
    for photo in sorted(DATA.rglob("*.jpg")):
        (root / photo.parent.name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            (root / photo.parent.name / f"c{k}_{photo.name}").symlink_to(photo)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="Bundle or model dir (default: the built-in model).")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--only", default="local,ray,naive")
    args = ap.parse_args()
    bundle = args.bundle or subprocess.run([sys.executable, "-m", "food_classifier.cli", "builtin"], cwd=ROOT,
                                           capture_output=True, text=True, check=True).stdout.strip()
    n_photos = sum(1 for _ in DATA.rglob("*.jpg"))
    print(f"CPU: {cpu_flags()}, {len(os.sched_getaffinity(0))} usable cores; load average "
          f"{os.getloadavg()[0]:.1f}\nbundle: {bundle}")
    print("| photos | contender | img/s | steady img/s | CPU ms/img | peak RSS MiB | wall s | load avg after | "
          "img/s vs naive |\n|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        sets = [(DATA, n_photos)] + ([(copies(args.copies, Path(tmp) / "copies"), n_photos * args.copies)]
                                     if args.copies > 1 else [])
        walls: dict[str, list[tuple[int, float]]] = {}
        for source, n in sets:
            cli = [sys.executable, "-m", "food_classifier.cli", "predict-dir", str(source), "--model", bundle]
            runs = {"local": cli + ["--out", f"{tmp}/local-{n}.parquet"],
                    "ray": cli + ["--out", f"{tmp}/ray-{n}.parquet", "--engine", "ray"],
                    "naive": [sys.executable, "-c", NAIVE, str(source), bundle]}
            results = {name: measure(cmd, n) for name, cmd in runs.items() if name in args.only.split(",")}
            base = results.get("naive", {}).get("img_s")
            for name, r in results.items():
                walls.setdefault(name, []).append((n, r["wall"]))
                ratio = f"{r['img_s'] / base:.2f}x" if base else "-"
                print(f"| {n} | {name} | {r['img_s']:.1f} | {r['steady']:.1f} | {r['cpu_ms']:.1f} | {r['rss']:.0f} | "
                      f"{r['wall']:.0f} | {r['load']:.1f} | {ratio} |", flush=True)
    for name, points in walls.items():  # wall = start-up + n / rate, from the two sizes
        if len(points) == 2 and points[1][1] > points[0][1]:
            (n1, w1), (n2, w2) = points
            rate = (n2 - n1) / (w2 - w1)
            print(f"{name}: {rate:.1f} img/s once running, {w1 - n1 / rate:.0f} s fixed start-up")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
