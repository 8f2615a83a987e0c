"""What validated responses cost: a prediction body through its schema vs the plain json.dumps it replaced.

The app now returns `schemas.Prediction` / `schemas.BatchPrediction`, which FastAPI checks and dumps
with pydantic-core; before, handlers sent `JSONResponse(dict)` (json.dumps, no check). Both paths run
interleaved in this one process on the same bodies, so the ratio holds on a busy machine; compare the
microseconds with the ~20 ms a model call takes (docs/SERVING.md).

    python bench/bench_responses.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic import TypeAdapter  # noqa: E402

from food_classifier.serving.http import schemas  # noqa: E402

TIMING = {"total_ms": 27.2, "preprocess_ms": 6.5, "queue_ms": 0.1, "inference_ms": 19.9, "batch_size": 1}
TOP = [{"label": f"class_{i}", "probability": 0.5 / (i + 1)} for i in range(5)]
PREDICTION = {"label": "apple_pie", "label_idx": 0, "confidence": 0.99993, "top_k": TOP, "abstained": False,
              "model": "food", "model_version": "20261124T233343-efficientnet_lite0-1fa669a1", "timing": TIMING}
BATCH = {"model": "food", "model_version": "v1", "count": 32, "failed": 1, "timing": {"total_ms": 700.0},
         "results": [{"index": i, "filename": f"{i}.jpg", **{k: v for k, v in PREDICTION.items()
                                                              if k not in ("model", "model_version")}}
                     for i in range(31)] + [{"index": 31, "filename": "bad.jpg", "error": "invalid_image",
                                             "detail": "not a readable image", "status": 415}]}


def per_call_us(fn, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            fn()
        n += 100
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per body and path, spread over 5 interleaved rounds")
    args = ap.parse_args()
    cpu = subprocess.run("lscpu | grep -o 'avx512[a-z_]*\\|avx2' | sort -u | tr '\\n' ' '", shell=True,
                         capture_output=True, text=True).stdout.strip()
    print(f"CPU flags: {cpu or 'unknown'}")
    for name, model, body in (("prediction", schemas.Prediction, PREDICTION),
                              ("batch of 32", schemas.BatchPrediction, BATCH)):
        adapter = TypeAdapter(model)  # what FastAPI runs on the returned model: validate, then dump_json

        def validated(model=model, adapter=adapter, body=body) -> bytes:
            return adapter.dump_json(adapter.validate_python(model.model_validate(body)))

        def plain(body=body) -> bytes:
            return json.dumps(body).encode()

        assert json.loads(validated()) == json.loads(plain())  # the same JSON either way
        times = {"json.dumps": [], "validated": []}
        for _ in range(5):
            times["json.dumps"].append(per_call_us(plain, args.seconds / 5))
            times["validated"].append(per_call_us(validated, args.seconds / 5))
        old, new = min(times["json.dumps"]), min(times["validated"])
        print(f"{name:<12} json.dumps {old:7.1f} us   validated schema {new:7.1f} us   ratio {new / old:4.2f}x")


if __name__ == "__main__":
    main()
