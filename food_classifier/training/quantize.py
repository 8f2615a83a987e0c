"""int8 variant of a bundle: static quantization with ONNX Runtime, measured before it is published.

    info = add_int8_variant(bundle, manifest)     # writes model.int8.onnx + variants.int8 in bundle.json

Recipe (chosen by measurement on food101_mini3, Lite0 + linear head, 2 AVX2 cores without VNNI;
see bench/bench_int8.py):
  * `quant_pre_process` first (symbolic shape inference + graph clean-up), as ORT recommends;
  * static, QDQ format (ORT fuses it into QLinearConv/QLinearAdd at load; QOperator ran the same),
    per-channel symmetric int8 weights, uint8 activations, MinMax ranges from 128 train-tier
    images (64, 128, 192 and 384 gave the same fidelity; the calibration run is ~70% of the time,
    as it runs an unoptimized graph that reduces every tensor; Percentile/Entropy calibration took
    4-8x longer and agreed no better);
  * the stem, the first block (the first 3 Convs on every path from the input, so each member of
    an ensemble) and the classifier(s) stay fp32: those layers carry most of the error. Chosen on
    validation at 224 px (logit RMSE vs fp32 0.37 -> 0.15),
    confirmed on another model (288 px, L-BFGS head): keeping 0 / 1 / 3 convs in fp32 changed test
    accuracy by -7.1 / -2.4 / 0.0 points. Cost: ~3% of the FLOPs, but ~15-20% of the int8 run
    time (fp32 at 112 px resolution);
  * dynamic quantization (ConvInteger) was 3-5x *slower* than fp32 here, and u8u8 / s8s8 static
    kernels 4-6x slower: not used.

Accuracy is never assumed: every labelled photo (train, validation and test tiers) runs through both
graphs on the same preprocessed arrays, and speed is measured with fp32 and int8 interleaved in the same
process, so load from other processes hits both alike. The variant is recommended by the rule that judges
a cascade's int8 stage 1 (`int8_verdict`): top-1 agreement with fp32 on every labelled photo, accuracy
on them within 0.2 points, >= 1.1x faster (one changed photo of a 150-photo test tier is 0.67 points:
judged on the test tier alone, noise decided). A variant that fails it is still kept, marked
`recommended: false`; the default variant stays fp32. The test tier's numbers are reported beside it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from food_classifier import runtime
from food_classifier.bundle import Bundle, BundleMeta, file_sha256, load_bundle
from food_classifier.preprocessing import PreprocessSpec, preprocess
from food_classifier.training.data import Row, read_manifest

INT8_FILE = "model.int8.onnx"
METHODS = ("static-qdq", "static-qoperator", "dynamic")
DEFAULT_METHOD = "static-qdq"
KEEP_FP32_CONVS = 3  # stem + first depthwise-separable block (EfficientNet-Lite / MobileNet layout)


# The rule that lets a cascade's int8 stage 1 be served (`int8_verdict`): judged on every labelled photo,
# not on the test tier alone (1 changed photo of 168 is 0.6 points there: noise decided, not the graph).
INT8_MIN_AGREEMENT = 0.995   # top-1 agreement with fp32 over train+validation+test
INT8_MAX_OOF_LOSS_POINTS = 0.2  # out-of-fold cascade accuracy may fall at most this much (points)
INT8_MIN_SPEEDUP = 1.1       # batch-32 speed-up over fp32 measured on this machine


def int8_verdict(agreement: float, n_agreement: int, oof_fp32: float, oof_int8: float, speedup: float,
                 basis: str = "out-of-fold") -> dict:
    """Serve the int8 graph only if it agrees with fp32 on >= 99.5 % of the `n_agreement` photos, keeps the
    `basis` accuracy (a cascade's out-of-fold accuracy; a whole graph's on every labelled photo) within 0.2
    points and is >= 1.1x faster here. Returns what decided, with the numbers:
    {"used", "rule", "checks": {name: {"value", "limit", "ok"}}, "why"}."""
    loss = round(100 * (oof_fp32 - oof_int8), 3)
    checks = {"top1_agreement": {"value": round(agreement, 5), "limit": INT8_MIN_AGREEMENT, "n": n_agreement,
                                 "ok": agreement >= INT8_MIN_AGREEMENT - 1e-12},
              "oof_accuracy_loss_points": {"value": loss, "limit": INT8_MAX_OOF_LOSS_POINTS,
                                           "fp32": oof_fp32, "int8": oof_int8,
                                           "ok": loss <= INT8_MAX_OOF_LOSS_POINTS + 1e-9},
              "speedup": {"value": round(speedup, 3), "limit": INT8_MIN_SPEEDUP, "ok": speedup >= INT8_MIN_SPEEDUP}}
    why = [text for name, text in (
        ("top1_agreement", f"agrees with fp32 on {100 * agreement:.2f} % of {n_agreement} photos "
                           f"(needs >= {100 * INT8_MIN_AGREEMENT:g} %)"),
        ("oof_accuracy_loss_points", f"{basis} accuracy {-loss:+.2f} points (limit -{INT8_MAX_OOF_LOSS_POINTS:g})"),
        ("speedup", f"{speedup:.2f}x fp32's speed here (needs >= {INT8_MIN_SPEEDUP:g}x)")) if not checks[name]["ok"]]
    return {"used": not why, "checks": checks, "why": "; ".join(why),
            "rule": f"top-1 agreement >= {100 * INT8_MIN_AGREEMENT:g} % on every labelled photo, {basis} accuracy "
                    f"within {INT8_MAX_OOF_LOSS_POINTS:g} points, >= {INT8_MIN_SPEEDUP:g}x faster at batch 32"}


class QuantizeError(RuntimeError):
    """Quantization could not produce a usable graph."""


def load_arrays(paths: list[Path], spec: PreprocessSpec, threads: int = 2) -> np.ndarray:
    """Preprocess images exactly as serving does (the shared `preprocess`), decoded in a thread pool."""
    if not paths:
        return np.zeros((0, 3, spec.crop, spec.crop), np.float32)
    return np.concatenate(runtime.map_batched(paths, lambda p: preprocess(p, spec), lambda x: x, threads=threads))


def calibration_paths(rows: list, n: int = 128) -> list[Path]:
    """`n` train-tier images spread evenly over the (label-sorted) manifest, so every class is in."""
    train = [r.path for r in rows if r.tier == "train"] or [r.path for r in rows]
    step = max(1, len(train) // n)
    return train[::step][:n]


def fp32_nodes(model_path: Path, keep_convs: int = KEEP_FP32_CONVS) -> list[str]:
    """Names of the nodes left in fp32: every Conv among the first `keep_convs` on its path from
    the input (each member's stem in an ensemble), and the classifier: the Gemm/MatMul nodes
    from which no Conv, Gemm or MatMul follows."""
    import onnx

    nodes = list(onnx.load(str(model_path), load_external_data=False).graph.node)
    heavy = ("Conv", "Gemm", "MatMul")
    depth: dict[str, int] = {}  # tensor -> most Convs on a path from the input to it
    for n in nodes:  # graph order is topological
        d = max((depth.get(t, 0) for t in n.input), default=0) + (n.op_type == "Conv")
        depth.update((t, d) for t in n.output)
    keep = [n.name for n in nodes if n.op_type == "Conv" and depth[n.output[0]] <= keep_convs]
    feeds_heavy: set[str] = set()  # tensors with a Conv/Gemm/MatMul somewhere downstream
    for n in reversed(nodes):  # consumers before producers
        if n.op_type in heavy or any(t in feeds_heavy for t in n.output):
            feeds_heavy.update(n.input)
    keep += [n.name for n in nodes
             if n.op_type in ("Gemm", "MatMul") and not any(t in feeds_heavy for t in n.output)]
    return keep


def _reader(x: np.ndarray, input_name: str, batch_size: int = 8):
    """A CalibrationDataReader over an in-memory [N,3,H,W] array."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([x[i:i + batch_size] for i in range(0, len(x), batch_size)])

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {input_name: b}

    return Reader()


def quantize_model(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray | None,
                   method: str = DEFAULT_METHOD, keep_fp32_convs: int = KEEP_FP32_CONVS,
                   input_name: str = "image") -> dict:
    """Write an int8 ONNX graph at `out_path`; returns how it was made (for bundle.json)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_dynamic, quantize_static

    if method not in METHODS:
        raise QuantizeError(f"unknown quantization method '{method}' (one of: {', '.join(METHODS)})")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    t0 = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # beside the output (the run's bundle dir), not in /tmp: a kill leaves nothing outside the run
    with tempfile.TemporaryDirectory(prefix=".tmp-int8-", dir=out_path.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        t_pre = time.perf_counter() - t0
        info: dict = {"method": method, "pre_process": "onnxruntime.quantization.quant_pre_process"}
        out_tmp = Path(tmp) / "int8.onnx"
        if method == "dynamic":
            quantize_dynamic(str(pre), str(out_tmp), weight_type=QuantType.QInt8, per_channel=True)
            info |= {"weights": "int8 per-channel", "activations": "uint8, ranges computed at run time"}
        else:
            if calibration is None or len(calibration) == 0:
                raise QuantizeError("static quantization needs calibration images")
            keep = fp32_nodes(pre, keep_fp32_convs)
            quantize_static(
                str(pre), str(out_tmp), _reader(calibration, input_name),
                quant_format=QuantFormat.QDQ if method == "static-qdq" else QuantFormat.QOperator,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=keep)  # MinMax keeps only per-batch min/max scalars: RAM stays small
            info |= {"format": "QDQ" if method == "static-qdq" else "QOperator",
                     "weights": "int8, symmetric, per output channel", "activations": "uint8, asymmetric",
                     "calibration": {"method": "MinMax", "n_images": int(len(calibration)), "tier": "train"},
                     "fp32_nodes": keep}
        shutil.move(str(out_tmp), out_path)
    info |= {"pre_process_seconds": round(t_pre, 2), "quantize_seconds": round(time.perf_counter() - t0, 2)}
    return info


def _sig(x: float, digits: int = 4) -> float:
    """Round to significant digits: a tiny model's 0.0123 ms must not lose a tenth of its value."""
    return float(f"{x:.{digits}g}")


def measure_speed(models: dict[str, str | Path], batch: np.ndarray, threads: int = 2,
                  batch_sizes: tuple[int, ...] = (1, 32), seconds: float = 3.0,
                  min_reps: int = 3) -> dict[str, dict[int, dict[str, float]]]:
    """ms per image for each model and batch size ({"median", "best", "runs"}), the models run
    interleaved (A, B, A, B, ...) in this one process so that load from other processes falls on
    all of them alike. On a busy machine "best" is the closer estimate of the unloaded speed."""
    sessions = {name: runtime.create_session(path, threads) for name, path in models.items()}
    input_names = {name: s.get_inputs()[0].name for name, s in sessions.items()}
    out: dict[str, dict[int, dict[str, float]]] = {name: {} for name in models}
    for bs in batch_sizes:
        x = np.ascontiguousarray(np.resize(batch, (bs, *batch.shape[1:])), dtype=np.float32)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for name, s in sessions.items():  # warm-up (first run allocates)
            s.run(None, {input_names[name]: x})
        start = time.perf_counter()
        while True:
            for name, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {input_names[name]: x})
                times[name].append((time.perf_counter() - t) * 1000 / bs)
            n = len(times[next(iter(times))])
            if n >= min_reps and time.perf_counter() - start > seconds / len(batch_sizes):
                break
        for name, t in times.items():
            out[name][bs] = {"median": float(np.median(t)), "best": float(np.min(t)), "runs": len(t)}
    return out


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def evaluate_int8(bundle: Bundle, int8_file: Path, rows: list, threads: int = 2,
                  tiers: tuple[str, ...] = ("test",)) -> tuple[dict, np.ndarray]:
    """fp32 and int8 logits on the same preprocessed images of each tier (that has any).
    Returns metrics per tier and up to 32 of those arrays (for the speed measurement)."""
    from food_classifier.inference import Classifier

    with_int8 = bundle.with_variants({**bundle.variants, "int8": {"file": int8_file.name}})
    fp32, int8 = Classifier(bundle, threads=threads), Classifier(with_int8, threads=threads, variant="int8")
    index = {lab: i for i, lab in enumerate(bundle.labels)}
    result: dict = {}
    sample = np.zeros((1, 3, bundle.preprocessing.crop, bundle.preprocessing.crop), np.float32)
    for tier in tiers:
        chosen = [r for r in rows if r.tier == tier and r.label in index]
        if not chosen:
            continue
        x = load_arrays([r.path for r in chosen], bundle.preprocessing, threads)
        y = np.array([index[r.label] for r in chosen])
        a = np.concatenate([fp32.logits(x[i:i + 32]) for i in range(0, len(x), 32)]).argmax(1)
        b = np.concatenate([int8.logits(x[i:i + 32]) for i in range(0, len(x), 32)]).argmax(1)
        result[tier] = {"n": len(chosen), "fp32_accuracy": float((a == y).mean()),
                        "int8_accuracy": float((b == y).mean()), "top1_agreement": float((a == b).mean())}
        if len(result) == 1:
            sample = x[:32]
    return result, sample


