"""Phone-ready files from a bundle: ONNX Runtime Mobile (`.ort`) models + everything an app needs.

    export_mobile("models/food", "mobile/")   # model.ort, model.int8.ort, required_operators.config,
                                               # labels.txt, preprocessing.json, mobile.json

The `.ort` files come from ONNX Runtime's own converter (`onnxruntime.tools.convert_onnx_models_to_ort`,
optimisations fixed for ARM: no x86-only NCHWc kernels); `required_operators.config` lists the
operators of both variants, for a reduced ONNX Runtime build (`--include_ops_by_config`). Nothing is
written unless the `.ort` files, run here with the Python ONNX Runtime on the same images, agree with
the bundle's ONNX graphs: fp32 same top-1 on every image and max |delta prob| <= 1e-4, int8 same top-1
on >= 99 %. docs/MOBILE.md shows the Kotlin and Swift code that reproduces `preprocessing.json`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from food_classifier import runtime
from food_classifier.bundle import Bundle, BundleError, load_newest
from food_classifier.inference import Classifier
from food_classifier.preprocessing import ImageError

FP32_TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.99
N_IMAGES = 32
ORT_FILES = {"fp32": "model.ort", "int8": "model.int8.ort"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class MobileExportError(BundleError):
    """The bundle cannot be converted, or its .ort files disagree with it."""


def mobile_preprocessing(bundle: Bundle) -> dict:
    """Everything a phone needs to turn a photo into the model input, spelled out (no defaults)."""
    s = bundle.preprocessing
    kind = bundle.meta.output.kind if bundle.meta.output else "logits"
    return {
        "steps": ["decode, apply EXIF orientation, convert to RGB (transparency on white)",
                  f"resize the shorter side to {s.resize} px ({s.interpolation}) and take the centre "
                  f"{s.crop}x{s.crop} square",
                  "x = (pixel / 255 * scale - mean[c]) / std[c] per RGB channel",
                  f"lay out as {s.layout}: [1, {', '.join(map(str, s.input_shape))}] float32"],
        "resize": s.resize, "crop": s.crop, "interpolation": s.interpolation,
        "mean": list(s.mean), "std": list(s.std), "scale": s.scale, "layout": s.layout, "channel_order": "RGB",
        "input": {"name": bundle.meta.input_name, "shape": ["N", *s.input_shape],
                  "dtype": "float32"},
        "output": {"kind": kind, "classes": len(bundle.labels),
                   "to_probabilities": ("softmax(logits / temperature)" if kind == "logits"
                                        else "softmax(log(probs) / temperature)")},
        "temperature": bundle.temperature,
        "abstain_below": bundle.abstain_threshold,
    }


def check_images_from(folder: Path | None, bundle: Bundle) -> list[Path]:
    """Up to N_IMAGES real photos spread over the folder (or the bundle's test tier when none is given)."""
    paths: list[Path] = []
    if folder is not None:
        if not folder.is_dir():
            raise MobileExportError(f"--check: no such folder: {folder}")
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    else:
        manifest = Path(bundle.meta.dataset.manifest or "") if bundle.meta.dataset else None
        if manifest and manifest.is_file():
            import csv

            with open(manifest, newline="") as f:
                rows = list(csv.DictReader(f))
            paths = [Path(r["path"]) for r in rows if r.get("tier") == "test" and Path(r["path"]).is_file()]
    if not paths:
        raise MobileExportError("no photos for the parity check: pass --check DIR (a folder of real photos)")
    step = max(1, len(paths) // N_IMAGES)
    return paths[::step][:N_IMAGES]


def convert(models: dict[str, Path], out_dir: Path) -> None:
    """Run ONNX Runtime's converter on the variants (named as in ORT_FILES) into out_dir."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory(prefix="fc-ort-src-") as src:
        for variant, path in models.items():
            shutil.copyfile(path, Path(src) / ORT_FILES[variant].replace(".ort", ".onnx"))
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):  # it prints a line per step
                convert_onnx_models_to_ort(Path(src), output_dir=out_dir,
                                           optimization_styles=[OptimizationStyle.Fixed], target_platform="arm")
        except Exception as e:  # the converter raises plain Exceptions and ORT errors
            raise MobileExportError(f"ONNX Runtime could not convert the model: {e}\n{log.getvalue()}") from None
    config = out_dir / "required_operators.config"
    if not config.is_file():
        raise MobileExportError("the converter wrote no required_operators.config")
    # the converter names its temp dir in the header: keep the file reproducible
    lines = [ln if not ln.startswith("# - ") else f"# - {Path(ln[4:]).name}" for ln in config.read_text().splitlines()]
    config.write_text("\n".join(lines) + "\n")


def parity(bundle: Bundle, variant: str, ort_file: Path, images: list[Path], threads: int = 2) -> dict:
    """Bundle ONNX vs .ort on the same preprocessed photos, both through the Classifier's own maths."""
    onnx_clf = Classifier(bundle, threads=threads, variant=variant)
    ort_clf = copy.copy(onnx_clf)
    ort_clf.session = runtime.create_session(ort_file, threads)
    arrays = []
    for p in images:
        try:
            arrays.append(onnx_clf.preprocess(p))
        except ImageError:
            continue
    if not arrays:
        raise MobileExportError("none of the parity photos could be read")
    x = np.stack(arrays)
    a = np.concatenate([onnx_clf.predict_proba(c) for c in np.array_split(x, max(1, len(x) // 16))])
    b = np.concatenate([ort_clf.predict_proba(c) for c in np.array_split(x, max(1, len(x) // 16))])
    return {"n_images": len(x), "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "max_abs_prob_diff": float(np.abs(a - b).max()), "reference": f"bundle {variant} ONNX"}


def export_mobile(model_dir: str | Path, out: str | Path, check_images: str | Path | None = None,
                  threads: int = 2) -> dict:
    """Write the phone files into `out` (only after the parity check passed); returns mobile.json."""
    import onnxruntime as ort

    bundle = load_newest(model_dir)
    variants = {v: bundle.model_file(v) for v in ORT_FILES if v in bundle.variants}
    images = check_images_from(Path(check_images) if check_images else None, bundle)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-mobile-", dir=out) as tmp:
        stage = Path(tmp)
        convert(variants, stage)
        files: dict[str, dict] = {}
        skipped: dict[str, str] = {}
        for variant, onnx_path in variants.items():
            ort_path = stage / ORT_FILES[variant]
            check = parity(bundle, variant, ort_path, images, threads)
            ok = (check["top1_agreement"] == 1.0 and check["max_abs_prob_diff"] <= FP32_TOLERANCE
                  if variant == "fp32" else check["top1_agreement"] >= INT8_MIN_AGREEMENT)
            if not ok and variant == "fp32":
                raise MobileExportError(f"the fp32 .ort model disagrees with the bundle: {check}")
            if not ok:  # int8 flips near-ties when its input moves by 1e-6: ship fp32 alone, say why
                skipped[variant] = (f"top-1 agreement with the bundle's {variant} ONNX {check['top1_agreement']:.1%} "
                                    f"< {INT8_MIN_AGREEMENT:.0%} on {check['n_images']} photos")
                ort_path.unlink()
                continue
            entry, test = bundle.variants[variant], bundle.meta.metrics.get("test")
            files[variant] = {"file": ORT_FILES[variant], "size_bytes": ort_path.stat().st_size,
                              "onnx_size_bytes": onnx_path.stat().st_size, "parity": check,
                              "recommended": variant == "fp32" if entry.recommended is None else entry.recommended,
                              "test_accuracy": entry.test_accuracy if variant != "fp32" or test is None
                              else test.accuracy}
        (stage / "labels.txt").write_text("\n".join(bundle.labels) + "\n")
        (stage / "preprocessing.json").write_text(json.dumps(mobile_preprocessing(bundle), indent=2) + "\n")
        info = {"bundle": {"name": bundle.name, "version": bundle.version, "arch": bundle.meta.arch},
                "variants": files, **({"skipped": skipped} if skipped else {}),
                "converter": f"onnxruntime {ort.__version__} convert_onnx_models_to_ort, optimization style Fixed, "
                             "target platform arm",
                "runtime_note": f"use onnxruntime-android / onnxruntime-objc >= {ort.__version__}",
                "parity_thresholds": {"fp32_max_abs_prob_diff": FP32_TOLERANCE, "fp32_top1": 1.0,
                                      "int8_top1": INT8_MIN_AGREEMENT}}
        (stage / "mobile.json").write_text(json.dumps(info, indent=2) + "\n")
        for name in set(ORT_FILES.values()) - {f["file"] for f in files.values()}:
            (out / name).unlink(missing_ok=True)  # an earlier export's variant that is not current
        for f in stage.iterdir():
            f.replace(out / f.name)
    return info


def format_sizes(info: dict) -> str:
    """The size/parity table printed by `export-mobile`."""
    rows = [f"{'variant':<8} {'file':<16} {'MB':>6} {'ONNX MB':>8}  parity (vs bundle ONNX)"]
    for v, f in info["variants"].items():
        p = f["parity"]
        rows.append(f"{v:<8} {f['file']:<16} {f['size_bytes'] / 1e6:>6.1f} {f['onnx_size_bytes'] / 1e6:>8.1f}  "
                    f"top-1 {p['top1_agreement']:.1%}, max |dprob| {p['max_abs_prob_diff']:.1e} on {p['n_images']}")
    rows += [f"{v:<8} not exported: {why}" for v, why in info.get("skipped", {}).items()]
    return "\n".join(rows)
