"""The one place that creates ONNX Runtime sessions, and the one batched "decode, then run" loop.

Serving, evaluation, export parity, quantization, feature extraction and the built-in build all
get their sessions here, so thread counts, graph optimisation, providers and int8 options are
decided once. Only onnxruntime and numpy: the serving side depends on this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort

T = TypeVar("T")
PROVIDERS = ["CPUExecutionProvider"]


def default_threads() -> int:
    """CPUs this process may use (respects taskset/cpusets), capped at 4: more rarely helps one call."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def create_session(model: str | Path | bytes, threads: int | None = None, *,
                   optimize: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime CPU session: `threads` intra-op threads (default: usable CPUs, at most 4), one
    inter-op thread, full graph optimisation unless `optimize=False` (quantization calibration wants
    the graph as written)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=PROVIDERS)


def run(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """First output of a single-input session for one float32 batch."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def map_batched(items: Sequence[T], prepare: Callable[[T], np.ndarray], compute: Callable[[np.ndarray], np.ndarray],
                batch_size: int = 32, threads: int | None = None,
                progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Prepare items in a thread pool (Pillow and numpy release the GIL), `compute` stacked chunks of
    `batch_size`; returns one output array per chunk, in order. `progress(n)` is told each chunk's size.
    Decoding of the next chunk overlaps the model run of the current one."""
    if not items:
        return []
    out: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=threads or default_threads()) as pool:
        pending = None
        for chunk in chunks(items, batch_size):
            arrays = pool.map(prepare, chunk)  # submitted now, decoded while the previous chunk computes
            if pending is not None:
                out.append(compute(np.stack(list(pending[0]))))
                if progress:
                    progress(pending[1])
            pending = (arrays, len(chunk))
        if pending is not None:
            out.append(compute(np.stack(list(pending[0]))))
            if progress:
                progress(pending[1])
    return out