def build_int8(bundle: Bundle, rows: list[Row], method: str = DEFAULT_METHOD, n_calibration: int = 128,
               threads: int = 2, speed_seconds: float = 4.0, keep_fp32_convs: int = KEEP_FP32_CONVS) -> dict:
    """Quantize the bundle's fp32 graph into `bundle.path / INT8_FILE` and measure it against fp32;
    returns the `variants.int8` entry. `bundle` may be a run's in-memory view (files in the run dir)."""
    fp32_file = bundle.model_file("fp32")
    int8_file = bundle.path / INT8_FILE
    cal = None
    t_cal = 0.0
    if method != "dynamic":
        t = time.perf_counter()
        cal = load_arrays(calibration_paths(rows, n_calibration), bundle.preprocessing, threads)
        t_cal = time.perf_counter() - t
    tmp = int8_file.with_suffix(f".tmp{os.getpid()}.onnx")
    try:
        info = quantize_model(fp32_file, tmp, cal, method=method, keep_fp32_convs=keep_fp32_convs,
                              input_name=bundle.meta.input_name)
        os.replace(tmp, int8_file)
    finally:
        tmp.unlink(missing_ok=True)

    t = time.perf_counter()
    acc, sample = evaluate_int8(bundle, int8_file, rows, threads, ("train", "validation", "test"))
    t_eval = time.perf_counter() - t
    # reported: the test tier (the validation tier only for a manifest without one); judged: every tier
    tier = "test" if "test" in acc else "validation" if "validation" in acc else None
    if tier is None:
        raise QuantizeError("the manifest has no test or validation images with the bundle's labels: "
                            "cannot measure int8 accuracy")
    n_all = sum(a["n"] for a in acc.values())
    every = {k: sum(a[k] * a["n"] for a in acc.values()) / n_all
             for k in ("fp32_accuracy", "int8_accuracy", "top1_agreement")}
    t = time.perf_counter()
    speed = measure_speed({"fp32": fp32_file, "int8": int8_file}, sample, threads=threads, seconds=speed_seconds)
    t_speed = time.perf_counter() - t
    fp32_acc, int8_acc = acc[tier]["fp32_accuracy"], acc[tier]["int8_accuracy"]
    delta = round(100 * (int8_acc - fp32_acc), 3)
    speedup = {f"batch{bs}": round(speed["fp32"][bs]["median"] / speed["int8"][bs]["median"], 3)
               for bs in speed["int8"]}
    best = {f"batch{bs}": round(speed["fp32"][bs]["best"] / speed["int8"][bs]["best"], 3) for bs in speed["int8"]}
    verdict = int8_verdict(every["top1_agreement"], n_all, every["fp32_accuracy"], every["int8_accuracy"],
                           speedup.get("batch32", min(speedup.values())), basis="labelled-photo")
    reasons = [why for why in verdict["why"].split("; ") if why]
    entry = {
        "file": INT8_FILE,
        "sha256": file_sha256(int8_file),
        "method": method,
        "recommended": not reasons,
        **({"not_recommended_because": reasons} if reasons else {}),
        "accuracy_tier": tier,
        "test_accuracy": int8_acc,
        "fp32_test_accuracy": fp32_acc,
        "accuracy_delta_points": delta,
        "n_test": acc[tier]["n"],
        "top1_agreement": {t: a["top1_agreement"] for t, a in acc.items()},
        "verdict": verdict,
        "ms_per_image_batch1": _sig(speed["int8"][1]["median"]),
        "ms_per_image_batch32": _sig(speed["int8"][32]["median"]),
        "fp32_ms_per_image_batch1": _sig(speed["fp32"][1]["median"]),
        "fp32_ms_per_image_batch32": _sig(speed["fp32"][32]["median"]),
        "speedup": speedup,
        "speed_measured": {"threads": threads, "statistic": "median of fp32/int8 runs interleaved in one process",
                           "speedup_of_best_runs": best,
                           "runs": {f"batch{bs}": speed["int8"][bs]["runs"] for bs in (1, 32)},
                           "load_avg_1m": _load_avg(), "cpu_count": os.cpu_count()},
        "quantization": info,
        "step_seconds": {"calibration_images": round(t_cal, 1), "quantize": info["quantize_seconds"],
                         "evaluate": round(t_eval, 1), "speed": round(t_speed, 1)},
        "size_bytes": int8_file.stat().st_size,
    }
    return entry


