"""Defaults that more than one module (or a setting and the code behind it) must agree on, declared once. Only
the standard library: the CLI, the settings and the runtime all import it."""

from __future__ import annotations

import os
from pathlib import Path

MiB = 1024 * 1024
MODELS_DIR = Path("models")  # train publishes MODELS_DIR/NAME/VERSION; serve, predict and predict-dir read it
MODEL_NAME = "food"
MODEL_DIR = MODELS_DIR / MODEL_NAME
MAX_PIXELS = 40_000_000  # decoded pixels per image, ~ 6300x6300: measured in docs/SERVING.md ("Large images")
CACHE_MEMORY_BYTES = 64 * MiB  # the in-process prediction cache
CACHE_TTL_S = 24 * 3600.0
PREDICTION_LOG_MAX_BYTES = 64 * MiB  # rotation size
THREADS_PER_CALL = 4  # one ONNX Runtime call rarely gains from more intra-op threads
MAX_WORKERS = 16  # decode threads, model calls in flight, Ray replicas: at most this many by default


def usable_cpus(cap: int | None = None) -> int:
    """CPUs this process may run on (respects taskset/cpusets, unlike os.cpu_count), at most `cap`."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(cap or n, n))
