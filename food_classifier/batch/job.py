"""`predict-dir`: score a folder, a manifest or a list of image files into a resumable results file.

    predict_dir("photos/", "models/food", "results.parquet")        # the local engine
    predict_dir(..., engine=RayEngine("auto"))                       # food_classifier/batch/ray_engine.py

The prediction is `Classifier`'s (preprocess -> infer -> decide), run in batches through
`runtime.iter_batched` by `Scorer`, which both engines use: the local engine in this process (decode
in a thread pool, ONNX Runtime in batches), the Ray engine inside each actor of a Ray Data pipeline.
This module never imports Ray: the caller hands the Ray engine in.

Resumable: rows are appended as each batch finishes (batch/store.py). A rerun with the same `--out`
skips images already scored by the same model version, keyed by (image sha256, model version): a file
whose bytes already have a row under another path gets a copy of that row, not a model run. A file
that cannot be read or decoded is a row with `error`, never a failed job; so is an entry of a list or manifest
that is not a regular file (a FIFO would block the job, /dev/zero would never end) or is over MAX_FILE_BYTES.
"""

from __future__ import annotations

import csv
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from food_classifier import runtime
from food_classifier.answer import AUTO, Answer
from food_classifier.batch.report import Progress, format_accuracy
from food_classifier.batch.store import BatchError, open_store
from food_classifier.bundle import Bundle, load_newest
from food_classifier.inference import Classifier
from food_classifier.preprocessing import ImageError

__all__ = ["BatchError", "Chunk", "Done", "Engine", "Scorer", "Source", "Summary", "done_index", "local_engine",
           "predict_dir", "read_source"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Images per ONNX Runtime call. ORT holds every layer's activations of a call (and its arena keeps the peak),
# so memory grows with the images per call while speed barely does on a CPU: at 224 px, Lite0 at 64 images per
# call (2 calls at once) peaked at 928 MiB, at 8 432 MiB, at 4 348 MiB, no slower (bench/bench_batch_memory.py).
MAX_CALL_IMAGES = 4
MAX_FILE_BYTES = 64 * 1024 * 1024  # a larger "image" is an error row (a 50 MP JPEG is ~25 MB; the server takes 10)
Done = dict[str, tuple[frozenset[str], dict]]  # sha256 -> (paths that have a row, a row to copy for another path)
Chunk = tuple[list[dict], int]  # rows to write, inputs handled (rows + images skipped as already written)
Engine = Callable[[Bundle, list[str], Done, int], Iterator[Chunk]]


# --- inputs --------------------------------------------------------------------------------------------------

@dataclass
class Source:
    paths: list[str]  # absolute, one per image, in input order
    labels: dict[str, str] = field(default_factory=dict)  # path -> true class (class folders, a manifest's label)


def read_source(source: str | Path) -> Source:
    """A folder (searched recursively for image files; its subfolders are the classes when there are two or
    more), a manifest CSV (a `path` column, optionally `label`) or a text file of paths (one per line, `#`
    comments). Relative paths in a file are relative to that file."""
    src = Path(source)
    if src.is_dir():
        found = _folder(src)
    elif src.is_file():
        found = _manifest(src) if src.suffix.lower() == ".csv" else _path_list(src)
    else:
        raise BatchError(f"{src}: no such folder or file")
    if not found.paths:
        raise BatchError(f"{src}: no images found" + (" (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")"
                                                       if src.is_dir() else ""))
    return found


