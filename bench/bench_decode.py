"""JPEG decode + resize to the model input, per decoder, and a 4000x3000 photo end to end.

CPU ms per image (time.process_time, one thread, best of --repeats passes) of bytes -> the model's
float32 input tensor (decode, resize shorter side + centre crop, normalize), for
(a) ~100 of the shared 512 px Food-101 photos and
(b) 4000x3000 JPEGs made here by upscaling real food photos (bicubic, quality 90, 4:2:0), plain and
    with added grain: an upscaled photo is smoother than a phone's and makes a smaller file; grain
    (--grain std 4: ~1.8 MB, 10: ~3.6 MB) brings it toward a phone's 2-5 MB, and Huffman decoding costs
    by the byte.
Decoders: Pillow without draft; Pillow with `draft` (today's `preprocessing.preprocess`); simplejpeg and
PyTurboJPEG (libjpeg-turbo DCT-domain scaling) at the same 1/2^n scale as Pillow's draft and at the
smallest M/8 scale that keeps the shorter side >= resize; pillow-simd's Pillow rows from another
venv (--simd-python). A decoder that is not installed is skipped with a note.
Pixels: max/mean |diff| of the final tensor against today's pipeline on the 512 px photos.
End to end: `Classifier.predict` (built-in model, ORT 1 thread) on the same photos at 512 px and at
4000x3000; target (issue 14): 4000x3000 <= 2x the 512 px photo.

    python bench/bench_decode.py [--photos 100] [--big 8] [--repeats 3] [--simd-python /tmp/simd/bin/python]
                                 [--bundle DIR --variant int8]   # end to end with another bundle
"""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from food_classifier.preprocessing import PreprocessSpec, normalize, open_image, preprocess, resize_crop  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets" / "food101_mini3"
Decoder = Callable[[bytes, PreprocessSpec], np.ndarray]
CURRENT = "Pillow + draft (today)"


