"""How often does a re-encoded photo hit the pixel level? The measurement behind the pixel key in cache.py.

For each Food-101 photo: the original bytes, the same JPEG stream with other metadata (a COM segment),
and re-saves at JPEG quality 95/90/75/60. A candidate key "hits" when the variant's key equals the
original's (for the chosen key: any of its tables, and the fingerprint check passes). Also counts
distinct photos that share a key (slot collisions) and that would be served another photo's answer
(false hits: must be 0).

    python bench/bench_pixel_key.py [--photos 280] [--crop 224 --resize 256]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from food_classifier.cache import PRINT_BYTES, PRINT_MAX_DIFF, _verified, pixel_view  # noqa: E402
from food_classifier.preprocessing import PreprocessSpec, preprocess  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "food101_mini3"
QUALITIES = (95, 90, 75, 60)


def variants(data: bytes) -> dict[str, bytes]:
    text = b"re-uploaded"
    out = {"metadata": data[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + data[2:]}
    img = Image.open(io.BytesIO(data))
    for q in QUALITIES:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=q)
        out[f"q{q}"] = buf.getvalue()
    return out


def quantised(array: np.ndarray, spec: PreprocessSpec, bits: int) -> str:
    """The crop itself back in 0..255, keeping `bits` bits per value (8 = the exact crop)."""
    u8 = array * (np.asarray(spec.std, np.float32)[:, None, None] * 255) + np.asarray(spec.mean)[:, None, None] * 255
    q = np.clip(np.rint(u8), 0, 255).astype(np.uint8) >> (8 - bits)
    return hashlib.blake2b(q.tobytes(), digest_size=16).hexdigest()


def chosen(array: np.ndarray, spec: PreprocessSpec) -> tuple[list[str], bytes]:
    keys, fingerprint = pixel_view(array, spec)
    return keys, fingerprint


def _u8(fingerprint: bytes) -> np.ndarray:
    return np.frombuffer(fingerprint, dtype=np.uint8).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=280)
    ap.add_argument("--resize", type=int, default=256)
    ap.add_argument("--crop", type=int, default=224)
    args = ap.parse_args()
    spec = PreprocessSpec(resize=args.resize, crop=args.crop)
    every = sorted(DATA.glob("*/*.jpg"))
    files = every[::max(1, len(every) // args.photos)][:args.photos]
    candidates = {f"crop, {b} bits": b for b in (8, 6, 4)}
    names = [*candidates, "8x8 luma, 16 levels, 1 table", "chosen: 3 tables + fingerprint"]
    hits = {n: {v: 0 for v in ["metadata", *(f"q{q}" for q in QUALITIES)]} for n in names}
    originals: list[tuple[list[str], bytes]] = []  # of the sample; collisions are counted over every photo
    fake = np.zeros(1, dtype="<f4").tobytes()  # a one-class "answer": only the fingerprint matters here
    resave_diff = 0.0
    for f in files:
        data = f.read_bytes()
        x = preprocess(data, spec)
        keys, fp = chosen(x, spec)
        originals.append((keys, fp))
        for vname, vdata in variants(data).items():
            y = preprocess(vdata, spec)
            for n, bits in candidates.items():
                hits[n][vname] += quantised(x, spec, bits) == quantised(y, spec, bits)
            ykeys, yfp = chosen(y, spec)
            resave_diff = max(resave_diff, float(np.abs(_u8(yfp) - _u8(fp)).mean()))
            hits[names[-2]][vname] += ykeys[0] == keys[0]
            hits[names[-1]][vname] += any(a == b for a, b in zip(ykeys, keys, strict=True)) and \
                _verified(fp + fake, yfp, 1) is not None
    shared, false_hits = 0, 0
    views = [chosen(preprocess(f.read_bytes(), spec), spec) for f in every]
    tables: list[dict[str, int]] = [{} for _ in views[0][0]]
    for i, (keys, fp) in enumerate(views):
        for table, key in zip(tables, keys, strict=True):
            j = table.setdefault(key, i)
            if j != i:
                shared += 1
                false_hits += _verified(views[j][1] + fake, fp, 1) is not None
    n = len(files)
    prints = np.stack([_u8(fp) for _, fp in originals])
    nearest = min(float(np.abs(prints[i + 1:] - prints[i]).mean(axis=1).min()) for i in range(n - 1))
    print(f"{n} photos from {DATA.name}, preprocessing resize {spec.resize} crop {spec.crop}; fingerprint "
          f"{PRINT_BYTES} bytes\n")
    print("| pixel key | other metadata | " + " | ".join(f"JPEG q{q}" for q in QUALITIES) + " |")
    print("|---|---|" + "---|" * len(QUALITIES))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{100 * h / n:.1f} %" for h in hits[name].values()) + " |")
    print(f"\nchosen key over all {len(every)} photos: {shared} table slots shared by distinct photos, "
          f"{false_hits} false hits (a photo served another's answer)")
    print(f"fingerprint mean |diff| (levels): largest for a re-encoded photo {resave_diff:.2f}, "
          f"smallest between two distinct photos {nearest:.2f}; a hit needs <= {PRINT_MAX_DIFF}")


if __name__ == "__main__":
    main()
