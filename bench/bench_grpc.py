"""REST vs gRPC on the same server process and model, in one run: what does the binary protocol buy?

Starts the real server with `--grpc-port` and sends the same 512 px Food-101 JPEGs four ways:
REST multipart, REST raw body, gRPC unary, gRPC stream; as single images (4 clients in parallel)
and as 32-image batches (REST multipart: one predict-batch request; REST raw and gRPC unary: 32
concurrent calls; gRPC stream: one ClassifyStream of 32). Prints img/s, p50 latency per call, and
CPU per image of the server process and of this client process, with ratios to REST multipart.

    python bench/bench_grpc.py                          # the built-in ImageNet food model (Lite0)
    python bench/bench_grpc.py --bundle models/food --single 300 --batches 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from bench_serving import DATA, load_images, measured, stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from food_classifier.client import AsyncClient  # noqa: E402
from food_classifier.testing import ServerProcess, free_port  # noqa: E402
from food_classifier.v1 import classifier_pb2 as pb2  # noqa: E402
from food_classifier.v1 import classifier_pb2_grpc as pb2_grpc  # noqa: E402

BATCH = 32


async def run_calls(send, images: list[bytes], calls: int, per_call: int, concurrency: int) -> dict:
    """`calls` calls of `send(list of per_call images)` from `concurrency` workers; latency per call."""
    latencies: list[float] = []
    errors = 0
    todo = iter(range(calls))

    async def worker() -> None:
        nonlocal errors
        for i in todo:
            batch = [images[(i * per_call + j) % len(images)] for j in range(per_call)]
            t = time.perf_counter()
            try:
                await send(batch)
            except Exception as e:  # counted, and the first one shown
                if not errors:
                    print(f"error: {e!r}", file=sys.stderr)
                errors += 1
                continue
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return stats(latencies, len(latencies) * per_call, time.perf_counter() - start, errors)


def senders(http: AsyncClient, stub: pb2_grpc.ClassifierStub) -> dict[str, dict]:
    """Per transport: how to send one image and how to send a batch of 32."""

    async def rest_multipart(batch):
        await http.predict(batch[0])

    async def rest_multipart_batch(batch):
        if any("error" in r for r in await http.predict_batch(batch)):
            raise RuntimeError("an image failed")

    async def rest_raw(batch):
        await http.predict(batch[0], raw=True)

    async def rest_raw_batch(batch):
        await asyncio.gather(*(http.predict(b, raw=True) for b in batch))

    async def unary(batch):
        await stub.Classify(pb2.ClassifyRequest(image=batch[0]))

    async def unary_batch(batch):
        await asyncio.gather(*(stub.Classify(pb2.ClassifyRequest(image=b)) for b in batch))

    async def stream(batch):
        async for r in stub.ClassifyStream(pb2.ClassifyRequest(image=b) for b in batch):
            if r.HasField("error"):
                raise RuntimeError(r.error.detail)

    return {"REST multipart": {"single": rest_multipart, "batch": rest_multipart_batch},
            "REST raw body": {"single": rest_raw, "batch": rest_raw_batch},
            "gRPC unary": {"single": unary, "batch": unary_batch},
            "gRPC stream": {"single": stream, "batch": stream}}


async def bench(url: str, target: str, pid: int, images: list[bytes], singles: int, batches: int,
                concurrency: int) -> list[dict]:
    rows = []
    async with AsyncClient(url, max_connections=BATCH + 4) as http, grpc.aio.insecure_channel(target) as ch:
        stub = pb2_grpc.ClassifierStub(ch)
        ways = senders(http, stub)
        for way in ways.values():  # warm connections, channels and the decode pool on every path
            await run_calls(way["single"], images, 8, 1, 4)
            await run_calls(way["batch"], images, 1, BATCH, 1)
        for shape, calls, per_call, conc in (("single", singles, 1, concurrency), ("batch", batches, BATCH, 1)):
            for name, way in ways.items():
                row = await measured(pid, run_calls(way[shape], images, calls, per_call, conc))
                row.pop("rss_mb")
                rows.append({"transport": name, "shape": shape, **row})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    base = {r["shape"]: r for r in rows if r["transport"] == "REST multipart"}
    out = ["| transport | shape | img/s | p50 ms per call | server CPU ms/img | client CPU ms/img | "
           "img/s vs REST multipart | server CPU vs REST multipart | errors |", "|---" * 9 + "|"]
    for r in rows:
        b = base[r["shape"]]
        out.append(f"| {r['transport']} | {r['shape'] if r['shape'] == 'single' else f'batch of {BATCH}'} | "
                   f"{r['img_per_s']} | {r['p50_ms']} | {r['server_cpu_ms_img']} | {r['client_cpu_ms_img']} | "
                   f"{r['img_per_s'] / b['img_per_s']:.2f}x | "
                   f"{r['server_cpu_ms_img'] / b['server_cpu_ms_img']:.2f}x | {r['errors']} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=None, help="Bundle or model dir (default: the built-in model).")
    p.add_argument("--single", type=int, default=200, help="Single-image calls per transport.")
    p.add_argument("--batches", type=int, default=10, help="32-image batches per transport.")
    p.add_argument("--concurrency", type=int, default=4, help="Parallel clients for single images.")
    p.add_argument("--images", type=int, default=64, help="Distinct photos cycled through.")
    p.add_argument("--server-arg", action="append", default=[], help="Extra serve flag (repeatable).")
    args = p.parse_args()
    if args.bundle is None:
        from food_classifier.builtin import builtin_bundle_path

        args.bundle = Path(builtin_bundle_path())
    images = [data for _, data in load_images(DATA, args.images)]
    grpc_port = free_port()
    # the photos repeat, so the prediction cache is off: every image is decoded and run, as new photos are
    server_args = ["--grpc-port", str(grpc_port), "--max-batch-images", str(BATCH), "--cache-bytes", "0",
                   *args.server_arg]
    with ServerProcess([args.bundle], args=server_args, ready_timeout=120) as srv:
        rows = asyncio.run(bench(srv.url, f"127.0.0.1:{grpc_port}", srv.pid, images, args.single, args.batches,
                                 args.concurrency))
    kb = sum(map(len, images)) // len(images) // 1024
    print(f"\nbundle: {args.bundle}; {len(images)} Food-101 JPEGs of 512 px (~{kb} kB); "
          f"server flags: {' '.join(server_args)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
