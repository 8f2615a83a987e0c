"""Phone-ready files from a bundle: the server's decision path as one ONNX Runtime Mobile (`.ort`) file.

    export_mobile("models/food", "mobile/")   # model.ort, required_operators.config, labels.txt,
                                               # preprocessing.json, mobile.json

`model.ort` takes an upright RGB photo as uint8 [H, W, 3] bytes of any size and returns the server's
answer: the graphs `serve` runs for the variant (default: what it serves, a cascade's stages with their
temperatures and thresholds, the int8 stage 1 when the server uses it), the server's preprocessing
inside the graph (mobile_preprocess.py), the abstention threshold and the not-food rule
(mobile_graph.py). Nothing is written unless the file, run here under ONNX Runtime on real photos,
gives the server's answer on every photo with probabilities within 0.02 (mobile_check.py).
The conversion follows ONNX Runtime's converter (mobile_ort.py); peak memory stays well under 1 GB
(bench/bench_mobile.py measures it).
"""

from __future__ import annotations

import csv
import gc
import json
import tempfile
from pathlib import Path

import onnxruntime as ort

from food_classifier.bundle import Bundle, BundleError, load_newest
from food_classifier.inference import AUTO, Classifier
from food_classifier.training import mobile_check
from food_classifier.training.mobile_graph import OUTPUTS, decision_graph
from food_classifier.training.mobile_ort import required_operators, to_ort

N_IMAGES = 32
ORT_FILE = "model.ort"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
STALE = ("model.int8.ort",)  # written by earlier versions of export-mobile: removed from the output folder


class MobileExportError(BundleError):
    """The bundle cannot be converted, or the phone file disagrees with the server."""


def mobile_preprocessing(bundle: Bundle, graph: dict) -> dict:
    """What the app feeds the graph, what the graph does with it, and what it returns (no defaults)."""
    s = bundle.preprocessing
    return {
        "input": {"name": "rgb", "dtype": "uint8", "shape": ["H", "W", 3], "channel_order": "RGB",
                  "decode": "upright (EXIF orientation applied), transparency composited on white; a JPEG "
                            "decoded at 1/s, s = the largest of 8, 4, 2, 1 with s <= min(width, height) // "
                            f"{s.resize} (the server's JPEG decode; Android: BitmapFactory inSampleSize = s), "
                            "any other format at full size"},
        "in_the_graph": [f"resize so the shorter side is {s.resize} px ({s.interpolation}, Pillow's antialiased "
                         f"filter) and take the centre {s.crop}x{s.crop} square, as food_classifier/preprocessing.py",
                         "x = (pixel / 255 * scale - mean[c]) / std[c] per RGB channel",
                         *(f"stage {k + 1}: {st['file']}, probabilities softmax(logits / {st['temperature']:.4g})"
                           + (f", next stage below {st['threshold']:.4g}" if st["threshold"] is not None else "")
                           for k, st in enumerate(graph["stages"])),
                         "unsure: top probability below abstain_below; not_food: the not-food rule"],
        "resize": s.resize, "crop": s.crop, "interpolation": s.interpolation, "mean": list(s.mean),
        "std": list(s.std), "scale": s.scale, "layout": s.layout,
        "outputs": {name: {"dtype": {1: "float32", 7: "int64", 9: "bool"}[t], "shape": shape}
                    for name, (t, shape) in OUTPUTS.items()},
        "answer": "not_food if not_food, else unsure if unsure or escalate, else labels[label_index]",
        "abstain_below": graph["abstain_below"], "not_food": graph["not_food"],
        "stages": graph["stages"], "stages_served": graph["stages_served"],
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
            with open(manifest, newline="") as f:
                rows = list(csv.DictReader(f))
            paths = [Path(r["path"]) for r in rows if r.get("tier") == "test" and Path(r["path"]).is_file()]
    if not paths:
        raise MobileExportError("no photos for the parity check: pass --check DIR (a folder of real photos)")
    step = max(1, len(paths) // N_IMAGES)
    return paths[::step][:N_IMAGES]


def export_mobile(model_dir: str | Path, out: str | Path, check_images: str | Path | None = None,
                  variant: str = AUTO, stages: int | None = None, threads: int = 2) -> dict:
    """Write the phone files into `out` (only after the parity check passed); returns mobile.json."""
    bundle = load_newest(model_dir)
    if stages is not None and stages < 1:
        raise MobileExportError(f"--stages must be at least 1, got {stages}")
    images = check_images_from(Path(check_images) if check_images else None, bundle)
    clf = Classifier(bundle, threads=threads, variant=variant)  # the server, for the check (and errors first)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-mobile-", dir=out) as tmp:
        stage = Path(tmp)
        try:
            model, graph = decision_graph(bundle, variant, stages)
        except ValueError as e:
            raise MobileExportError(str(e)) from None
        try:
            to_ort(model, stage / ORT_FILE)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise MobileExportError(f"ONNX Runtime could not convert the phone graph: {e}") from None
        onnx_bytes = model.ByteSize()
        del model
        gc.collect()
        check = mobile_check.parity(clf, stage / ORT_FILE, images, threads=threads)
        if not mobile_check.passed(check):
            raise MobileExportError(f"the phone file does not answer like the server: {json.dumps(check)}")
        (stage / "required_operators.config").write_text(required_operators([stage / ORT_FILE]))
        (stage / "labels.txt").write_text("\n".join(bundle.labels) + "\n")
        (stage / "preprocessing.json").write_text(json.dumps(mobile_preprocessing(bundle, graph), indent=2) + "\n")
        test = bundle.meta.metrics.get("test")
        info = {"bundle": {"name": bundle.name, "version": bundle.version, "arch": bundle.meta.arch},
                "variant": clf.variant, "file": ORT_FILE, "size_bytes": (stage / ORT_FILE).stat().st_size,
                "onnx_size_bytes": onnx_bytes, "stages": len(graph["stages"]),
                "stages_served": graph["stages_served"], "parity": check,
                "test_accuracy": test.accuracy if test is not None and clf.variant == "fp32" else None,
                "converter": f"onnxruntime {ort.__version__}: optimisation level all, no NCHWc, ORT format "
                             "(convert_onnx_models_to_ort's Fixed style, target platform arm)",
                "runtime_note": f"use onnxruntime-android / onnxruntime-objc >= {ort.__version__}",
                "parity_thresholds": {"same_answer": 1.0, "max_abs_prob_diff": mobile_check.TOLERANCE}}
        (stage / "mobile.json").write_text(json.dumps(info, indent=2) + "\n")
        for name in STALE:
            (out / name).unlink(missing_ok=True)
        for f in stage.iterdir():
            f.replace(out / f.name)
    return info


def format_sizes(info: dict) -> str:
    """The summary printed by `export-mobile`."""
    p = info["parity"]
    held = (f"{info['stages']} of {info['stages_served']} stages" if info["stages_served"] > 1
            else "1 graph")
    lines = [f"{info['file']}: {info['size_bytes'] / 1e6:.1f} MB, variant {info['variant']} ({held}), "
             "RGB bytes in, the server's answer out",
             f"parity vs the server on {p['n_photos']} photos: same answer on {p['label_agreement']:.1%} of "
             f"{p['compared']}, max |dprob| {p['max_abs_prob_diff']:.1e}"]
    if p["left_to_server"]:
        lines.append(f"  {p['left_to_server']} photos need a stage this file leaves out: it flags them "
                     "(`escalate`), the app answers unsure or asks the server")
    return "\n".join(lines)