def format_int8(entry: dict) -> str:
    """One line for the `train` output."""
    s = entry["speedup"]
    verdict = ("recommended" if entry["recommended"]
               else "NOT recommended: " + "; ".join(entry["not_recommended_because"]))
    return (f"int8 ({entry['method']}): {entry['accuracy_tier']} accuracy {entry['test_accuracy']:.4f} vs fp32 "
            f"{entry['fp32_test_accuracy']:.4f} ({entry['accuracy_delta_points']:+.2f} points, n={entry['n_test']}); "
            f"speed-up x{s.get('batch1', 0):.2f} at batch 1, x{s.get('batch32', 0):.2f} at batch 32; "
            f"quantized in {entry['quantization']['quantize_seconds']:.1f} s; {verdict}"
            + (f" (rule: {entry['verdict']['rule']})" if entry.get("verdict") else ""))


def try_int8(bundle: Bundle, rows: list[Row], **kwargs) -> dict | None:
    """The pipeline step: `build_int8`, or warn and return None (no int8 file left) if the graph cannot
    be quantized (an exotic timm architecture); training never fails because of it."""
    import warnings

    try:
        entry = build_int8(bundle, rows, **kwargs)
    except Exception as e:  # reported; the fp32 bundle is still good
        (bundle.path / INT8_FILE).unlink(missing_ok=True)
        warnings.warn(f"int8 variant skipped: {e.__class__.__name__}: {e}", stacklevel=2)
        return None
    print(format_int8(entry))
    return entry


# --- the same on a finished bundle dir (bench/bench_int8.py) -----------------------------------

def _with_int8(bundle: Bundle, entry: dict | None) -> BundleMeta:
    variants = {k: v for k, v in bundle.meta.to_json_dict()["variants"].items() if k != "int8"}
    return BundleMeta.model_validate(bundle.meta.to_json_dict() | {"variants": variants | (
        {"int8": entry} if entry else {})})


def add_int8_variant(bundle_dir: str | Path, manifest: str | Path, **kwargs) -> dict:
    """`build_int8` on a bundle dir the caller owns, republished with `variants.int8`."""
    from food_classifier.training.publish import republish

    bundle = load_bundle(bundle_dir)
    entry = build_int8(bundle, read_manifest(manifest), **kwargs)
    republish(bundle, _with_int8(bundle, entry), {INT8_FILE: bundle.path / INT8_FILE})
    return entry
