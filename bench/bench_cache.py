"""What the prediction cache buys: img/s and p50 latency at 0 %, 50 % and 90 % repeated photos, with the
cache off, in-process (LRU) and in Redis, all in one run on the same machine.

Each (backend, repeat rate) gets a fresh server (`python -m food_classifier.serving`) and an emptied
Redis, then `--requests` uploads of 512 px Food-101 JPEGs from 4 concurrent clients. A repeated upload is
the same bytes as a photo sent earlier in that run; the others are photos not sent before. Ratios are
against "cache off" at the same repeat rate. The load generator runs on the same CPUs as the server, and
on a shared machine img/s moves with the neighbours' load: every configuration runs `--rounds` times,
interleaved, and the median is shown, next to the server's CPU time per image (steadier: it does not
depend on what else runs).

    python bench/bench_cache.py                       # the built-in model (EfficientNet-Lite0, 224 px)
    python bench/bench_cache.py --bundle models/food  # a trained bundle
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import redis as redis_client  # noqa: E402
from services import RedisServer  # noqa: E402

from food_classifier.client import AsyncClient  # noqa: E402
from food_classifier.testing import ServerProcess  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "food101_mini3"


def sequence(photos: list[bytes], n: int, repeat: float, seed: int = 0) -> list[bytes]:
    """n uploads: each, with probability `repeat`, a photo already sent in this run; else a new one."""
    rng = random.Random(seed)
    fresh = iter(photos)
    sent: list[bytes] = []
    out = []
    for _ in range(n):
        photo = rng.choice(sent) if sent and rng.random() < repeat else next(fresh)
        sent.append(photo)
        out.append(photo)
    return out


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_load(url: str, pid: int, uploads: list[bytes], concurrency: int) -> dict:
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    queue = iter(uploads)
    async with AsyncClient(url) as client:
        await client.predict(uploads[0])  # warm the connection (and this photo: counted below as a repeat)

        async def worker() -> None:
            for data in queue:
                t = time.perf_counter()
                res = await client.predict(data)
                latencies.append(time.perf_counter() - t)
                outcomes[res["cache"]] = outcomes.get(res["cache"], 0) + 1

        start, cpu = time.perf_counter(), proc_cpu(pid)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds, cpu = time.perf_counter() - start, proc_cpu(pid) - cpu
    latencies.sort()
    return {"img_per_s": round(len(uploads) / seconds, 1), "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
            "cpu_ms_img": round(cpu / len(uploads) * 1000, 2), "outcomes": outcomes}


def cpu_flags() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = sorted({f for f in out.split() if f.startswith("avx512") or f == "avx2"})
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    return f"{model} ({' '.join(flags)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="Bundle or model dir (default: the built-in model).")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rates", default="0,0.5,0.9")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.bundle:
        bundle = args.bundle
    else:
        from food_classifier.builtin import builtin_bundle_path

        bundle = str(builtin_bundle_path())
    photos = [p.read_bytes() for p in sorted(DATA.glob("*/*.jpg"))]
    random.Random(1).shuffle(photos)
    rates = [float(r) for r in args.rates.split(",")]
    print(f"bundle: {bundle}\nCPU: {cpu_flags()}; python {platform.python_version()}; {args.requests} uploads per run, "
          f"{args.concurrency} concurrent clients; 512 px Food-101 JPEGs", flush=True)
    rows = []
    with RedisServer() as redis:
        flush = redis_client.Redis.from_url(redis.url)
        backends = {"off": {"FOOD_CLASSIFIER_CACHE_BYTES": "0"},
                    "in-process": {},
                    "redis": {"FOOD_CLASSIFIER_CACHE_BYTES": "0", "FOOD_CLASSIFIER_CACHE_URL": redis.url}}
        for rate in rates:
            uploads = sequence(photos, args.requests, rate, seed=int(rate * 100))
            runs: dict[str, list[dict]] = {name: [] for name in backends}
            for _ in range(args.rounds):
                for name, env in backends.items():
                    flush.flushall()
                    with ServerProcess([bundle], env=env) as srv:
                        runs[name].append(asyncio.run(run_load(srv.url, srv.pid, uploads, args.concurrency)))
                    print(json.dumps({"backend": name, "repeat": rate, **runs[name][-1]}), flush=True)
            for name, results in runs.items():
                rows.append({"backend": name, "repeat": rate,
                             **{k: statistics.median(r[k] for r in results) for k in ("img_per_s", "p50_ms",
                                                                                        "cpu_ms_img")},
                             "hits": sum(n for k, n in results[0]["outcomes"].items() if k.startswith("hit"))})
    base = {r["repeat"]: r for r in rows if r["backend"] == "off"}
    print(f"\nmedian of {args.rounds} rounds\n| repeated photos | cache | img/s | p50 ms | server CPU ms/img | hits | "
          "img/s vs off | CPU/img vs off |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base[r["repeat"]]
        print(f"| {r['repeat']:.0%} | {r['backend']} | {r['img_per_s']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['cpu_ms_img']:.1f} | {r['hits']}/{args.requests} | {r['img_per_s'] / b['img_per_s']:.2f}x | "
              f"{r['cpu_ms_img'] / b['cpu_ms_img']:.2f}x |")


if __name__ == "__main__":
    main()
