"""Benchmark the prediction service against the seed-style baseline, with real JPEG uploads.

Starts the real server (`python -m food_classifier.serving`) on a free port, uploads 512 px Food-101
JPEGs at several concurrencies through the single-image and the batch endpoint, samples the server's
RSS, then does the same single-image run against bench/baseline_flask.py (Flask + PyTorch eager) on
the same model and prints the throughput ratio. The load generator runs on the same machine, so its
CPU use is part of the picture (as it would be for a sidecar client).

    python bench/bench_serving.py --bundle models/food --run runs/<run>
    python bench/bench_serving.py --bundle models/food --no-baseline --server-arg=--batch-max-wait-ms=0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from food_classifier.client import AsyncClient  # noqa: E402
from food_classifier.testing import ServerProcess, free_port, rss_mb  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "food101_mini3"


def load_images(root: Path, n: int) -> list[tuple[str, bytes]]:
    files = sorted(root.glob("*/*.jpg"))
    step = max(1, len(files) // n)
    return [(f.name, f.read_bytes()) for f in files[::step][:n]]


def stats(latencies: list[float], images: int, seconds: float, errors: int) -> dict:
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 2) if lat else float("nan")

    return {"img_per_s": round(images / seconds, 1), "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "requests": len(lat), "errors": errors, "images": images}


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measured(pid: int, run) -> dict:
    """Run a load coroutine; add peak RSS and CPU per image of the server and of this load generator.

    CPU per image does not depend on what else the machine is doing, unlike img/s and latency.
    """
    sampler = RssSampler(pid)
    sampler.start()
    server0, client0 = proc_cpu(pid), time.process_time()
    row = await run
    images = max(1, row.pop("images"))
    row["rss_mb"] = sampler.stop()
    row["server_cpu_ms_img"] = round((proc_cpu(pid) - server0) / images * 1000, 2)
    row["client_cpu_ms_img"] = round((time.process_time() - client0) / images * 1000, 2)
    return row


class RssSampler(threading.Thread):
    """Peak RSS of a process while a run is going."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self._stop_event = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return round(self.peak, 1)


