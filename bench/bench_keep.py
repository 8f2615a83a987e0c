"""What `serve --keep-photos` costs the answer: `ServingMonitor.observe` per call, keeping off vs on.

The monitor runs on the request's path; with keeping on it also decides whether the photo is worth a label and
hands it to the writer thread. This times that call for real JPEG photos (food101_mini3 when present, else
generated ones), with every photo offered (`--keep-margin 1`, the worst case: the writer is busy the whole run)
and with the default margin, against keeping off, all in one run. It also reports how fast the writer keeps
photos (fsynced, renamed) on this disk.

    python bench/bench_keep.py [--n 2000]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from food_classifier.answer import Answer, TopK
from food_classifier.serving.observer import ServingMonitor
from food_classifier.serving.settings import ServeSettings

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "food101_mini3"
LABELS = [f"class_{i}" for i in range(10)]


def photos(n: int) -> list[bytes]:
    files = sorted(SHARED.glob("*/*.jpg"))[:n] if SHARED.exists() else []
    if files:
        return [f.read_bytes() for f in files]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def answers(n: int) -> list[Answer]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        p = rng.dirichlet(np.full(len(LABELS), 0.3)).astype(np.float32)
        order = np.argsort(-p)
        out.append(Answer(label=LABELS[order[0]], label_idx=int(order[0]), confidence=float(p[order[0]]),
                          top_k=tuple(TopK(LABELS[j], float(p[j])) for j in order[:5]), abstained=False, reason=None,
                          cache="miss", model="food", model_version="v1", request_id=f"r{i}", probabilities=p))
    return out


def model() -> SimpleNamespace:
    meta = SimpleNamespace(reference=None)
    return SimpleNamespace(name="food", version="v1", labels=LABELS, classifier=SimpleNamespace(
        bundle=SimpleNamespace(meta=meta)))


def run(settings: ServeSettings, data: list[bytes], ans: list[Answer]) -> tuple[list[float], ServingMonitor]:
    monitor = ServingMonitor(settings)
    served = model()
    times = []
    for i, a in enumerate(ans):
        d = data[i % len(data)]
        t = time.perf_counter()
        monitor.observe(served, a, d)
        times.append((time.perf_counter() - t) * 1e6)
    return times, monitor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    data, ans = photos(min(args.n, 400)), answers(args.n)
    print(f"{len(data)} photos ({'food101_mini3' if SHARED.exists() else 'generated'}, mean "
          f"{sum(map(len, data)) / len(data) / 1024:.0f} KiB), {args.n} observe() calls each")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("keeping off", {}),
                            ("keep, default margin 0.2", {"keep_photos": Path(tmp) / "a"}),
                            ("keep, every photo (margin 1)", {"keep_photos": Path(tmp) / "b", "keep_margin": 1.0})):
            times, monitor = run(ServeSettings(feedback_memory=50_000, **extra), data, ans)
            keep = monitor.keep
            t = time.perf_counter()
            if keep is not None:
                keep.flush()
            drain = time.perf_counter() - t
            rows.append((name, statistics.median(times), float(np.percentile(times, 99)), keep, drain))
            monitor.close()
    base = rows[0][1]
    print(f"{'setting':32} {'median us':>10} {'p99 us':>8} {'vs off':>7}  kept  dropped")
    for name, med, p99, keep, _ in rows:
        kept = f"{keep.kept:5d}  {keep.dropped:7d}" if keep else "    -        -"
        print(f"{name:32} {med:10.1f} {p99:8.1f} {med / base:6.2f}x  {kept}")
    name, _, _, keep, drain = rows[2]
    print(f"writer: {keep.kept} distinct photos kept (fsync + rename each); queue drained {drain * 1000:.0f} ms "
          f"after the last call")


if __name__ == "__main__":
    main()
