"""Training-side benchmark: wall time of split + train + evaluate + export on food101_mini3, accuracy
of the default transfer model beside base_cnn, and feature extraction ORT vs PyTorch eager.

    python bench/bench_pipeline.py [--data DIR] [--skip-cnn]

Everything is measured in this run, on a cold feature cache (a fresh temp dir), through the real CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "food101_mini3"
CLI = [sys.executable, "-m", "food_classifier.cli"]


def timed(args: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{out.stderr[-2000:]}")
    return time.perf_counter() - t0, out.stdout


def test_metrics(models_dir: Path, name: str) -> dict:
    (bundle,) = sorted((models_dir / name).iterdir())
    return json.loads((bundle / "bundle.json").read_text())["metrics"]["test"]


def feature_speed(data: Path, n: int = 96) -> tuple[float, float]:
    """img/s of the frozen Lite0 backbone (288 px, batch 32): ONNX Runtime vs PyTorch eager."""
    import numpy as np
    import torch

    from food_classifier.preprocessing import preprocess
    from food_classifier.training.features import backbone_session
    from food_classifier.training.models import create_model, default_preprocessing

    spec = default_preprocessing("efficientnet_lite0")
    model = create_model("efficientnet_lite0", 3).eval()
    x = np.stack([preprocess(p, spec) for p in sorted(data.glob("*/*.jpg"))[:n]])
    sess = backbone_session(model, "efficientnet_lite0-57934424", spec)
    sess.run(None, {"image": x[:32]})
    t0 = time.perf_counter()
    for i in range(0, n, 32):
        sess.run(None, {"image": x[i:i + 32]})
    ort_ips = n / (time.perf_counter() - t0)
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.inference_mode():
        model(torch.from_numpy(x[:32]))
        t0 = time.perf_counter()
        for i in range(0, n, 32):
            model.forward_features(torch.from_numpy(x[i:i + 32]))
    return ort_ips, n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--skip-cnn", action="store_true", help="skip the base_cnn baseline (~5-10 min)")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no dataset at {args.data}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "FOOD_CLASSIFIER_CACHE": str(tmp / "cache")}
        manifest = str(tmp / "manifest.csv")
        t_split, _ = timed(["data", "split", str(args.data), "--manifest", manifest], env)
        common = ["--manifest", manifest, "--runs-dir", str(tmp / "runs"), "--models-dir", str(tmp / "models")]
        t_cold, _ = timed(["train", *common, "--name", "default"], env)
        t_warm, _ = timed(["train", *common, "--name", "default_warm"], env)
        t_l0, _ = timed(["train", *common, "--arch", "efficientnet_lite0", "--name", "lite0"], env)
        rows = [("Lite0+Lite1 (default, cold cache)", t_split + t_cold, test_metrics(tmp / "models", "default")),
                ("Lite0+Lite1 (default, warm cache)", t_split + t_warm, test_metrics(tmp / "models", "default_warm")),
                ("Lite0 alone (warm cache)", t_split + t_l0, test_metrics(tmp / "models", "lite0"))]
        if not args.skip_cnn:
            t_cnn, _ = timed(["train", *common, "--arch", "base_cnn", "--name", "cnn", "--no-int8"], env)
            rows.append(("base_cnn (from scratch)", t_split + t_cnn, test_metrics(tmp / "models", "cnn")))
        os.environ["FOOD_CLASSIFIER_CACHE"] = str(tmp / "cache")
        ort_ips, torch_ips = feature_speed(args.data)

    print(f"\nsplit + train + evaluate + export on {args.data.name} ({os.cpu_count()} cores)\n")
    print("| model | wall time | vs 5 min budget | test accuracy [95% CI] | macro F1 |")
    print("|---|---|---|---|---|")
    for name, secs, m in rows:
        lo, hi = m["accuracy_ci95"]
        print(f"| {name} | {secs:.0f} s | {secs / 300:.2f}x | {m['accuracy']:.4f} [{lo:.3f}, {hi:.3f}] "
              f"| {m['macro_f1']:.4f} |")
    print(f"\nfrozen-backbone features, batch 32: ONNX Runtime {ort_ips:.0f} img/s vs PyTorch eager "
          f"{torch_ips:.0f} img/s = {ort_ips / torch_ips:.1f}x")


if __name__ == "__main__":
    main()