async def load(send, images: list[tuple[str, bytes]], concurrency: int, requests: int, per_request: int) -> dict:
    """`requests` calls of `send(batch)` from `concurrency` workers; latency per call."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def worker(w: int) -> None:
        nonlocal errors
        for i in counter:
            batch = [images[(i * per_request + j + w) % len(images)] for j in range(per_request)]
            t = time.perf_counter()
            try:
                await send(batch)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return stats(latencies, len(latencies) * per_request, time.perf_counter() - start, errors)


async def bench_service(url: str, pid: int, images, levels, requests, batch_requests, batch_size) -> list[dict]:
    rows = []
    async with AsyncClient(url, max_connections=max(levels) + 4) as client:
        async def single(batch):
            await client.predict(batch[0][1])

        async def multi(batch):
            res = await client.predict_batch([b for _, b in batch])
            if any("error" in r for r in res):
                raise RuntimeError("image failed")

        await load(single, images, 4, 40, 1)  # warm the connections and the decode pool
        for endpoint, send, n, per in (("single", single, requests, 1), ("batch", multi, batch_requests, batch_size)):
            for c in levels:
                row = await measured(pid, load(send, images, c, n, per))
                rows.append({"server": "service", "endpoint": endpoint, "concurrency": c, **row})
                print(json.dumps(rows[-1]), flush=True)
    return rows


async def bench_baseline(url: str, pid: int, images, levels, requests) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        async def single(batch):
            name, data = batch[0]
            r = await http.post("/predict", files={"file": (name, data, "image/jpeg")})
            r.raise_for_status()

        await load(single, images, 2, 10, 1)
        for c in levels:
            row = await measured(pid, load(single, images, c, requests, 1))
            rows.append({"server": "baseline", "endpoint": "single", "concurrency": c, **row})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def newest_run(runs: Path) -> Path | None:
    found = sorted((p.parent for p in runs.glob("*/best.pt")), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def start_baseline(run: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "baseline_flask.py"), "--run", str(run),
                             "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError("baseline server exited")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError("baseline not ready")


def _layout(ort: int, workers: int, size: int, wait: float) -> list[str]:
    return [f"--ort-threads={ort}", f"--inference-workers={workers}", f"--batch-max-size={size}",
            f"--batch-max-wait-ms={wait}"]


SWEEP = [  # (label, serve flags): thread layouts, then micro-batching on and off
    ("ort 2 threads x 1 worker, batch<=8, wait 2 ms", _layout(2, 1, 8, 2)),
    ("ort 2 threads x 1 worker, no batching", _layout(2, 1, 1, 0)),
    ("ort 2 threads x 1 worker, batch<=16, wait 2 ms", _layout(2, 1, 16, 2)),
    ("ort 1 thread x 2 workers, batch<=4, wait 2 ms", _layout(1, 2, 4, 2)),
    ("ort 1 thread x 2 workers, batch<=8, wait 2 ms", _layout(1, 2, 8, 2)),
    ("ort 1 thread x 2 workers, no batching", _layout(1, 2, 1, 0)),
    ("ort 1 thread x 2 workers, batch<=8, wait 0", _layout(1, 2, 8, 0)),
    ("ort 1 thread x 2 workers, batch<=8, wait 5 ms", _layout(1, 2, 8, 5)),
]


async def sweep_one(url: str, pid: int, images, levels, requests) -> list[dict]:
    rows = []
    async with AsyncClient(url, max_connections=max(levels) + 4) as client:
        async def single(batch):
            await client.predict(batch[0][1])

        await load(single, images, 4, 40, 1)
        for c in levels:
            rows.append({"concurrency": c, **await measured(pid, load(single, images, c, requests, 1))})
    return rows


def sweep(args: argparse.Namespace, images) -> None:
    """Single-image endpoint under each server layout in SWEEP (picks the defaults)."""
    lines = ["| server flags | concurrency | img/s | p50 ms | p95 ms | p99 ms | peak RSS MB | server CPU ms/img |",
             "|" + "---|" * 8]
    for label, flags in SWEEP:
        with ServerProcess([args.bundle], args=[*args.server_arg, *flags], ready_timeout=120) as srv:
            rows = asyncio.run(sweep_one(srv.url, srv.pid, images, args.levels, args.requests))
        for r in rows:
            lines.append(f"| {label} | {r['concurrency']} | {r['img_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
                         f"{r['p99_ms']} | {r['rss_mb']} | {r['server_cpu_ms_img']} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


def table(rows: list[dict]) -> str:
    head = ("| server | endpoint | concurrency | img/s | p50 ms | p95 ms | p99 ms | peak RSS MB | server CPU ms/img "
            "| client CPU ms/img | errors |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['server']} | {r['endpoint']} | {r['concurrency']} | {r['img_per_s']} | {r['p50_ms']} | "
                     f"{r['p95_ms']} | {r['p99_ms']} | {r['rss_mb']} | {r['server_cpu_ms_img']} | "
                     f"{r['client_cpu_ms_img']} | {r['errors']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "models" / "food")
    ap.add_argument("--run", type=Path, help="training run of the same model, for the baseline "
                    "(default: the newest under runs/)")
    ap.add_argument("--images", type=Path, default=DATA)
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=400, help="single-image requests per level")
    ap.add_argument("--batch-requests", type=int, default=24, help="batch requests per level")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--baseline-requests", type=int, default=100)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag, e.g. --server-arg=--x=1")
    ap.add_argument("--json", type=Path, help="write all rows here")
    ap.add_argument("--sweep", action="store_true", help="compare thread layouts and micro-batch settings instead")
    args = ap.parse_args()

    images = load_images(args.images, args.n_images)
    print(f"{len(images)} JPEGs from {args.images}; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    if args.sweep:
        sweep(args, images)
        return
    with ServerProcess([args.bundle], args=args.server_arg, ready_timeout=120) as srv:
        models = httpx.get(srv.url + "/v1/models", timeout=30).json()["models"]  # serve's default: recommended
        served = {m["name"]: m["variant"] for m in models}
        print(f"service variant: {served} (--server-arg=--variant=fp32 to force fp32)", flush=True)
        rows = asyncio.run(bench_service(srv.url, srv.pid, images, args.levels, args.requests,
                                         args.batch_requests, args.batch_size))
        idle_rss = round(rss_mb(srv.pid), 1)
    if not args.no_baseline:
        run = args.run or newest_run(ROOT / "runs")
        if run is None:
            sys.exit("no training run for the baseline: pass --run runs/<run> (or --no-baseline)")
        print(f"baseline: Flask + PyTorch eager on {run}", flush=True)
        proc, url = start_baseline(run)
        try:
            levels = [c for c in args.levels if c <= 8]
            rows += asyncio.run(bench_baseline(url, proc.pid, images, levels, args.baseline_requests))
        finally:
            proc.terminate()
            proc.wait(10)
    print()
    print(table(rows))
    print(f"\nservice RSS after the run: {idle_rss} MB; load average after: {os.getloadavg()[0]:.2f}")
    for c in args.levels:
        svc = next((r for r in rows if r["server"] == "service" and r["endpoint"] == "single"
                    and r["concurrency"] == c), None)
        base = next((r for r in rows if r["server"] == "baseline" and r["concurrency"] == c), None)
        if svc and base:
            print(f"concurrency {c}: service/baseline throughput = {svc['img_per_s'] / base['img_per_s']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
