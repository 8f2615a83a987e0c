"""Export a run to a model bundle (ONNX + metadata), check it against PyTorch, publish it.

    bundle = export(run)                    # runs/<run>/bundle, with the parity check stored
    publish(bundle, "models")               # models/<name>/<version>, atomically
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from food_classifier.bundle import META_FILE, file_sha256, load_bundle, write_bundle
from food_classifier.inference import softmax
from food_classifier.preprocessing import PreprocessSpec, preprocess
from food_classifier.training.data import manifest_sha256, read_manifest
from food_classifier.training.features import export_onnx
from food_classifier.training.train import load_checkpoint

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
    import onnxruntime as ort

    x = np.stack([preprocess(p, spec) for p in images])
    with torch.inference_mode():
        ref = softmax(model.eval()(torch.from_numpy(x)).numpy())
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = softmax(sess.run(None, {"image": x})[0])
    return {"n_images": len(images), "max_abs_prob_diff": float(np.abs(ref - got).max()),
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()), "tolerance": PARITY_TOLERANCE}


def export(run: str | Path, name: str = "food") -> Path:
    """Write `<run>/bundle` (atomically) from the run's best checkpoint; returns the bundle dir."""
    run = Path(run)
    model, meta = load_checkpoint(run)
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    manifest = Path(meta["manifest"])
    onnx_tmp = run / "model.onnx"
    export_onnx(model, onnx_tmp, spec.crop, "logits")
    parity = check_parity(model, onnx_tmp, parity_images(manifest), spec)
    (run / "parity.json").write_text(json.dumps(parity, indent=2))
    if parity["max_abs_prob_diff"] >= PARITY_TOLERANCE or parity["top1_agreement"] < 1.0:
        raise ExportError(f"ONNX Runtime disagrees with PyTorch: {parity}")
    digest = file_sha256(onnx_tmp)
    now = datetime.now(UTC)
    bundle_meta = {
        "name": name,
        "version": f"{now.strftime('%Y%m%dT%H%M%S')}-{meta['arch'].replace('+', '_')}-{digest[:8]}",
        "created_at": now.isoformat(),
        "arch": meta["arch"],
        "labels": meta["labels"],
        "preprocessing": meta["preprocessing"],
        "input": {"name": "image", "shape": ["N", 3, spec.crop, spec.crop], "dtype": "float32"},
        "output": {"name": "logits", "softmax": "apply in client, after dividing by calibration.temperature"},
        "variants": {"fp32": {"file": "model.onnx", "sha256": digest}},
        "calibration": {"temperature": 1.0, "fitted": False},
        "abstention": {"threshold": None},
        "training": meta["config"] | {"train_seconds": meta.get("train_seconds"),
                                      "fit_tiers": meta.get("fit_tiers", ["train"])},
        "dataset": {"manifest": meta["manifest"], "manifest_sha256": manifest_sha256(manifest)},
        "parity": parity,
        "metrics": {},
    }
    target = run / "bundle"
    if target.exists():
        shutil.rmtree(target)
    write_bundle(target, bundle_meta, lambda d: shutil.move(str(onnx_tmp), d / "model.onnx"))
    return target


def publish(bundle: str | Path, models_dir: str | Path = "models") -> Path:
    """Copy a finished bundle to `<models_dir>/<name>/<version>` in one rename (servers may be watching)."""
    b = load_bundle(bundle)
    target = Path(models_dir) / b.name / b.version

    def copy(d: Path) -> None:
        for f in b.path.iterdir():
            if f.is_file() and f.name not in (META_FILE, "labels.txt"):  # not a killed step's .tmp-* dir
                shutil.copy2(f, d / f.name)

    return write_bundle(target, b.meta, copy)

