"""Ray Serve vs the plain server, and `@serve.batch` vs the existing micro-batcher: one run, cache off.

The same bundle and photos (`--photos` 512 px Food-101 JPEGs) uploaded by `--concurrency` clients to:

- plain: `food-classifier serve` (uvicorn), serving defaults (batch_max_size 1: no batching on this CPU)
- plain, micro-batch 8: the same with --batch-max-size 8
- ray: the same app as a Ray Serve deployment, 1 replica, serving defaults
- ray, micro-batch 8: 1 replica, the micro-batcher with batch_max_size 8
- ray, @serve.batch 8: 1 replica, model calls through `@serve.batch(max_batch_size=8, 2 ms)` instead of
  the micro-batcher (decode, cache, answers unchanged)
- ray, 2 replicas: 1 inference worker and 1 decode thread each

Server CPU per image: the uvicorn process; for Ray every Ray process (GCS, raylet, controller, proxy,
replicas; this script is the driver and is not counted). Peak RSS likewise. Ray runs for the whole
benchmark, and the contenders take turns for `--rounds` rounds (the medians are printed).

    python bench/bench_ray_serve.py [--bundle DIR] [--photos 300] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"})  # before Ray

import numpy as np  # noqa: E402
from bench_batch import sample  # noqa: E402
from bench_cache import DATA, cpu_flags  # noqa: E402

from food_classifier.client import AsyncClient  # noqa: E402
from food_classifier.serving.batching import BatchResult  # noqa: E402
from food_classifier.serving.ray_serve import APP_NAME, FoodClassifierIngress, application  # noqa: E402
from food_classifier.serving.settings import ServeSettings  # noqa: E402
from food_classifier.testing import ServerProcess, free_port  # noqa: E402


class ServeBatcher:
    """The micro-batcher's interface (`predict`, `predict_array`) over a `@serve.batch` function."""

    def __init__(self, run: Any, executor: Any, size: int, concurrent: int):
        from ray import serve

        async def batch(arrays: list[np.ndarray]) -> list[BatchResult]:
            start = time.perf_counter()
            out = await asyncio.get_running_loop().run_in_executor(executor, run, np.stack(arrays))
            ms = (time.perf_counter() - start) * 1000
            return [BatchResult(out[i], len(arrays), 0.0, ms) for i in range(len(arrays))]

        self._batch = serve.batch(max_batch_size=size, batch_wait_timeout_s=0.002,
                                  max_concurrent_batches=concurrent)(batch)

    async def predict(self, prepare: Any) -> BatchResult:
        return await self._batch(await prepare)

    async def predict_array(self, array: np.ndarray) -> BatchResult:
        return await self._batch(array)


class ServeBatchIngress(FoodClassifierIngress):
    async def reconfigure(self, config: dict) -> None:
        await super().reconfigure(config)
        registry = self.fc_app.state.registry
        for model in registry.models():
            model.batcher = ServeBatcher(model.classifier.infer, registry.executor, 8,
                                         self.settings.inference_workers)


async def load(url: str, uploads: list[bytes], concurrency: int, cpu: Any) -> dict:
    latencies: list[float] = []
    queue = iter(uploads)
    async with AsyncClient(url) as client:
        await client.predict(uploads[0])

        async def worker() -> None:
            for data in queue:
                t = time.perf_counter()
                await client.predict(data)
                latencies.append(time.perf_counter() - t)

        start, cpu0 = time.perf_counter(), cpu()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds, used = time.perf_counter() - start, cpu() - cpu0
    latencies.sort()
    return {"img_s": len(uploads) / seconds, "p50": latencies[len(latencies) // 2] * 1000,
            "cpu_ms": used / len(uploads) * 1000}


class Watch:
    """CPU seconds and peak RSS of a process tree (optionally without its root), sampled every 0.2 s."""

    def __init__(self, pid: int, skip_root: bool = False):
        self.pid, self.skip, self.cpu, self.peak = pid, skip_root, {}, 0.0
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, sample(self.pid, self.cpu) - (self._root_rss() if self.skip else 0))

    def _root_rss(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024

    def total(self) -> float:
        sample(self.pid, self.cpu)
        return sum(v for p, v in self.cpu.items() if not (self.skip and p == self.pid))

    def close(self) -> None:
        self._stop.set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="Bundle or model dir (default: the built-in model).")
    ap.add_argument("--photos", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.bundle:
        bundle = args.bundle
    else:
        from food_classifier.builtin import builtin_bundle_path

        bundle = str(builtin_bundle_path())
    photos = [p.read_bytes() for p in sorted(DATA.glob("*/*.jpg"))]
    random.Random(1).shuffle(photos)
    uploads = photos[:args.photos]
    print(f"CPU: {cpu_flags()}; load average {os.getloadavg()[0]:.1f}; bundle {bundle}; {len(uploads)} uploads, "
          f"{args.concurrency} clients, cache off")
    from ray import serve

    from food_classifier import ray_env

    ray_env.connect(None)  # up for the whole run: its idle processes cost every contender alike
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = {"bundles": [Path(bundle)], "host": "127.0.0.1", "port": port, "cache_bytes": 0,
            "max_ongoing_requests": args.concurrency}
    configs: list[tuple[str, Any, Any]] = [
        ("plain", [], None), ("plain, micro-batch 8", ["--batch-max-size", "8"], None),
        ("ray", {}, FoodClassifierIngress), ("ray, micro-batch 8", {"batch_max_size": 8}, FoodClassifierIngress),
        ("ray, @serve.batch 8", {}, ServeBatchIngress),
        ("ray, 2 replicas", {"replicas": "2", "inference_workers": 1, "decode_threads": 1}, FoodClassifierIngress)]
    runs: dict[str, list[tuple[dict, float]]] = {name: [] for name, _, _ in configs}
    try:
        for _ in range(args.rounds):  # interleaved: the machine's other load drifts between minutes
            for name, over, cls in configs:
                if cls is None:
                    with ServerProcess([bundle], args=over, env={"FOOD_CLASSIFIER_CACHE_BYTES": "0"}) as srv:
                        watch = Watch(srv.pid)
                        result = asyncio.run(load(srv.url, uploads, args.concurrency, watch.total))
                else:
                    serve.run(application(ServeSettings(**base, **over), cls), name=APP_NAME, route_prefix="/")
                    watch = Watch(os.getpid(), skip_root=True)
                    result = asyncio.run(load(f"http://127.0.0.1:{port}", uploads, args.concurrency, watch.total))
                    serve.delete(APP_NAME)
                watch.close()
                runs[name].append((result, watch.peak))
                print(name, {k: round(v, 1) for k, v in result.items()}, f"peak RSS {watch.peak:.0f} MiB",
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    rows = [(name, {k: statistics.median(r[k] for r, _ in rs) for k in ("img_s", "p50", "cpu_ms")},
             max(p for _, p in rs)) for name, rs in runs.items()]
    plain = rows[0][1]
    print(f"\nmedian of {args.rounds} interleaved rounds (peak RSS: the highest)")
    print("| server | img/s | p50 ms | server CPU ms/img | peak RSS MiB | img/s vs plain | CPU/img vs plain |\n"
          "|---|---|---|---|---|---|---|")
    for name, r, peak in rows:
        print(f"| {name} | {r['img_s']:.1f} | {r['p50']:.0f} | {r['cpu_ms']:.1f} | {peak:.0f} | "
              f"{r['img_s'] / plain['img_s']:.2f}x | {r['cpu_ms'] / plain['cpu_ms']:.2f}x |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