def pillow_nodraft(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    return normalize(resize_crop(open_image(data), spec), spec)


def pillow_draft(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    return preprocess(data, spec)


def pow2_factor(w: int, h: int, resize: int) -> int:
    """The scale Pillow's draft picks: the largest of 8/4/2/1 that keeps both sides >= resize."""
    scale = min(w // resize, h // resize)
    return next((s for s in (8, 4, 2, 1) if scale >= s), 1)


def from_array(arr: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    return normalize(resize_crop(Image.fromarray(arr), spec), spec)


def optional_decoders() -> tuple[dict[str, Decoder], list[str]]:
    """simplejpeg / PyTurboJPEG rows, or a note for each one that is missing."""
    decoders: dict[str, Decoder] = {}
    notes = []
    try:
        import simplejpeg
    except ImportError:
        notes.append("simplejpeg not installed: skipped (pip install simplejpeg)")
    else:
        def sj_pow2(data: bytes, spec: PreprocessSpec) -> np.ndarray:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            s = pow2_factor(w, h, spec.resize)
            return from_array(simplejpeg.decode_jpeg(data, "RGB", min_height=-(-h // s), min_width=-(-w // s)), spec)

        def sj_m8(data: bytes, spec: PreprocessSpec) -> np.ndarray:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            side = min(spec.resize, w, h)  # never upscale a photo smaller than `resize`
            return from_array(simplejpeg.decode_jpeg(data, "RGB", min_height=side, min_width=side), spec)

        decoders[f"simplejpeg {simplejpeg.__version__}, 1/2^n (= draft)"] = sj_pow2
        decoders[f"simplejpeg {simplejpeg.__version__}, M/8"] = sj_m8
    try:
        import turbojpeg
        tj = turbojpeg.TurboJPEG()
    except (ImportError, RuntimeError, OSError) as e:  # OSError/RuntimeError: no usable libturbojpeg
        notes.append(f"PyTurboJPEG unusable: skipped ({str(e).splitlines()[0]}); "
                     "needs libturbojpeg (Debian 12: apt-get install libturbojpeg0, 2.1 -> PyTurboJPEG<2)")
    else:
        down = sorted((f for f in tj.scaling_factors if f[0] <= f[1]), key=lambda f: f[0] / f[1])

        def tj_decode(data: bytes, spec: PreprocessSpec, pow2: bool) -> np.ndarray:
            w, h, _, _ = tj.decode_header(data)
            if pow2:
                factor = (1, pow2_factor(w, h, spec.resize))
            else:  # the smallest output whose both sides stay >= resize
                factor = next(f for f in down if min(math.ceil(w * f[0] / f[1]), math.ceil(h * f[0] / f[1]))
                              >= min(spec.resize, w, h))
            return from_array(tj.decode(data, turbojpeg.TJPF_RGB, scaling_factor=factor), spec)

        decoders[f"PyTurboJPEG {turbojpeg.__version__}, 1/2^n (= draft)"] = lambda d, s: tj_decode(d, s, True)
        decoders[f"PyTurboJPEG {turbojpeg.__version__}, M/8"] = lambda d, s: tj_decode(d, s, False)
    return decoders, notes


def cpu_ms(fn: Callable[[bytes], object], items: list[bytes], repeats: int) -> float:
    """Best pass of CPU ms per item (a pass = every item once), after a short warm-up."""
    for data in items[:3]:
        fn(data)
    best = math.inf
    for _ in range(repeats):
        t = time.process_time()
        for data in items:
            fn(data)
        best = min(best, (time.process_time() - t) / len(items) * 1000)
    return best


def pick_photos(n: int) -> list[Path]:
    files = sorted(SHARED.glob("*/*.jpg"))
    if not files:
        sys.exit(f"no photos in {SHARED}")
    step = max(1, len(files) // n)
    return files[::step][:n]


def phone_size(path: Path, grain: float, seed: int) -> bytes:
    """A real photo, centre-cropped to 4:3, upscaled to 4000x3000 (bicubic), optional Gaussian grain,
    JPEG quality 90."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    cw, ch = (w, w * 3 // 4) if w * 3 <= h * 4 else (h * 4 // 3, h)
    box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    big = img.resize((4000, 3000), Image.BICUBIC, box=box)
    if grain:
        a = np.asarray(big, dtype=np.float32)
        a += np.random.default_rng(seed).normal(0, grain, a.shape).astype(np.float32)
        big = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def worker(args: argparse.Namespace) -> None:
    """Run by --simd-python's interpreter: Pillow rows only, timings as JSON, 512 px tensors to an npz."""
    import PIL
    job = json.loads(Path(args.worker).read_text())
    spec = PreprocessSpec(**job["spec"])
    sets = {k: [Path(p).read_bytes() for p in v] for k, v in job["sets"].items()}
    out = {"version": PIL.__version__, "ms": {}}
    for name, fn in (("nodraft", pillow_nodraft), ("draft", pillow_draft)):
        out["ms"][name] = {k: cpu_ms(lambda d, fn=fn: fn(d, spec), v, job["repeats"]) for k, v in sets.items()}
        np.save(Path(job["out"]) / f"{name}.npy", np.stack([fn(d, spec) for d in sets["512"]]))
    print(json.dumps(out))


def run_simd(python: str, spec: PreprocessSpec, set_files: dict[str, list[Path]], repeats: int,
             tmp: Path) -> tuple[dict, dict[str, np.ndarray]] | str:
    """pillow-simd's rows from its own venv, or why there are none."""
    job = tmp / "job.json"
    job.write_text(json.dumps({"spec": {"resize": spec.resize, "crop": spec.crop, "interpolation": spec.interpolation,
                                        "mean": list(spec.mean), "std": list(spec.std)},
                               "sets": {k: [str(p) for p in v] for k, v in set_files.items()},
                               "repeats": repeats, "out": str(tmp)}))
    r = subprocess.run([python, __file__, "--worker", str(job)], capture_output=True, text=True)
    if r.returncode:
        return f"pillow-simd run failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "post" not in res["version"]:
        return f"{python} has Pillow {res['version']}, not pillow-simd: skipped"
    return res, {k: np.load(tmp / f"{k}.npy") for k in ("nodraft", "draft")}


def cpu_flags() -> str:
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
        model = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"
    simd = sorted(f for f in set(flags) if f == "avx2" or f.startswith("avx512"))
    return f"{model.split(':', 1)[1].strip()}; {' '.join(simd) or 'no AVX2/AVX-512'}"


def diff_row(ref: np.ndarray, got: np.ndarray) -> str:
    d = np.abs(got.astype(np.float64) - ref)
    same = int(sum(np.array_equal(a, b) for a, b in zip(ref, got, strict=True)))
    return f"{d.max():.4f} | {d.mean():.5f} | {same}/{len(ref)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=100, help="512 px photos (spread over the shared set)")
    ap.add_argument("--big", type=int, default=8, help="4000x3000 photos per kind (plain, grain)")
    ap.add_argument("--grain", type=float, default=4.0, help="std of the grain added to the second 4000x3000 set")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--simd-python", help="python of a venv with pillow-simd (optional)")
    ap.add_argument("--bundle", help="bundle for the end-to-end rows (default: the built-in model)")
    ap.add_argument("--variant", default="fp32")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from food_classifier.builtin import builtin_bundle_path
    from food_classifier.inference import Classifier
    clf = Classifier(args.bundle or builtin_bundle_path(), threads=1, variant=args.variant)
    spec = clf.spec
    print(f"# JPEG decode + resize to the model input ({spec.resize} -> {spec.crop} px, {spec.interpolation})")
    print(f"CPU: {cpu_flags()}; Pillow {Image.__version__}; single thread, time.process_time, "
          f"best of {args.repeats} passes")
    photos = pick_photos(args.photos)
    small = [p.read_bytes() for p in photos]
    sources = photos[:args.big]
    sets = {"512": small, "4000x3000": [phone_size(p, 0, i) for i, p in enumerate(sources)],
            "4000x3000 grain": [phone_size(p, args.grain, i) for i, p in enumerate(sources)]}
    kb = {k: np.mean([len(d) for d in v]) / 1024 for k, v in sets.items()}
    print(f"(a) {len(small)} shared Food-101 photos, longest side 512, mean {kb['512']:.0f} KB")
    print(f"(b) {len(sources)} of them upscaled to 4000x3000 (bicubic) and saved at JPEG quality 90, "
          f"mean {kb['4000x3000'] / 1024:.2f} MB; the same + Gaussian grain std {args.grain:g}: "
          f"mean {kb['4000x3000 grain'] / 1024:.2f} MB (real phone photos: 2-5 MB)")

    decoders: dict[str, Decoder] = {"Pillow, no draft": pillow_nodraft, CURRENT: pillow_draft}
    extra, notes = optional_decoders()
    decoders.update(extra)
    ms = {name: {k: cpu_ms(lambda d, fn=fn: fn(d, spec), v, args.repeats) for k, v in sets.items()}
          for name, fn in decoders.items()}
    tensors = {name: np.stack([fn(d, spec) for d in small]) for name, fn in decoders.items()}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        if args.simd_python:
            files = {"512": photos}
            for k in ("4000x3000", "4000x3000 grain"):
                files[k] = [tmp / f"{k.replace(' ', '_')}_{i}.jpg" for i in range(len(sources))]
                for f, d in zip(files[k], sets[k], strict=True):
                    f.write_bytes(d)
            simd = run_simd(args.simd_python, spec, files, args.repeats, tmp)
            if isinstance(simd, str):
                notes.append(simd)
            else:
                res, arrays = simd
                for key, label in (("nodraft", "no draft"), ("draft", "+ draft")):
                    name = f"pillow-simd {res['version']}, {label}"
                    ms[name], tensors[name] = res["ms"][key], arrays[key]
        else:
            notes.append("pillow-simd: not measured (pass --simd-python PATH of a venv with pillow-simd)")
    for note in notes:
        print(f"note: {note}")

    base = ms[CURRENT]
    print("\n| decoder | 512 px ms | 4000x3000 ms | 4000x3000 grain ms | x faster than today (512 / 4000 / grain) "
          "| tensor max abs diff | mean abs diff | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in ms.items():
        speed = " / ".join(f"{base[k] / row[k]:.2f}" for k in sets)
        print(f"| {name} | {row['512']:.2f} | {row['4000x3000']:.1f} | {row['4000x3000 grain']:.1f} | {speed} | "
              f"{diff_row(tensors[CURRENT], tensors[name])} |")

    print(f"\ntoday's decode+resize, 4000x3000 / 512 px: {base['4000x3000'] / base['512']:.1f}x plain, "
          f"{base['4000x3000 grain'] / base['512']:.1f}x with grain")

    # End to end through the prediction core, on the same photos at both sizes
    e2e = {k: cpu_ms(clf.predict, v if k != "512" else small[:len(sources)], args.repeats) for k, v in sets.items()}
    model = cpu_ms(lambda x: clf.predict_proba(x[None]), list(tensors[CURRENT][:len(sources)]), args.repeats)
    print(f"\n## End to end: Classifier.predict, model {clf.name} ({clf.variant}, ORT 1 thread), "
          f"the same {len(sources)} photos")
    print("| decoder | 512 px ms | 4000x3000 ms | ratio | 4000x3000 grain ms | ratio | target |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {CURRENT} (Classifier.predict) | {e2e['512']:.2f} | {e2e['4000x3000']:.1f} | "
          f"{e2e['4000x3000'] / e2e['512']:.2f} | {e2e['4000x3000 grain']:.1f} | "
          f"{e2e['4000x3000 grain'] / e2e['512']:.2f} | <= 2 |")
    speedups = []
    for name, fn in extra.items():
        def pred(d: bytes, fn: Decoder = fn) -> object:
            return clf.decide(clf.predict_proba(fn(d, spec)[None]))[0]
        row = {k: cpu_ms(pred, v if k != "512" else small[:len(sources)], args.repeats) for k, v in sets.items()}
        print(f"| {name} (same core, its decode) | {row['512']:.2f} | {row['4000x3000']:.1f} | "
              f"{row['4000x3000'] / row['512']:.2f} | {row['4000x3000 grain']:.1f} | "
              f"{row['4000x3000 grain'] / row['512']:.2f} | <= 2 |")
        speedups.append(f"{name}: " + " / ".join(f"{e2e[k] / row[k]:.2f}" for k in sets))
    print(f"\nmodel alone (predict_proba on a ready tensor, 1 thread): {model:.2f} ms")
    if speedups:
        print("end-to-end x faster than today (512 / 4000x3000 / grain); >= 1.3 would be worth a retrain:")
        for line in speedups:
            print(f"  {line}")

if __name__ == "__main__":
    main()
