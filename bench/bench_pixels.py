"""Large images: what a decode costs, and what the decode-memory budget does for the server.

Part 1, one fresh process per case (so the peak RSS is that decode's): decode + preprocess time and
peak memory of PNG (RGB, RGBA) and JPEG photos from 12 to 48 MP, through `preprocessing.preprocess`,
next to the `decode_bytes` estimate the budget uses. This is the measurement behind --max-pixels.

Part 2, the real server (uvicorn, the given bundle): 24 concurrent 6000x6000 PNGs (flat colour,
~105 KB each, 144 MB once decoded) while a normal JPEG photo is sent every 0.5 s; the server's RSS
is sampled every 20 ms. Twice in this run: with the default budget, and with the budget effectively
off (`--decode-memory-mb 1000000`, everything decodes at once, as before admission control).
Targets (issue 15): peak RSS <= 500 MB, the JPEG answered in <= 1 s.

    python bench/bench_pixels.py [--bundle DIR] [--pngs 24] [--skip-decode-table]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from food_classifier.testing import ServerProcess, rss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "food101_mini3"
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
ONE_CASE = """
import json, sys, time
sys.path.insert(0, {root!r})
from food_classifier.preprocessing import PreprocessSpec, decode_bytes, peek, preprocess
def kb(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
data = open({path!r}, "rb").read()
spec = PreprocessSpec(resize=320, crop=288)
before = kb("VmRSS:")
t = time.perf_counter()
preprocess(data, spec, max_pixels=10**9)
ms = (time.perf_counter() - t) * 1000
peak = (kb("VmHWM:") - before) / 1024
print(json.dumps({{"ms": ms, "peak_mb": peak, "estimate_mb": decode_bytes(peek(data, spec, 10**9)) / 2**20}}))
"""


def photo_like(w: int, h: int, mode: str = "RGB") -> Image.Image:
    """A smooth gradient (compresses like a photo would not, decodes like any other pixels)."""
    small = Image.linear_gradient("L").resize((64, 48))
    rgb = Image.merge("RGB", (small, small.rotate(90), small.transpose(Image.FLIP_LEFT_RIGHT)))
    img = rgb.resize((w, h), Image.BILINEAR)
    if mode == "RGBA":
        img.putalpha(Image.linear_gradient("L").resize((w, h)))
    return img


def decode_table(tmp: Path) -> None:
    print("\n## Decode cost per image (fresh process each; preprocess to 288 px)\n")
    print("| image | MP | decode+preprocess ms | peak RSS growth MB | budget estimate MB |")
    print("|---|---|---|---|---|")
    for w, h in ((4000, 3000), (6000, 4000), (6000, 6000), (8000, 6000)):
        for fmt, mode in (("PNG", "RGB"), ("PNG", "RGBA"), ("JPEG", "RGB")):
            path = tmp / f"{w}x{h}.{mode}.{fmt.lower()}"
            photo_like(w, h, mode).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
            runs = [json.loads(subprocess.run([sys.executable, "-c", ONE_CASE.format(root=str(ROOT), path=str(path))],
                                              capture_output=True, text=True, check=True).stdout) for _ in range(2)]
            r = min(runs, key=lambda x: x["ms"])
            print(f"| {fmt} {mode} {w}x{h} ({path.stat().st_size / 1e6:.1f} MB file) | {w * h / 1e6:.0f} | "
                  f"{r['ms']:.0f} | {r['peak_mb']:.0f} | {r['estimate_mb']:.0f} |")


def flat_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 120, 40)).save(buf, "PNG")
    return buf.getvalue()


def a_jpeg() -> bytes:
    photos = sorted(SHARED.glob("*/*.jpg"))[:1]
    if photos:
        return photos[0].read_bytes()
    buf = io.BytesIO()
    photo_like(512, 384).save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def storm(url: str, png: bytes, jpeg: bytes, n: int) -> dict:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def post(data: bytes, ctype: str) -> tuple[int, float]:
            t = time.perf_counter()
            r = await client.post("/predict", content=data, headers={"content-type": ctype})
            return r.status_code, time.perf_counter() - t

        await post(jpeg, "image/jpeg")  # connection and code paths warm
        start = time.perf_counter()
        bigs = [asyncio.create_task(post(png, "image/png")) for _ in range(n)]
        small: list[tuple[int, float]] = []
        await asyncio.sleep(0.3)
        while not all(b.done() for b in bigs):
            small.append(await post(jpeg, "image/jpeg"))
            await asyncio.sleep(0.5)
        big = [await b for b in bigs]
        return {"seconds": time.perf_counter() - start, "big": big, "small": small}


def server_run(bundle: Path, png: bytes, jpeg: bytes, n: int, extra: list[str]) -> dict:
    with ServerProcess([bundle], args=["--log-level", "warning", *extra], ready_timeout=120) as srv:
        time.sleep(1.0)
        start_rss, samples, stop = rss_mb(srv.pid), [], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(rss_mb(srv.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            res = asyncio.run(storm(srv.url, png, jpeg, n))
        finally:
            stop.set()
            sampler.join()
        time.sleep(2.0)
        res.update(start_rss=start_rss, peak_rss=max(samples), end_rss=rss_mb(srv.pid))
    return res


def report(name: str, r: dict) -> None:
    ok = sum(1 for s, _ in r["big"] if s == 200)
    lat = [t for s, t in r["small"]]
    small_ok = sum(1 for s, _ in r["small"] if s == 200)
    print(f"| {name} | {ok}/{len(r['big'])} | {r['seconds']:.1f} | {small_ok}/{len(lat)} | "
          f"{statistics.median(lat) * 1000:.0f} | {max(lat) * 1000:.0f} | {r['start_rss']:.0f} | "
          f"{r['peak_rss']:.0f} | {r['end_rss']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="default: the built-in model (built on first use)")
    ap.add_argument("--pngs", type=int, default=24)
    ap.add_argument("--side", type=int, default=6000)
    ap.add_argument("--skip-decode-table", action="store_true")
    args = ap.parse_args()
    cpu = subprocess.run("lscpu | grep -o 'avx512[a-z_]*\\|avx2' | sort -u | tr '\\n' ' '", shell=True,
                         capture_output=True, text=True).stdout.strip()
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"CPU flags: {cpu or 'unknown'}; load average at start: {' '.join(load)}")
    if not args.skip_decode_table:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            decode_table(Path(tmp))
    if args.bundle is None:
        from food_classifier.builtin import builtin_bundle_path

        args.bundle = Path(builtin_bundle_path())
    png, jpeg = flat_png(args.side), a_jpeg()
    print(f"\n## {args.pngs} concurrent {args.side}x{args.side} PNGs ({len(png) / 1e3:.0f} KB each) + a "
          f"{len(jpeg) / 1e3:.0f} KB JPEG every 0.5 s; bundle {args.bundle.name}\n")
    print("| server | PNGs 200 | all PNGs done s | JPEGs 200 | JPEG p50 ms | JPEG max ms | RSS start MB | "
          "RSS peak MB | RSS 2 s after MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    budget = server_run(args.bundle, png, jpeg, args.pngs, [])
    report("decode budget (default 256 MiB)", budget)
    unbounded = server_run(args.bundle, png, jpeg, args.pngs, ["--decode-memory-mb", "1000000"])
    report("budget off (--decode-memory-mb 1000000)", unbounded)
    grow_b, grow_u = budget["peak_rss"] - budget["start_rss"], unbounded["peak_rss"] - unbounded["start_rss"]
    worst_b = max(t for _, t in budget["small"])
    worst_u = max(t for _, t in unbounded["small"])
    print(f"\nRSS growth under the storm: {grow_b:.0f} MB with the budget vs {grow_u:.0f} MB without "
          f"({grow_u / max(grow_b, 1):.1f}x); slowest JPEG {worst_b * 1000:.0f} ms vs {worst_u * 1000:.0f} ms "
          f"({worst_u / max(worst_b, 1e-3):.1f}x)")
    met = budget["peak_rss"] <= 500 and worst_b <= 1.0
    print(f"Targets (peak RSS <= 500 MB, JPEG <= 1 s) with the budget: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
