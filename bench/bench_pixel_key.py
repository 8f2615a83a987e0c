"""How often does a re-encoded photo hit the pixel level? The measurement behind the pixel key in cache.py.

For each Food-101 photo: the original bytes, the same JPEG stream with other metadata (a COM segment),
and re-saves at JPEG quality 95/90/75/60. A candidate key "hits" when the variant's key equals the
original's (for the chosen key: any of its tables, and the fingerprint check passes). Also counts
distinct photos that share a key (slot collisions) and that would be served another photo's answer
(false hits: must be 0), and adversarial pairs built to share a photo's key exactly: its crop with the
pixels of every 14x14 key block shuffled (a mosaic: same block means, another picture), and a 1-pixel
black/white checkerboard against flat grey (false hits: must be 0).

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

from food_classifier.cache_pixels import PRINT_PARTS, fingerprint_diffs, pixel_view, same_photo  # noqa: E402
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


def crop_u8(array: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The preprocessed crop back as an HWC uint8 picture."""
    u8 = array * (np.asarray(spec.std, np.float32)[:, None, None] * 255) + np.asarray(spec.mean)[:, None, None] * 255
    return np.clip(np.rint(u8), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def as_upload(crop: np.ndarray, spec: PreprocessSpec) -> bytes:
    """A PNG whose preprocessed crop is exactly `crop` (a resize-sized square: the crop is then a copy)."""
    pad = (spec.resize - spec.crop) // 2
    canvas = np.zeros((spec.resize, spec.resize, 3), dtype=np.uint8)
    canvas[pad:pad + spec.crop, pad:pad + spec.crop] = crop
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, "PNG")
    return buf.getvalue()


def mosaic(crop: np.ndarray, block: int, rng: np.random.Generator) -> np.ndarray:
    """Every `block` x `block` tile's pixels shuffled: the same block means, a different picture."""
    out = crop.copy()
    for i in range(0, crop.shape[0] - block + 1, block):
        for j in range(0, crop.shape[1] - block + 1, block):
            tile = out[i:i + block, j:j + block].reshape(-1, 3)
            out[i:i + block, j:j + block] = tile[rng.permutation(len(tile))].reshape(block, block, 3)
    return out


def worst(diffs: list[dict[str, float]], pick: type[max] | type[min]) -> str:
    return ", ".join(f"{name} {pick(d[name] for d in diffs):.2f}" for name, _, _ in PRINT_PARTS)


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
    resaves: list[dict[str, float]] = []
    mosaics: list[dict[str, float]] = []
    mosaic_keys = mosaic_false = 0
    rng = np.random.default_rng(0)
    block = spec.crop // 16  # the key's block: its means are all the key and the colour part see
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
            resaves.append(fingerprint_diffs(fp, yfp, spec.crop))
            hits[names[-2]][vname] += ykeys[0] == keys[0]
            hits[names[-1]][vname] += any(a == b for a, b in zip(ykeys, keys, strict=True)) and \
                same_photo(fp, yfp, spec.crop)
        crop = crop_u8(x, spec)
        mkeys, mfp = chosen(preprocess(as_upload(mosaic(crop, block, rng), spec), spec), spec)
        okeys, ofp = chosen(preprocess(as_upload(crop, spec), spec), spec)
        mosaic_keys += mkeys == okeys
        mosaic_false += any(a == b for a, b in zip(mkeys, okeys, strict=True)) and same_photo(ofp, mfp, spec.crop)
        mosaics.append(fingerprint_diffs(ofp, mfp, spec.crop))
    grey = np.full((spec.crop, spec.crop, 3), 127, dtype=np.uint8)  # block means 127 vs the board's 127.5
    board = np.where((np.indices((spec.crop, spec.crop)).sum(axis=0) % 2)[..., None] == 1, 255, 0).astype(np.uint8)
    (gkeys, gfp), (ckeys, cfp) = (chosen(preprocess(as_upload(im, spec), spec), spec) for im in (grey, board))
    board_false = any(a == b for a, b in zip(gkeys, ckeys, strict=True)) and same_photo(gfp, cfp, spec.crop)
    shared, false_hits = 0, 0
    views = [chosen(preprocess(f.read_bytes(), spec), spec) for f in every]
    tables: list[dict[str, int]] = [{} for _ in views[0][0]]
    for i, (keys, fp) in enumerate(views):
        for table, key in zip(tables, keys, strict=True):
            j = table.setdefault(key, i)
            if j != i:
                shared += 1
                false_hits += same_photo(views[j][1], fp, spec.crop)
    n = len(files)
    distinct = [fingerprint_diffs(originals[i][1], originals[j][1], spec.crop)
                for i in range(n) for j in range(i + 1, min(n, i + 40))]
    print(f"{n} photos from {DATA.name}, preprocessing resize {spec.resize} crop {spec.crop}; fingerprint "
          f"{len(originals[0][1])} bytes (" + ", ".join(f"{p} {g}x{g}" for p, g, _ in PRINT_PARTS) + ")\n")
    print("| pixel key | other metadata | " + " | ".join(f"JPEG q{q}" for q in QUALITIES) + " |")
    print("|---|---|" + "---|" * len(QUALITIES))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{100 * h / n:.1f} %" for h in hits[name].values()) + " |")
    print(f"\nchosen key over all {len(every)} photos: {shared} table slots shared by distinct photos, "
          f"{false_hits} false hits (a photo served another's answer)")
    print(f"adversarial: {mosaic_keys}/{n} block-shuffled mosaics share their photo's keys exactly, "
          f"{mosaic_false} false hits; checkerboard vs flat grey: keys equal {gkeys == ckeys}, "
          f"false hit {bool(board_false)}")
    print("fingerprint mean |diff| (levels), per part; a hit needs every part within "
          + ", ".join(f"{p} <= {t}" for p, _, t in PRINT_PARTS))
    print(f"  largest for a re-encoded photo: {worst(resaves, max)}")
    print(f"  smallest for a block-shuffled mosaic: {worst(mosaics, min)}")
    print(f"  smallest between two distinct photos (sample neighbours): {worst(distinct, min)}")


if __name__ == "__main__":
    main()
