"""The MLServer peer of bench/bench_peers.py: a custom runtime around ONNX Runtime and our preprocessing.

Runs in its own venv (mlserver, onnxruntime, numpy, pillow) with the repository on PYTHONPATH, so it
uses the very preprocessing function our server uses. It speaks the Open Inference Protocol (MLServer's
own API): input `image`, BYTES [N] of base64 strings; outputs `label` and `probabilities`. MLServer's
adaptive batching (model-settings.json) merges concurrent requests into one `predict` call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from food_classifier.preprocessing import PreprocessSpec, preprocess

CFG = json.loads(Path(os.environ["FC_PEER_CONFIG"]).read_text())


class FoodRuntime(MLModel):
    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = CFG["threads"]
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(CFG["model"], opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.spec = PreprocessSpec.from_dict(CFG["spec"])
        self.pool = ThreadPoolExecutor(CFG["threads"])
        self.ready = True
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        values = payload.inputs[0].data
        values = getattr(values, "root", values)
        photos = [base64.b64decode(v) for v in values]
        loop = asyncio.get_running_loop()
        x = np.stack(await asyncio.gather(*(loop.run_in_executor(self.pool, preprocess, p, self.spec) for p in photos)))
        logits = (await loop.run_in_executor(self.pool, self.session.run, None, {self.input: x}))[0]
        z = logits.astype(np.float64) / CFG["temperature"]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        labels = [CFG["labels"][int(i)] for i in probs.argmax(1)]
        return InferenceResponse(model_name=self.name, outputs=[
            ResponseOutput(name="label", datatype="BYTES", shape=[len(labels)], data=labels),
            ResponseOutput(name="probabilities", datatype="FP32", shape=list(probs.shape),
                           data=probs.reshape(-1).tolist())])
