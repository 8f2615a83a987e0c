"""predict-dir's Ray engine: a Ray Data pipeline over the same `Scorer` as the local engine.

    paths (ray.data.from_items) -> map_batches(_RayScorer, compute=ActorPoolStrategy(...)) -> rows
    streamed back to the driver, which writes them with the same store (batch/store.py)

Each actor holds one `Classifier` (one ONNX Runtime session) for its whole life. The bundle travels
once: its files are put in the object store by the driver, and each actor writes them to a temporary
dir, loads them (sha256 checked) and deletes the dir, so workers need no copy of the models dir.
The image files are read inside the actors by the same code as the local engine, so an unreadable or
corrupt file is an error row the same way (a Ray read task would fail the job instead), and the bytes do
not take a detour through the object store. On a cluster the paths must name the same files on every
node (a shared filesystem). Rows (~300 bytes each) stream back to the driver, which writes the one
results file and keeps the resume logic in one place.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from food_classifier import ray_env
from food_classifier.answer import AUTO
from food_classifier.batch.job import Chunk, Done, Scorer
from food_classifier.batch.store import COLUMNS, parquet_schema
from food_classifier.bundle import Bundle
from food_classifier.inference import Classifier


def pack_bundle(path: Path) -> dict[str, bytes]:
    """Every file of a bundle dir, by relative path (what an actor needs to load it)."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)}


def _ray_schema() -> Any:
    import pyarrow as pa

    return parquet_schema().append(pa.field("skipped", pa.bool_()))  # marks inputs already in the output


class _RayScorer:
    """One per actor: loads the shipped bundle once, then scores batches of paths."""

    def __init__(self, refs: tuple[Any, Any], threads: int, variant: str = AUTO):
        import ray

        files, done = ray.get(list(refs))  # nested in a tuple, so the actor (not Ray) fetches them
        with tempfile.TemporaryDirectory(prefix="fc-bundle-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(data)
            clf = Classifier(tmp, threads=threads, variant=variant)  # the session holds the graph: files can go
        self.scorer = Scorer(clf, done, threads)
        self.schema = _ray_schema()

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        paths = [str(p) for p in batch["path"]]
        rows: list[dict] = []
        for chunk_rows, _ in self.scorer.chunks(paths, len(paths)):
            rows += chunk_rows
        out = [{**r, "skipped": False} for r in rows] + [{"skipped": True}] * (len(paths) - len(rows))
        return pa.Table.from_pylist(out, schema=self.schema)


class RayEngine:
    """Score with a pool of Ray actors: on a local Ray (address None) or a cluster (`auto`, `ray://...`)."""

    def __init__(self, address: str | None = None, actors: int | None = None, cpus_per_actor: int = 1,
                 variant: str = AUTO):
        self.address, self.variant = address, variant
        self.actors = actors
        self.cpus = max(1, cpus_per_actor)

    def __call__(self, bundle: Bundle, paths: list[str], done: Done, batch_size: int) -> Iterator[Chunk]:
        started = ray_env.connect(self.address)
        import ray
        from ray.data import ActorPoolStrategy, DataContext
        from ray.util.debug import log_once

        try:
            ctx = DataContext.get_current()
            ctx.enable_progress_bars = False  # predict-dir prints its own (img/s, ETA)...
            log_once("ray_data_progress_manager_disabled")  # ...so skip Ray's warning that they are off
            logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-run INFO lines
            size = self.actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.cpus)
            files, done_ref = ray.put(pack_bundle(bundle.path)), ray.put(done)  # once, for every actor
            ds = ray.data.from_items([{"path": p} for p in paths],
                                     override_num_blocks=max(1, math.ceil(len(paths) / batch_size)))
            ds = ds.map_batches(_RayScorer, batch_size=batch_size, batch_format="numpy", num_cpus=self.cpus,
                                compute=ActorPoolStrategy(min_size=1, max_size=size),
                                fn_constructor_kwargs={"refs": (files, done_ref), "threads": self.cpus,
                                                      "variant": self.variant})
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                marks = table["skipped"].to_pylist()
                rows = table.select(list(COLUMNS)).to_pylist()
                yield [r for r, skipped in zip(rows, marks, strict=True) if not skipped], table.num_rows
        finally:
            if started:
                ray.shutdown()
