"""Export a fitted model to ONNX, check the graph against PyTorch, describe it as a bundle.

    bundle = export_model(fitted, name)   # <run>/model.onnx + an in-memory Bundle over the run dir

The returned `Bundle` is a view, not a directory: its metadata lives in memory and its variant
files in the run dir, so evaluation, calibration and quantization run on the exact graph that will
be served before anything is published (publish.py writes the bundle, once).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from food_classifier import runtime
from food_classifier.bundle import Bundle, BundleMeta, file_sha256
from food_classifier.inference import softmax
from food_classifier.preprocessing import PreprocessSpec, preprocess
from food_classifier.training import runs
from food_classifier.training.data import manifest_sha256, read_manifest
from food_classifier.training.features import export_onnx
from food_classifier.training.train import Fitted

PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported graph disagrees with PyTorch: never publish such a bundle."""


def parity_images(manifest: str | Path, n: int = 32) -> list[Path]:
    rows = read_manifest(manifest)
    test = [r.path for r in rows if r.tier == "test"] or [r.path for r in rows]
    step = max(1, len(test) // n)
    return test[::step][:n]


def check_parity(model: torch.nn.Module, onnx_path: Path, images: list[Path], spec: PreprocessSpec) -> dict:
    """Same real images through PyTorch and ONNX Runtime: max |delta prob| and top-1 agreement."""
    x = np.stack([preprocess(p, spec) for p in images])
    with torch.inference_mode():
        ref = softmax(model.eval()(torch.from_numpy(x)).numpy())
    got = softmax(runtime.run(runtime.create_session(onnx_path), x))
    return {"n_images": len(images), "max_abs_prob_diff": float(np.abs(ref - got).max()),
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()), "tolerance": PARITY_TOLERANCE}


def export_model(fitted: Fitted, name: str = "food") -> Bundle:
    """Write `<run>/model.onnx`, check it against PyTorch (parity.json), return the bundle view."""
    meta, run = fitted.meta, fitted.dir
    spec = meta.preprocessing
    onnx_path = run / runs.FP32_ONNX
    export_onnx(fitted.model, onnx_path, spec.crop, "logits")
    parity = check_parity(fitted.model, onnx_path, parity_images(meta.manifest), spec)
    runs.write_json(run, runs.PARITY, parity)
    if parity["max_abs_prob_diff"] >= PARITY_TOLERANCE or parity["top1_agreement"] < 1.0:
        raise ExportError(f"ONNX Runtime disagrees with PyTorch: {parity}")
    digest = file_sha256(onnx_path)
    now = datetime.now(UTC)
    bundle_meta = BundleMeta.model_validate({
        "name": name,
        "version": f"{now.strftime('%Y%m%dT%H%M%S')}-{meta.arch.replace('+', '_')}-{digest[:8]}",
        "created_at": now.isoformat(),
        "arch": meta.arch,
        "labels": meta.labels,
        "preprocessing": spec.to_dict(),
        "input": {"name": "image", "shape": ["N", 3, spec.crop, spec.crop], "dtype": "float32"},
        "output": {"name": "logits", "softmax": "apply in client, after dividing by calibration.temperature"},
        "variants": {"fp32": {"file": runs.FP32_ONNX, "sha256": digest}},
        "calibration": {"temperature": 1.0, "fitted": False},
        "abstention": {"threshold": None},
        "training": fitted.meta.to_dict()["config"] | {"train_seconds": meta.train_seconds,
                                                       "fit_tiers": meta.fit_tiers},
        "dataset": {"manifest": meta.manifest, "manifest_sha256": manifest_sha256(meta.manifest)},
        "parity": parity,
        "metrics": {},
    })
    return Bundle(path=run, meta=bundle_meta)
