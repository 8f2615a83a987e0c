"""Soak: thousands of requests at concurrency 8, a share of them hostile, against the real server.

Good requests are real Food-101 photos (../shared/datasets/food101_mini3, or generated photos when
it is missing) sent every way a client can (multipart, raw body, JSON base64, batch of 4); bad ones
are drawn from a mix of broken files, lying headers, wrong content types, nested JSON, bad base64
and over-limit bodies. Prints failed good requests (the goal is 0), bad requests answered other than
by a JSON 4xx, p50/p99 latency, and the server's RSS, open files and threads at start, after warm-up
(the first 10 %), in the middle and at the end (goal: RSS growth < 10 % after warm-up).

    python bench/soak.py [--requests 4000] [--bad-share 0.15] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from food_classifier.testing import ServerProcess, rss_mb  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "food101_mini3"
MAX_BODY = 2_000_000


def photos(n: int = 64) -> list[bytes]:
    every = sorted(SHARED.glob("*/*.jpg"))
    found = every[:: max(1, len(every) // n)][:n]
    if found:
        return [p.read_bytes() for p in found]
    rng = random.Random(0)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (512, 384), tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def bad_requests(jpeg: bytes) -> list[tuple[str, dict]]:
    """(name, httpx request kwargs) of hostile requests; each must get a JSON 4xx."""
    raw = {"content-type": "application/octet-stream"}
    return [
        ("junk", {"content": random.Random(1).randbytes(4000), "headers": raw}),
        ("truncated_jpeg", {"content": jpeg[: len(jpeg) // 3], "headers": raw}),
        ("bomb_header", {"content": png_claiming(40000, 40000), "headers": raw}),
        ("empty", {"content": b"", "headers": raw}),
        ("eps", {"content": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n", "headers": raw}),
        ("wrong_type", {"content": jpeg, "headers": {"content-type": "text/plain"}}),
        ("malformed_type", {"content": jpeg, "headers": {"content-type": ";;;"}}),
        ("nested_json", {"content": b"[" * 50_000 + b"]" * 50_000, "headers": {"content-type": "application/json"}}),
        ("bad_base64", {"json": {"image": "%%% not base64"}}),
        ("over_limit", {"content": b"\xff" * (MAX_BODY + 10), "headers": raw}),
        ("multipart_no_file", {"files": {"note": (None, "nothing")}}),
    ]


def good_request(kind: int, photo: bytes, others: list[bytes]) -> tuple[str, str, dict]:
    if kind == 0:
        return "multipart", "/predict", {"files": {"file": ("a.jpg", photo, "image/jpeg")}}
    if kind == 1:
        return "raw", "/predict", {"content": photo, "headers": {"content-type": "image/jpeg"}}
    if kind == 2:
        return "json", "/predict", {"json": {"image": base64.b64encode(photo).decode()}}
    files = [("files", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate([photo, *others[:3]])]
    return "batch", "/predict-batch", {"files": files}


def proc_stats(pid: int) -> dict:
    threads = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("Threads:"))
    return {"rss_mb": rss_mb(pid), "open_files": len(list(Path(f"/proc/{pid}/fd").iterdir())), "threads": threads}


async def soak(url: str, pid: int, n: int, bad_share: float, concurrency: int) -> dict:
    rng = random.Random(42)
    good, bad = photos(), bad_requests(photos(1)[0])
    plan = [("bad", rng.randrange(len(bad))) if rng.random() < bad_share else ("good", rng.randrange(4))
            for _ in range(n)]
    stats: dict[str, dict] = {}
    results: list[tuple[str, str, int, float, bool]] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    stats["start"] = proc_stats(pid)
    marks = {n // 10: "warm", n // 2: "middle"}

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            if i in marks:
                stats[marks[i]] = proc_stats(pid)
            what, which = plan[i]
            if what == "good":
                name, path, kwargs = good_request(which, good[i % len(good)], good[(i + 1) % len(good):])
            else:
                (name, kwargs), path = bad[which], "/predict"
            t = time.perf_counter()
            try:
                r = await client.post(path, **kwargs)
                status = r.status_code
                json_ok = r.headers.get("content-type") == "application/json"
                if status == 200 and path == "/predict-batch":
                    json_ok = r.json()["failed"] == 0
            except httpx.HTTPError:
                status, json_ok = 0, False
            results.append((what, name, status, time.perf_counter() - t, json_ok))

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    stats["seconds"] = time.perf_counter() - start
    await asyncio.sleep(1.0)
    stats["end"] = proc_stats(pid)
    stats["results"] = results
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--bad-share", type=float, default=0.15)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--bundle", type=Path, default=None, help="default: the built-in model")
    args = ap.parse_args()
    cpu = subprocess.run("lscpu | grep -o 'avx512[a-z_]*\\|avx2' | sort -u | tr '\\n' ' '", shell=True,
                         capture_output=True, text=True).stdout.strip()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"CPU flags: {cpu or 'unknown'}; load average at start: {load}")
    if args.bundle is None:
        from food_classifier.builtin import builtin_bundle_path

        args.bundle = Path(builtin_bundle_path())
    with ServerProcess([args.bundle], args=["--log-level", "warning", "--max-body-bytes", str(MAX_BODY)],
                       ready_timeout=120) as srv:
        s = asyncio.run(soak(srv.url, srv.pid, args.requests, args.bad_share, args.concurrency))
    res = s["results"]
    good = [r for r in res if r[0] == "good"]
    bad = [r for r in res if r[0] == "bad"]
    failed_good = [r for r in good if r[2] != 200 or not r[4]]
    wrong_bad = [r for r in bad if not (400 <= r[2] < 500 and r[4])]
    lat = sorted(r[3] * 1000 for r in good)
    print(f"{len(res)} requests ({len(good)} good, {len(bad)} bad) at concurrency {args.concurrency} in "
          f"{s['seconds']:.1f} s ({len(res) / s['seconds']:.1f} req/s); bundle {args.bundle.name}")
    print(f"failed good requests: {len(failed_good)}" + (f" e.g. {failed_good[:3]}" if failed_good else ""))
    print(f"bad requests not answered by a JSON 4xx: {len(wrong_bad)}" + (f" e.g. {wrong_bad[:3]}" if wrong_bad
                                                                           else ""))
    by_status: dict[int, int] = {}
    for r in bad:
        by_status[r[2]] = by_status.get(r[2], 0) + 1
    print(f"bad requests by status: {dict(sorted(by_status.items()))}")
    print(f"good latency ms: p50 {statistics.median(lat):.0f}, p99 {lat[int(len(lat) * 0.99) - 1]:.0f}, "
          f"max {lat[-1]:.0f}")
    print("| when | RSS MB | open files | threads |\n|---|---|---|---|")
    for when in ("start", "warm", "middle", "end"):
        st = s[when]
        print(f"| {when} | {st['rss_mb']:.0f} | {st['open_files']} | {st['threads']} |")
    growth = (s["end"]["rss_mb"] - s["warm"]["rss_mb"]) / s["warm"]["rss_mb"] * 100
    print(f"RSS growth after warm-up: {growth:+.1f} % (goal < 10 %)")


if __name__ == "__main__":
    main()
