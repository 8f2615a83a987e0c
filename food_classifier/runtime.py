"""The one place that creates ONNX Runtime sessions, and the one batched "decode, then run" loop.

Serving, evaluation, export parity, quantization, feature extraction and the built-in build all
get their sessions here, so thread counts, graph optimisation, providers and int8 options are
decided once. Only onnxruntime and numpy: the serving side depends on this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort

from food_classifier.defaults import THREADS_PER_CALL, usable_cpus

T = TypeVar("T")
PROVIDERS = ["CPUExecutionProvider"]


def default_threads() -> int:
    """CPUs this process may use, capped at THREADS_PER_CALL: more rarely helps one call."""
    return usable_cpus(THREADS_PER_CALL)


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


def iter_batched(items: Sequence[T], prepare: Callable[[T], np.ndarray | None],
                 compute: Callable[[np.ndarray], np.ndarray], batch_size: int = 32,
                 threads: int | None = None) -> Iterator[np.ndarray | None]:
    """Prepare items in a thread pool (Pillow and numpy release the GIL), `compute` stacked chunks of
    `batch_size`; yields one output per chunk, in order, as soon as it is computed (a caller can write it
    away before the next one). Decoding of the next chunk overlaps the model run of the current one.
    `prepare` may return None for an item that needs no model run (it failed, or its answer is known):
    it is left out of the stack, and a chunk of only such items yields None without calling `compute`."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=threads or default_threads()) as pool:
        pending = None
        for chunk in chunks(items, batch_size):
            arrays = pool.map(prepare, chunk)  # submitted now, decoded while the previous chunk computes
            if pending is not None:
                yield _compute(compute, pending)
            pending = arrays
        if pending is not None:
            yield _compute(compute, pending)


def _compute(compute: Callable[[np.ndarray], np.ndarray], arrays: Iterator[np.ndarray | None]) -> np.ndarray | None:
    ready = [a for a in arrays if a is not None]
    return compute(np.stack(ready)) if ready else None


def map_batched(items: Sequence[T], prepare: Callable[[T], np.ndarray], compute: Callable[[np.ndarray], np.ndarray],
                batch_size: int = 32, threads: int | None = None,
                progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """`iter_batched` collected: one output array per chunk, in order. `progress(n)` is told each chunk's size."""
    out: list[np.ndarray] = []
    for chunk, result in zip(chunks(items, batch_size), iter_batched(items, prepare, compute, batch_size, threads),
                             strict=True):
        out.append(result)  # type: ignore[arg-type]  # prepare never returns None here
        if progress:
            progress(len(chunk))
    return out
