"""predict-dir, local engine: sources, rows, error rows, resume (also after kill -9), per-class accuracy."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import COLOURS, colour_image
from helpers import ROOT, make_photos, read_rows

from food_classifier import runtime
from food_classifier.batch.job import MAX_FILE_BYTES, Progress, predict_dir, read_source
from food_classifier.batch.store import COLUMNS, BatchError, open_store


def test_sources_folder_manifest_and_path_list(tmp_path):
    photos = make_photos(tmp_path / "photos")
    src = read_source(photos)
    assert len(src.paths) == 12 and all(Path(p).is_absolute() for p in src.paths)
    assert not any(".hidden" in p or p.endswith(".txt") for p in src.paths)
    assert src.labels[str(photos / "red" / "nested" / "red0.jpg")] == "red"
    assert set(src.labels.values()) == set(COLOURS)

    (tmp_path / "m.csv").write_text("path,label,tier\nphotos/red/red1.png,red,test\nphotos/blue/blue2.jpg,,test\n")
    m = read_source(tmp_path / "m.csv")
    assert m.paths == [str(photos / "red" / "red1.png"), str(photos / "blue" / "blue2.jpg")]
    assert m.labels == {str(photos / "red" / "red1.png"): "red"}

    (tmp_path / "list.txt").write_text(f"# photos\nphotos/green/green1.png\n\n{photos / 'red' / 'red2.jpg'}\n")
    assert read_source(tmp_path / "list.txt").paths == [str(photos / "green" / "green1.png"),
                                                        str(photos / "red" / "red2.jpg")]
    (tmp_path / "album" / "trip").mkdir(parents=True)
    colour_image("red").save(tmp_path / "album" / "trip" / "a.jpg")
    assert read_source(tmp_path / "album").labels == {}  # one subfolder is not a set of classes

    (tmp_path / "bad.csv").write_text("file,label\nx.jpg,red\n")
    (tmp_path / "empty").mkdir()
    for bad, message in [(tmp_path / "nope", "no such folder or file"), (tmp_path / "empty", "no images found"),
                         (tmp_path / "bad.csv", "needs a 'path' column")]:
        with pytest.raises(BatchError, match=message):
            read_source(bad)


def test_iter_batched_leaves_out_items_without_an_array():
    seen = []

    def compute(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        return batch.sum(axis=1)

    prep = lambda i: None if i % 3 == 0 else np.array([i, i], dtype=np.float32)  # noqa: E731
    out = list(runtime.iter_batched([0, 3, 1, 2, 6, 9, 4], prep, compute, batch_size=2, threads=2))
    assert seen == [2, 1] and out[0] is None and out[2] is None  # chunks [0,3] and [6,9]: nothing to run
    assert [list(o) for o in out if o is not None] == [[2.0, 4.0], [8.0]]
    assert [list(o) for o in runtime.map_batched([1, 2, 4], lambda i: np.full(2, i, np.float32), compute, 2)] == [
        [2.0, 4.0], [8.0]]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_rows_errors_and_accuracy(tmp_path, colour_bundle, suffix):
    photos = make_photos(tmp_path / "photos")
    (photos / "green" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (photos / "blue" / "empty.png").write_bytes(b"")
    out = tmp_path / f"results{suffix}"
    summary = predict_dir(photos, colour_bundle, out, batch_size=5, progress=io.StringIO())
    rows = read_rows(out)
    assert [list(r) for r in rows] == [list(COLUMNS)] * 14
    assert (summary.images, summary.scored, summary.errors, summary.rows) == (14, 12, 2, 14)
    by_path = {Path(r["path"]).name: r for r in rows}
    red = by_path["red1.png"]
    assert red["label"] == "red" and red["label_idx"] == 0 and red["abstained"] is False
    assert red["sha256"] == hashlib.sha256((photos / "red" / "red1.png").read_bytes()).hexdigest()
    assert [t["label"] for t in red["top_k"]][0] == "red" and len(red["top_k"]) == 3
    assert red["confidence"] == red["top_k"][0]["probability"] > 0.9
    assert (red["model"], red["model_version"], red["error"]) == ("colour", "20260101T000000-colour", None)
    assert all(r["label"] == Path(r["path"]).relative_to(photos).parts[0] for r in rows if not r["error"])
    for name in ("broken.jpg", "empty.png"):
        bad = by_path[name]
        assert bad["error"].startswith("invalid_image: ") and bad["label"] is None and bad["top_k"] is None
        assert bad["sha256"] == hashlib.sha256((photos / Path(bad["path"]).parent.name / name).read_bytes()).hexdigest()
    table = summary.accuracy.splitlines()
    assert table[0].split() == ["class", "images", "correct", "accuracy", "abstained", "errors"]
    assert table[1].split() == ["blue", "5", "4", "100.0%", "0", "1"]
    assert table[-1].split() == ["all", "14", "12", "100.0%", "0", "2"]


def test_resume_skips_scored_images_and_copies_known_bytes(tmp_path, colour_bundle):
    photos = make_photos(tmp_path / "photos")
    out = tmp_path / "r.parquet"
    paths = read_source(photos).paths
    (tmp_path / "first.txt").write_text("\n".join(paths[:5]))
    assert predict_dir(tmp_path / "first.txt", colour_bundle, out, progress=io.StringIO()).scored == 5
    (photos / "red" / "copy.jpg").write_bytes(Path(paths[1]).read_bytes())  # known bytes, another path
    again = predict_dir(photos, colour_bundle, out, progress=io.StringIO())
    assert (again.skipped, again.copied, again.scored, again.rows) == (5, 1, 7, 13)
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(read_source(photos).paths)  # every image exactly once
    copy = next(r for r in rows if r["path"].endswith("copy.jpg"))
    original = next(r for r in rows if r["path"] == paths[1])
    assert {**copy, "path": None} == {**original, "path": None}
    assert not (tmp_path / "r.parquet.parts").exists() and not (tmp_path / "r.parquet.lock").exists()

    colour_image("green", seed=99).save(paths[0])  # new bytes at a path that has a row: scored again, replaced
    third = predict_dir(photos, colour_bundle, out, progress=io.StringIO())
    assert (third.scored, third.skipped, third.rows) == (1, 12, 13)
    assert next(r for r in read_rows(out) if r["path"] == paths[0])["label"] == "green"


def test_a_torn_jsonl_line_is_cut_and_a_locked_output_refused(tmp_path, colour_bundle):
    photos = make_photos(tmp_path / "photos", per_class=2)
    out = tmp_path / "r.jsonl"
    predict_dir(photos, colour_bundle, out, progress=io.StringIO())
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][:40])  # a kill in the middle of the last write
    again = predict_dir(photos, colour_bundle, out, progress=io.StringIO())
    assert (again.scored, again.skipped) == (1, 5) and out.read_text().endswith("\n")
    assert len(read_rows(out)) == 6
    with open_store(out), pytest.raises(BatchError, match="another predict-dir is writing"):
        open_store(out)
    (tmp_path / "other.jsonl").write_text('{"some": "json"}\n')
    with pytest.raises(BatchError, match="not a predict-dir result line"):
        predict_dir(photos, colour_bundle, tmp_path / "other.jsonl")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_kill_9_midway_then_rerun_writes_every_image_exactly_once(tmp_path, colour_bundle, suffix):
    """The job is killed with SIGKILL as soon as it has written a few batches, and the rerun scores only
    what the killed run had not written. (It used to block on a FIFO in the list; a FIFO is now an error
    row, test_special_files_in_a_list_become_error_rows.)"""
    paths = []
    for i in range(400):
        p = tmp_path / "photos" / f"{i:03d}.jpg"
        p.parent.mkdir(exist_ok=True)
        colour_image(list(COLOURS)[i % 3], seed=i).save(p)
        paths.append(str(p))
    (tmp_path / "list.txt").write_text("\n".join(paths))
    out = tmp_path / f"r{suffix}"
    cmd = [sys.executable, "-m", "food_classifier.cli", "predict-dir", str(tmp_path / "list.txt"), "--model",
           str(colour_bundle), "--out", str(out), "--batch-size", "4", "--threads", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _written(out) < 24:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    before = _written(out)
    assert 24 <= before < 400 and before % 4 == 0, before  # whole batches only
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"400 images, {400 - before} scored" in done.stdout and f"{before} already there" in done.stdout
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == paths and all(r["error"] is None for r in rows)
    assert not list(tmp_path.glob("*.parts")) and not list(tmp_path.glob("*.lock"))


def test_special_files_in_a_list_become_error_rows(tmp_path, colour_bundle):
    """A FIFO (reading it would wait for a writer forever), /dev/zero (endless), a folder and a file over the
    size cap, listed in a path list: each is an error row, the job ends at once and scores the rest."""
    good = tmp_path / "red.jpg"
    colour_image("red").save(good)
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    (tmp_path / "folder.jpg").mkdir()
    entries = [good, fifo, Path("/dev/zero"), tmp_path / "folder.jpg", huge]
    (tmp_path / "list.txt").write_text("\n".join(map(str, entries)))
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "food_classifier.cli", "predict-dir", str(tmp_path / "list.txt"), "--model",
           str(colour_bundle), "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)  # it used to hang here
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    errors = {Path(r["path"]).name: r["error"] for r in read_rows(out)}
    assert errors == {"red.jpg": None, "fifo.jpg": "not_a_file: a FIFO, not a regular file",
                      "zero": "not_a_file: a device, not a regular file",
                      "folder.jpg": "not_a_file: a folder, not a regular file",
                      "huge.jpg": f"too_large: {MAX_FILE_BYTES + 1} bytes, over the 64 MiB limit for an image file"}
    manifest = tmp_path / "m.csv"  # the same through a manifest
    manifest.write_text("path,label\n" + "".join(f"{e},red\n" for e in entries))
    done = subprocess.run(cmd[:4] + [str(manifest)] + cmd[5:-1] + [str(tmp_path / "m.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "4 errors" in done.stdout, done.stdout + done.stderr


def _written(out: Path) -> int:
    """Rows on disk now: JSONL lines, or the rows of the Parquet parts (complete files only)."""
    if out.suffix == ".jsonl":
        return out.read_text().count("\n") if out.exists() else 0
    parts = out.with_name(out.name + ".parts")
    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts.glob("*.parquet")) if parts.exists() else 0


def test_progress_prints_one_line_per_tenth_when_not_a_terminal():
    buf = io.StringIO()
    bar = Progress(1000, buf)
    for _ in range(100):
        bar.update(10)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("100/1000 images (10 %)") and "img/s  ETA" in lines[0]
    assert lines[-1].startswith("1000/1000 images (100 %)")


def test_cli_prints_accuracy_and_missing_extras_are_one_line(tmp_path, colour_bundle):
    photos = make_photos(tmp_path / "photos", per_class=2)
    base = [sys.executable, "-m", "food_classifier.cli", "predict-dir", str(photos), "--model", str(colour_bundle)]
    ok = subprocess.run([*base, "--out", str(tmp_path / "r.parquet")], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ["all", "6", "6", "100.0%", "0", "0"] in [line.split() for line in ok.stdout.splitlines()]
    assert "r.parquet: 6 rows" in ok.stdout and "6/6 images (100 %)" in ok.stderr
    hide = "import sys; sys.modules['{0}'] = None; sys.argv = {1!r}; from food_classifier.cli import main; main()"
    for module, args, extra in [
            ("pyarrow", ["--out", str(tmp_path / "x.parquet")], "food-classifier[parquet]"),
            ("ray", ["--out", str(tmp_path / "x.jsonl"), "--engine", "ray"], "food-classifier[ray]")]:
        res = subprocess.run([sys.executable, "-c", hide.format(module, ["food-classifier", *base[3:], *args])],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and extra in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_importing_the_core_never_imports_ray():
    code = ("import sys, food_classifier.batch.job, food_classifier.batch.ray_engine, food_classifier.cli, "
            "food_classifier.serving.http.app, food_classifier.serving.ray_serve; "
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_memory_per_model_call_and_decode_ahead_are_bounded(tmp_path, colour_bundle):
    """What made predict-dir peak at 3.5 GB: 64-image batches went to ONNX Runtime in calls of 32 (its
    activations and arena grow with the images per call) and 2 whole batches were decoded ahead. Now every
    call has at most MAX_CALL_IMAGES images and at most two small steps of decoded images are alive, whatever
    --batch-size; rows still come out per batch_size."""
    import weakref

    from food_classifier.batch.job import MAX_CALL_IMAGES, Scorer
    from food_classifier.inference import Classifier

    class Watched(Classifier):
        calls: list[int] = []
        alive: list[weakref.ref] = []
        most_alive = 0

        def preprocess(self, image):
            array = super().preprocess(image)
            with lock:
                Watched.alive = [r for r in Watched.alive if r() is not None] + [weakref.ref(array)]
                Watched.most_alive = max(Watched.most_alive, len(Watched.alive))
            return array

        def infer(self, batch):
            Watched.calls.append(len(batch))
            return super().infer(batch)

    import threading
    lock = threading.Lock()
    paths = []
    for i in range(300):
        p = tmp_path / f"{i:03d}.png"
        colour_image(list(COLOURS)[i % 3], seed=i).save(p)
        paths.append(str(p))
    scorer = Scorer(Watched(colour_bundle, threads=1), threads=2, calls=2)
    out = list(scorer.chunks(paths, 64))
    assert [handled for _, handled in out] == [64, 64, 64, 64, 44] and sum(len(r) for r, _ in out) == 300
    assert max(Watched.calls) <= MAX_CALL_IMAGES and sum(Watched.calls) == 300
    assert Watched.most_alive <= 3 * 2 * 2 * MAX_CALL_IMAGES, Watched.most_alive  # before: 2 batches of 64 + more
