"""The BentoML peer of bench/bench_peers.py: our bundle's ONNX graph and preprocessing in a BentoML 1.4 service.

Runs in its own venv (bentoml, onnxruntime, numpy, pillow) with the repository on PYTHONPATH, so it
uses the very preprocessing function our server uses. Adaptive batching is on: concurrent requests
are grouped into one model call (up to 16 images; BentoML's default latency cap of 60 s, so no request
is shed as "overloaded"). `FC_BENTO_WORKERS` worker processes. The photos of a batch are decoded by a
small thread pool (Pillow releases the GIL), as any tuned service would.

    FC_PEER_CONFIG=peer.json bentoml serve bento_service:FoodClassifier --port 3000
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort

from food_classifier.preprocessing import PreprocessSpec, preprocess

CFG = json.loads(Path(os.environ["FC_PEER_CONFIG"]).read_text())


@bentoml.service(workers=int(os.environ.get("FC_BENTO_WORKERS", "1")), traffic={"concurrency": 64, "timeout": 300})
class FoodClassifier:
    def __init__(self) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = CFG["threads"]
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(CFG["model"], opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.spec = PreprocessSpec.from_dict(CFG["spec"])
        self.labels, self.temperature = CFG["labels"], CFG["temperature"]
        self.pool = ThreadPoolExecutor(CFG["threads"])

    @bentoml.api(batchable=True, max_batch_size=16)
    def classify(self, images: list[Path]) -> list[dict]:
        x = np.stack(list(self.pool.map(lambda p: preprocess(p.read_bytes(), self.spec), images)))
        logits = self.session.run(None, {self.input: x})[0].astype(np.float64) / self.temperature
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        best = probs.argmax(1)
        return [{"label": self.labels[int(i)], "confidence": float(p[i])} for p, i in zip(probs, best, strict=True)]
