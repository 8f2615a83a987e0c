"""The seed's way of serving, kept as the benchmark's baseline: Flask + PyTorch eager, one image at a time.

Per request: decode with PIL, torchvision transforms, `model(x)` under no_grad, answer. No batching,
no ONNX. Same model and preprocessing numbers as the bundle it is compared with.

    python bench/baseline_flask.py --run runs/<run> --port 8384

Endpoints: POST /predict (multipart `file`, the benchmark's upload) and the seed's
GET /predict?model_type=...&image_path=... (no path checks: this is the seed's behaviour, local use only).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch
from flask import Flask, jsonify, request
from PIL import Image
from torchvision import transforms


def load(run: Path) -> tuple[torch.nn.Module, list[str], transforms.Compose]:
    """The run's best checkpoint (the model its bundle was exported from) and its preprocessing."""
    from food_classifier.training.train import load_checkpoint

    model, meta = load_checkpoint(run)
    spec = meta.preprocessing
    interp = {"bicubic": transforms.InterpolationMode.BICUBIC,
              "bilinear": transforms.InterpolationMode.BILINEAR}[spec.interpolation]
    tf = transforms.Compose([transforms.Resize(spec.resize, interpolation=interp), transforms.CenterCrop(spec.crop),
                             transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    return model.eval(), list(meta.labels), tf


def create_app(model: torch.nn.Module, labels: list[str], tf: transforms.Compose) -> Flask:
    app = Flask("baseline")

    def classify(img: Image.Image) -> dict:
        x = tf(img.convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1)[0]
        idx = int(probs.argmax())
        return {"label": labels[idx], "label_idx": idx, "confidence": float(probs[idx])}

    @app.post("/predict")
    def predict_upload():
        return jsonify(classify(Image.open(io.BytesIO(request.files["file"].read()))))

    @app.get("/predict")
    def predict_path():
        return jsonify(classify(Image.open(request.args["image_path"])))

    @app.get("/readyz")
    def ready():
        return jsonify({"status": "ready"})

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="training run dir (config.json + best.pt)")
    ap.add_argument("--port", type=int, default=8384)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, labels, tf = load(args.run)
    print(json.dumps({"baseline": "flask+torch-eager", "labels": labels, "threads": torch.get_num_threads()}),
          flush=True)
    create_app(model, labels, tf).run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
