"""The pixel level of the prediction cache: a key that survives re-encoding, and the fingerprint that
proves a key match is the same photo.

The key is an 8x8 luma grid at 16 levels in 3 tables offset by a third of a level (a JPEG re-save moves
block means by a level or two; a value near a boundary in one table is far from it in the others). A
key says nothing about what lies inside its blocks: a block-shuffled mosaic of a photo, or a 1-pixel
checkerboard and flat grey, share one. So a match counts only when the fingerprints agree part by part:
16x16 RGB block means (colour), a 56x56 luma grid (4 px blocks of a 224 crop: layout) and the luma
gradient energy of each 16x16 block (texture: a shuffle raises it, a flat patch has none). Measured in
bench/bench_pixel_key.py: re-saves stay well inside every tolerance, mosaics and distinct photos far out.
"""

from __future__ import annotations

import hashlib

import numpy as np

from food_classifier.preprocessing import PreprocessSpec

KEY_GRID, KEY_BITS, KEY_TABLES = 8, 4, 3  # the pixel key: 8x8 luma, 16 levels, 3 offset tables
# (name, grid, largest mean |diff| in 0..255 levels) of each fingerprint part. Measured over 280 photos
# (bench/bench_pixel_key.py): re-saves at JPEG q95..q60 <= 0.79 / 0.66 / 2.89; mosaics shuffled inside
# the key's blocks 0 / >= 2.99 / >= 6.08; two distinct photos >= 22 / 26 / 3.2 (all parts at once: never).
PRINT_PARTS = (("rgb", 16, 2.0), ("luma", 56, 2.0), ("texture", 16, 4.0))
PRINT_GRID = 16  # the smallest crop side with a fingerprint
ID_BYTES = 16  # a fingerprint's id: pixel entries name the photo's fingerprint entry by it
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def pixel_view(array: np.ndarray, spec: PreprocessSpec) -> tuple[list[str], bytes] | None:
    """(pixel-level keys, fingerprint) of a preprocessed CHW crop; None if the crop is under 16 px."""
    _, h, w = array.shape
    if h < PRINT_GRID or w < PRINT_GRID:
        return None
    scale = np.asarray(spec.std, dtype=np.float32)[:, None, None] * 255
    offset = np.asarray(spec.mean, dtype=np.float32)[:, None, None] * 255
    pixels = array * scale + offset  # back to 0..255
    luma = np.tensordot(LUMA, pixels, axes=1)[None]
    energy = np.zeros_like(luma)  # |d/dx| + |d/dy| of luma at each pixel: how much texture a block has
    energy[:, :, :-1] += np.abs(np.diff(luma, axis=2))
    energy[:, :-1, :] += np.abs(np.diff(luma, axis=1))
    grids = {"rgb": pixels, "luma": luma, "texture": energy}
    fingerprint = b"".join(np.clip(np.rint(_block_mean(grids[name], min(grid, h, w))), 0, 255).astype(np.uint8)
                           .tobytes() for name, grid, _ in PRINT_PARTS)
    coarse = np.tensordot(LUMA, _block_mean(_block_mean(pixels, PRINT_GRID), KEY_GRID), axes=1)
    step = 256 >> KEY_BITS
    levels = [np.floor((coarse + t * step / KEY_TABLES) / step).astype(np.int16) for t in range(KEY_TABLES)]
    keys = [f"p{t}:{hashlib.blake2b(q.tobytes(), digest_size=16).hexdigest()}" for t, q in enumerate(levels)]
    return keys, fingerprint


def fingerprint_id(fingerprint: bytes) -> bytes:
    return hashlib.blake2b(fingerprint, digest_size=ID_BYTES).digest()


def fingerprint_diffs(a: bytes, b: bytes, side: int) -> dict[str, float] | None:
    """Mean |diff| (0..255 levels) of each fingerprint part of two `side`-px crops; None if either is not one."""
    sizes = [(3 if name == "rgb" else 1) * min(grid, side) ** 2 for name, grid, _ in PRINT_PARTS]
    if len(a) != sum(sizes) or len(b) != len(a):
        return None
    ua, ub = np.frombuffer(a, dtype=np.uint8).astype(np.int16), np.frombuffer(b, dtype=np.uint8).astype(np.int16)
    bounds = np.cumsum([0, *sizes])
    return {name: float(np.abs(ua[lo:hi] - ub[lo:hi]).mean())
            for (name, _, _), lo, hi in zip(PRINT_PARTS, bounds[:-1], bounds[1:], strict=True)}


def same_photo(a: bytes, b: bytes, side: int) -> bool:
    """Whether two fingerprints are of one photo (re-encoded, re-uploaded): every part within tolerance."""
    diffs = fingerprint_diffs(a, b, side)
    return diffs is not None and all(diffs[name] <= limit for name, _, limit in PRINT_PARTS)


def _block_mean(a: np.ndarray, grid: int) -> np.ndarray:
    c, h, w = a.shape
    bh, bw = h // grid, w // grid
    return a[:, :bh * grid, :bw * grid].reshape(c, grid, bh, grid, bw).mean(axis=(2, 4))
