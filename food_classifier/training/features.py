"""Frozen-backbone features, computed once and cached on disk.

Why ONNX Runtime here: on this 2-core CPU it runs the backbone ~4x faster than PyTorch eager,
and the backbone graph is exported once per (architecture, weights) and reused by every run.
Cache layout: <cache>/features/<backbone>/<preprocessing>/<views>/<sha256>.npy, one [V, D] array
per image (view 0 = the eval view, 1 = its mirror image, 2.. = seeded augmentations).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from food_classifier import runtime
from food_classifier.preprocessing import PreprocessSpec, normalize, open_image, resize_crop
from food_classifier.training.progress import progress_bar


def cache_dir() -> Path:
    return Path(os.environ.get("FOOD_CLASSIFIER_CACHE", Path.home() / ".cache" / "food_classifier"))


class CacheStats:
    """Which photos `extract` found cached and which it had to compute, since the last `reset` (why: an
    incremental retrain on a grown folder should pay only for the new photos; `train` prints this)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.cached: set[str] = set()
        self.new: set[str] = set()
        self.seconds = 0.0

    def summary(self) -> str | None:
        """E.g. "features: 1,000 cached, 120 new (extracted in 4.2 s)", or None when nothing was extracted."""
        if not self.cached and not self.new:
            return None
        return (f"features: {len(self.cached - self.new):,} cached, {len(self.new):,} new"
                f" (extracted in {self.seconds:.1f} s)")


STATS = CacheStats()

_RNG_LOCK = threading.Lock()  # v2 transforms draw from torch's global RNG: seed + draw must be atomic


def augmenter(spec: PreprocessSpec, strength: float = 1.0) -> v2.Compose:
    """Train-time geometry/colour jitter; normalisation stays the shared `preprocessing.normalize`."""
    j = 0.25 * strength
    return v2.Compose([
        v2.RandomResizedCrop(spec.crop, scale=(max(0.08, 1 - 0.65 * strength), 1.0),
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.02 * strength),
    ])


def load_view(path: str | Path, spec: PreprocessSpec, view: int, aug: v2.Compose | None,
              seed: int | None) -> np.ndarray:
    """View 0 is the eval pipeline and view 1 its mirror image (a free, label-safe second look);
    view k > 1 is an augmentation, reproducible from (seed, file, k) when `seed` is given (cached
    views), else drawn from torch's RNG (DataLoader workers)."""
    img = open_image(path, draft=spec.resize)
    if view == 0 or aug is None:
        return normalize(resize_crop(img, spec), spec)
    if view == 1:
        return normalize(resize_crop(img, spec).transpose(Image.Transpose.FLIP_LEFT_RIGHT), spec)
    # pre-shrink so the random crop works on the same scale as the eval resize
    img = img.resize(_shorter_side(img.size, spec.resize), Image.BICUBIC)
    if seed is None:
        return normalize(aug(img), spec)
    digest = hashlib.sha256(f"{seed}:{Path(path).name}:{view}".encode()).digest()
    with _RNG_LOCK:
        torch.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
        img = aug(img)
    return normalize(img, spec)


def _shorter_side(size: tuple[int, int], target: int) -> tuple[int, int]:
    w, h = size
    s = target / min(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


class _Features(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(image)


def export_onnx(module: nn.Module, path: Path, crop: int, output_name: str | list[str],
                features_dim: int | None = None) -> Path:
    """Dynamo export (FACTS: the legacy exporter keeps run-time padding and is ~50% slower). A list of
    output names names each output of a module that returns a tuple; `features_dim` adds a second input
    `features` [N, features_dim] (a later cascade stage's)."""
    module = module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.onnx")
    batch = torch.export.Dim("batch", min=1, max=4096)
    example, inputs, shapes = (torch.randn(2, 3, crop, crop),), ["image"], ({0: batch},)
    if features_dim is not None:
        example, inputs, shapes = (*example, torch.randn(2, features_dim)), [*inputs, "features"], (*shapes, {0: batch})
    names = [output_name] if isinstance(output_name, str) else output_name
    prog = torch.onnx.export(module, example, input_names=inputs, output_names=names,
                             dynamic_shapes=shapes, dynamo=True, verbose=False)
    prog.save(str(tmp))
    os.replace(tmp, path)
    return path


def backbone_session(model: nn.Module, backbone_key: str, spec: PreprocessSpec, threads: int | None = None):
    """An ONNX Runtime session of the backbone's feature extractor, exported once and cached."""
    path = cache_dir() / "backbones" / f"{backbone_key}-{spec.crop}.onnx"
    if not path.is_file():
        print(f"exporting backbone {backbone_key} to ONNX once (cached at {path})")
        export_onnx(_Features(model), path, spec.crop, "features")
    return runtime.create_session(path, threads)


def extract(rows: list, model: nn.Module, backbone_key: str, spec: PreprocessSpec, views: int = 1,
            aug_strength: float = 1.0, seed: int = 0, batch_size: int = 32) -> np.ndarray:
    """[len(rows), views, D] float32 features, from the cache where present."""
    aug_key = "eval" if views == 1 else f"v{views}-mirror-s{aug_strength:g}-seed{seed}"
    root = cache_dir() / "features" / backbone_key / spec.key / aug_key
    root.mkdir(parents=True, exist_ok=True)
    out: list[np.ndarray | None] = [None] * len(rows)
    todo = []
    for i, r in enumerate(rows):
        f = root / f"{r.sha256}.npy"
        if f.is_file():
            out[i] = np.load(f)
            STATS.cached.add(r.sha256)
        else:
            todo.append(i)
    if todo:
        sess = backbone_session(model, backbone_key, spec)  # a one-off ONNX export is not extraction time
        t0 = time.perf_counter()
        aug = augmenter(spec, aug_strength) if views > 1 else None
        jobs = [(i, v) for i in todo for v in range(views)]
        with progress_bar(total=len(jobs), desc=f"features ({aug_key})", unit="img", leave=False) as bar:
            vecs = np.concatenate(runtime.map_batched(
                jobs, lambda iv: load_view(rows[iv[0]].path, spec, iv[1], aug, seed),
                lambda x: runtime.run(sess, x), batch_size, progress=bar.update))
        feats: dict[int, list] = {i: [None] * views for i in todo}
        for (i, v), vec in zip(jobs, vecs, strict=True):
            feats[i][v] = vec
        for i in todo:
            arr = np.stack(feats[i]).astype(np.float32)
            tmp = root / f".{rows[i].sha256}.{os.getpid()}.npy"
            np.save(tmp, arr)
            os.replace(tmp, root / f"{rows[i].sha256}.npy")
            out[i] = arr
            STATS.new.add(rows[i].sha256)
        STATS.seconds += time.perf_counter() - t0
    return np.stack(out)