def _folder(root: Path) -> Source:
    paths, labels = [], {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.suffix.lower() not in IMAGE_SUFFIXES or any(part.startswith(".") for part in rel.parts) \
                or not p.is_file():
            continue
        path = str(p.absolute())
        paths.append(path)
        if len(rel.parts) > 1:
            labels[path] = rel.parts[0]
    if len(set(labels.values())) < 2:  # one subfolder is an album, not a class
        labels = {}
    return Source(paths, labels)


def _resolve(base: Path, entry: str) -> str:
    p = Path(entry).expanduser()
    return str(p if p.is_absolute() else (base / p).absolute())


def _manifest(path: Path) -> Source:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise BatchError(f"{path}: a manifest needs a 'path' column (has: {', '.join(reader.fieldnames or [])})")
        rows = [r for r in reader if (r.get("path") or "").strip()]
    paths, labels = [], {}
    for r in rows:
        p = _resolve(path.parent, r["path"].strip())
        paths.append(p)
        if (r.get("label") or "").strip():
            labels.setdefault(p, r["label"].strip())
    return Source(list(dict.fromkeys(paths)), labels)


def _path_list(path: Path) -> Source:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise BatchError(f"{path}: not a text file of paths (a single image? pass its folder)") from None
    entries = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    return Source(list(dict.fromkeys(_resolve(path.parent, e) for e in entries)))


# --- rows ----------------------------------------------------------------------------------------------------

def answer_row(path: str, sha256: str, answer: Answer) -> dict:
    """An `Answer` as a results row (predict-dir's one wire format; Parquet and JSONL alike)."""
    return {"path": path, "sha256": sha256, "label": answer.label, "label_idx": answer.label_idx,
            "confidence": answer.confidence, "abstained": answer.abstained,
            "top_k": [{"label": t.label, "probability": t.probability} for t in answer.top_k],
            "model": answer.model, "model_version": answer.model_version, "error": None,
            "reason": answer.reason, "stage": answer.stage}


def error_row(path: str, sha256: str | None, error: str, bundle: Bundle) -> dict:
    return {"path": path, "sha256": sha256, "label": None, "label_idx": None, "confidence": None,
            "abstained": None, "top_k": None, "model": bundle.name, "model_version": bundle.version, "error": error,
            "reason": None, "stage": None}


def done_index(rows: list[dict], version: str) -> Done:
    """What a rerun may skip: rows of this model version that have an image hash."""
    paths: dict[str, set[str]] = {}
    template: dict[str, dict] = {}
    for r in rows:
        if r["model_version"] == version and r["sha256"]:
            paths.setdefault(r["sha256"], set()).add(r["path"])
            template[r["sha256"]] = r
    return {sha: (frozenset(ps), template[sha]) for sha, ps in paths.items()}


class FileRefused(Exception):
    """A listed path that is not an image file to read (its message is the row's `error`)."""


def read_image_file(path: str, limit: int | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Opened without blocking (a FIFO with no writer
    opens at once) and checked on the open descriptor, so a path swapped after a check cannot slip through."""
    limit = MAX_FILE_BYTES if limit is None else limit
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        mode, size = os.fstat(fd)[stat.ST_MODE], os.fstat(fd).st_size
        if not stat.S_ISREG(mode):
            kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                    "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "not a file")
            raise FileRefused(f"not_a_file: {kind}, not a regular file")
        if size > limit:
            raise FileRefused(f"too_large: {size} bytes, over the {limit >> 20} MiB limit for an image file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:  # it grew while being read
            raise FileRefused(f"too_large: over the {limit >> 20} MiB limit for an image file")
        return data
    finally:
        os.close(fd)


@dataclass
class _Job:
    path: str
    sha256: str | None = None
    row: dict | None = None  # known without a model run: an error, or a copy of an earlier answer
    skip: bool = False  # this path already has its row in the output


class Scorer:
    """Read, hash, decode and score image files with one `Classifier`, in batches (both engines)."""

    def __init__(self, classifier: Classifier, done: Done | None = None, threads: int | None = None,
                 calls: int = 1):
        """`threads` decode threads; `calls` model calls at once, each on a slice of the batch (with a
        1-thread session, one per CPU: see `local_engine`)."""
        self.clf = classifier
        self.done = done or {}
        self.threads = threads
        self.calls = max(1, calls)
        self._pool = ThreadPoolExecutor(self.calls, thread_name_prefix="fc-model") if self.calls > 1 else None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        parts = np.array_split(batch, max(min(self.calls, len(batch)), -(-len(batch) // MAX_CALL_IMAGES)))
        if self._pool is None or len(parts) < 2:
            return np.concatenate([self.clf.infer(p) for p in parts])
        return np.concatenate(list(self._pool.map(self.clf.infer, parts)))

    def _prepare(self, job: _Job) -> np.ndarray | None:
        try:
            data = read_image_file(job.path)
        except FileRefused as e:
            job.row = error_row(job.path, None, str(e), self.clf.bundle)
            return None
        except OSError as e:
            job.row = error_row(job.path, None, f"unreadable: {e.strerror or e}", self.clf.bundle)
            return None
        job.sha256 = hashlib.sha256(data).hexdigest()
        known = self.done.get(job.sha256)
        if known is not None:
            paths, row = known
            job.skip = job.path in paths
            job.row = None if job.skip else {**row, "path": job.path}
            return None
        try:
            return self.clf.lookup(data).array  # the one decode step (the Classifier's cache is off here)
        except ImageError as e:
            job.row = error_row(job.path, job.sha256, f"{e.reason}: {e}", self.clf.bundle)
        except Exception as e:  # any other decoder failure is the file's fault, not the job's
            job.row = error_row(job.path, job.sha256, f"invalid_image: not a readable image ({e.__class__.__name__})",
                                self.clf.bundle)
        return None

    def chunks(self, paths: list[str], batch_size: int) -> Iterator[Chunk]:
        """Per `batch_size` inputs (the last batch may be smaller), in input order: the new rows, and how many
        inputs the batch handled. Decoded a few model calls ahead, not a whole batch: memory stays flat
        whatever the batch size and the number of images."""
        jobs = [_Job(p) for p in paths]
        step = min(batch_size, 2 * self.calls * MAX_CALL_IMAGES)
        rows: list[dict] = []
        handled = 0
        batches = runtime.iter_batched(jobs, self._prepare, self._run, step, self.threads)
        for chunk, probs in zip(runtime.chunks(jobs, step), batches, strict=True):
            answers = iter(self.clf.decide(probs) if probs is not None else ())
            rows += [job.row if job.row is not None else answer_row(job.path, job.sha256, next(answers))
                     for job in chunk if not job.skip]
            handled += len(chunk)
            for job in chunk:
                job.row = None  # written by the caller: nothing of an image outlives its batch
            if handled >= batch_size:
                yield rows, handled
                rows, handled = [], 0
        if handled:
            yield rows, handled


def local_engine(threads: int | None = None, variant: str = AUTO) -> Engine:
    """This process, `threads` CPUs (default: the usable ones, at most 4): as many decode threads, and as many
    model calls at once, each a 1-thread ONNX Runtime run on a slice of the batch. Measured here (Lite0, 2 cores,
    the same 512 photos, alternating): 21.3 img/s and 31 ms CPU per image, against 19.5 and 34 for one run with
    2 intra-op threads (its threads wait for each other); the server runs 1-thread calls side by side too."""
    cpus = threads or runtime.default_threads()

    def run(bundle: Bundle, paths: list[str], done: Done, batch_size: int) -> Iterator[Chunk]:
        clf = Classifier(bundle, threads=1, variant=variant)
        yield from Scorer(clf, done, cpus, calls=cpus).chunks(paths, batch_size)
    return run


# --- the job -------------------------------------------------------------------------------------------------

@dataclass
class Summary:
    out: Path
    model: str
    model_version: str
    images: int  # inputs of this run
    scored: int = 0  # model runs
    copied: int = 0  # same bytes already scored under another path
    skipped: int = 0  # already in the output
    errors: int = 0
    rows: int = 0  # rows in the output file at the end (all model versions)
    seconds: float = 0.0
    accuracy: str | None = None  # the per-class table, when the source names classes

    def text(self) -> str:
        rate = (self.scored + self.copied) / self.seconds if self.seconds else 0.0
        return (f"{self.out}: {self.rows} rows. This run: {self.images} images, {self.scored} scored, {self.copied} "
                f"copied from a file with the same bytes, {self.skipped} already there, {self.errors} errors; "
                f"{self.seconds:.1f} s ({rate:.1f} img/s). Model {self.model} {self.model_version}.")


def _brief(row: dict) -> dict:
    return {"label": row["label"], "abstained": row["abstained"], "error": row["error"]}


def predict_dir(source: str | Path, model: str | Path, out: str | Path, fmt: str | None = None,
                batch_size: int = 64, engine: Engine | None = None, progress: TextIO | None = None) -> Summary:
    """Score every image of `source` with the newest valid version of `model` into `out` (resuming it)."""
    if batch_size < 1:
        raise BatchError("--batch-size must be at least 1")
    start = time.perf_counter()
    src = read_source(source)
    bundle = load_newest(model)
    with open_store(Path(out), fmt) as store:
        existing = store.read()
        done = done_index(existing, bundle.version)
        keep = src.labels.keys()  # for the accuracy table, only what it reads of each labelled image's row
        latest = {r["path"]: _brief(r) for r in existing if r["model_version"] == bundle.version and r["path"] in keep}
        del existing
        summary = Summary(store.out, bundle.name, bundle.version, len(src.paths))
        bar = Progress(len(src.paths), progress)
        try:
            for rows, handled in (engine or local_engine())(bundle, src.paths, done, batch_size):
                if rows:
                    store.append(rows)
                for r in rows:
                    if r["path"] in keep:
                        latest[r["path"]] = _brief(r)
                    summary.errors += bool(r["error"])
                    summary.copied += r["sha256"] in done
                summary.scored += sum(1 for r in rows if not r["error"] and r["sha256"] not in done)
                summary.skipped += handled - len(rows)
                bar.update(handled)
        finally:
            bar.close()
        summary.rows = store.finish()
    summary.seconds = time.perf_counter() - start
    if src.labels:
        summary.accuracy = format_accuracy(src.labels, latest, bundle.labels)
    return summary
