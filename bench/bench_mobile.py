"""The phone file vs the server on photos at phone resolution: answers, probabilities, speed, export memory.

    python bench/bench_mobile.py models/food --photos 100                 # what `serve` runs (auto)
    python bench/bench_mobile.py models/food --photos 100 --stages 1      # cascade stage 1 only

1. `food-classifier export-mobile` runs as a user runs it, in a fresh interpreter that reports its
   child's peak RSS (the whole export: graph, conversion, its own parity check).
2. N test-tier photos of the bundle's manifest (or `--data`) become phone photos: 4000x3000 JPEG
   upscales (every 4th 3000x4000), quality 92.
3. Each photo goes to the server (`Classifier.predict` on the file, as `serve` answers it) and to
   `model.ort` under ONNX Runtime, decoded as docs/MOBILE.md tells an app to (a JPEG at the server's
   decode scale) and, for comparison, at full size. Same answer? Largest |probability difference|?
4. CPU per photo at batch 1, one thread (decode + graph for the phone, decode to answer for the
   server), and the server's own noise floor: its answers with ONNX Runtime's NCHWc kernels off
   (another valid kernel choice on the same machine) vs on.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_int8 import cpu_name  # noqa: E402

from food_classifier import runtime  # noqa: E402
from food_classifier.bundle import load_newest  # noqa: E402
from food_classifier.inference import Classifier  # noqa: E402
from food_classifier.training import mobile_check  # noqa: E402

PEAK_RSS = """import resource, subprocess, sys
code = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
sys.exit(code)"""


def export(model_dir: Path, out: Path, extra: list[str]) -> int:
    """Run export-mobile; returns its peak RSS in bytes."""
    rss = out.parent / "rss"
    cmd = [sys.executable, "-c", PEAK_RSS, str(rss), sys.executable, "-m", "food_classifier.cli", "export-mobile",
           str(model_dir), "--out", str(out), *extra]
    result = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        sys.exit(f"export-mobile failed: {result.stderr.strip()}")
    return int(rss.read_text())


def phone_photos(sources: list[Path], out: Path) -> list[Path]:
    """4000x3000 JPEG upscales (every 4th portrait) of `sources`, quality 92."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, src in enumerate(sources):
        size = (3000, 4000) if i % 4 == 0 else (4000, 3000)
        path = out / f"{i:03d}-{src.stem}.jpg"
        with Image.open(src) as img:
            img.convert("RGB").resize(size, Image.BICUBIC).save(path, quality=92)
        paths.append(path)
    return paths


def test_tier(bundle, data: Path | None, n: int) -> list[Path]:
    if data is not None:
        paths = sorted(p for p in data.rglob("*.jpg"))
    else:
        with open(bundle.meta.dataset.manifest, newline="") as f:
            paths = [Path(r["path"]) for r in csv.DictReader(f) if r["tier"] == "test"]
    step = max(1, len(paths) // n)
    return paths[::step][:n]


def cpu_ms(fn, items: list) -> float:
    """Median CPU milliseconds of fn(item)."""
    times = []
    for item in items:
        c = time.process_time()
        fn(item)
        times.append(1000 * (time.process_time() - c))
    return statistics.median(times)


def noise_floor(bundle, variant: str, photos: list[Path]) -> float:
    """Max |dp| between the server's answers with and without ONNX Runtime's x86 NCHWc kernels."""
    import onnxruntime as ort

    a = Classifier(bundle, threads=1, variant=variant)
    b = Classifier(bundle, threads=1, variant=variant)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    stages = bundle.meta.cascade.stages if b.cascade is not None else None
    paths = ([bundle.path / (s.int8 or s).file for s in stages] if stages else [bundle.model_file(b.variant)])
    b.sessions = [ort.InferenceSession(str(p), opts, providers=runtime.PROVIDERS,
                                       disabled_optimizers=["NchwcTransformer"]) for p in paths]
    b.session = b.sessions[0]
    c = len(a.labels)
    return max(float(np.abs(a.infer(x)[:, :c] - b.infer(x)[:, :c]).max())
               for x in (a.preprocess(p)[None] for p in photos))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path, help="A model dir or bundle (trained: it has a test tier).")
    ap.add_argument("--photos", type=int, default=100)
    ap.add_argument("--data", type=Path, help="Take photos from this folder instead of the test tier.")
    ap.add_argument("--variant", default="auto")
    ap.add_argument("--stages", type=int)
    ap.add_argument("--timing", type=int, default=20, help="Photos timed for CPU per photo.")
    args = ap.parse_args()

    bundle = load_newest(args.model_dir)
    with tempfile.TemporaryDirectory(prefix="bench-mobile-") as tmp:
        tmp = Path(tmp)
        photos = phone_photos(test_tier(bundle, args.data, args.photos), tmp / "photos")
        extra = ["--variant", args.variant, "--check", str(tmp / "photos")]
        extra += ["--stages", str(args.stages)] if args.stages else []
        rss = export(args.model_dir, tmp / "mobile", extra)
        info = json.loads((tmp / "mobile" / "mobile.json").read_text())
        server = Classifier(bundle, threads=1, variant=args.variant)
        ort_file = tmp / "mobile" / "model.ort"
        rows = {mode: mobile_check.parity(server, ort_file, photos, full_decode=(mode == "full size"), threads=1)
                for mode in ("server's JPEG scale", "full size")}
        session = runtime.create_session(ort_file, threads=1)
        timed = photos[:args.timing]
        phone = {mode: cpu_ms(lambda p, f=(mode == "full size"): session.run(
            None, {"rgb": mobile_check.phone_rgb(p, server.spec, full=f)}), timed) for mode in rows}
        server_ms = cpu_ms(server.predict, timed)
        floor = noise_floor(bundle, server.variant, photos[:args.timing])

    print(f"CPU: {cpu_name()}; bundle {bundle.name}:{bundle.version}, variant {info['variant']}, "
          f"{info['stages']} of {info['stages_served']} stages; machine shared with other jobs")
    print(f"model.ort {info['size_bytes'] / 1e6:.1f} MB; export-mobile peak RSS {rss / 1e6:.0f} MB")
    print(f"\n| phone decodes the {len(photos)} 4000x3000 JPEGs at | same answer | max abs dp | mean abs dp | "
          "left to the server | stage disagreements | phone CPU ms/photo (decode + graph) |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['label_agreement']:.1%} of {r['compared']} | {r['max_abs_prob_diff']:.2e} | "
              f"{r['mean_abs_prob_diff']:.2e} | {r['left_to_server']} | {r['stage_disagreements']} | "
              f"{phone[mode]:.0f} |")
        for d in r["disagreements"]:
            print(f"|   disagrees: {d['photo']} server {d['server']}, phone {d['phone']} | | | | | | |")
    print(f"\nserver CPU ms/photo (decode to answer, 1 thread): {server_ms:.0f}; "
          f"server vs itself with NCHWc kernels off, max abs dp on {len(timed)} photos: {floor:.2e}")


if __name__ == "__main__":
    main()
