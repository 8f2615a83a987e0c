"""Kept photos (monitoring/keep.py) and the labelled-photo folder (monitoring/labels.py), on real files.

The read-only and full-disk cases mount a real tmpfs (read-only, or of 64 KiB) when run as root; elsewhere a
read-only folder is a chmod 555 one and the full-disk case is skipped."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import colour_image, image_bytes

from food_classifier.answer import Answer, TopK
from food_classifier.monitoring.keep import KeptPhotos, margin_score, why_keep
from food_classifier.monitoring.labels import (
    PROVENANCE,
    LabelError,
    LabelWriter,
    read_provenance,
)

LABELS = ["red", "green", "blue"]


def answer(probs, reason=None, rid="r1") -> Answer:
    p = np.asarray(probs, dtype=np.float32)
    order = np.argsort(-p)
    idx = int(order[0])
    return Answer(label=reason or LABELS[idx], label_idx=idx, confidence=float(p[idx]),
                  top_k=tuple(TopK(LABELS[j], float(p[j])) for j in order), abstained=reason is not None,
                  reason=reason, model="colour", model_version="v1", request_id=rid, probabilities=p)


def photo(seed: int, size=(64, 48)) -> bytes:
    return image_bytes(colour_image(LABELS[seed % 3], size=size, noise=60, seed=seed))


def test_informativeness_is_the_margin_of_the_two_best_classes():
    assert margin_score(np.array([0.5, 0.45, 0.05]), 0.5) == pytest.approx(0.95)
    assert why_keep(answer([0.5, 0.45, 0.05]), 0.2)[1] == "uncertain"
    assert why_keep(answer([0.9, 0.05, 0.05]), 0.2)[1] is None
    assert why_keep(answer([0.9, 0.05, 0.05], reason="unsure"), 0.2)[1] == "abstained"
    assert why_keep(answer([0.9, 0.05, 0.05], reason="not_food"), 0.2)[1] == "not_food"


def test_keeps_the_unsure_and_a_sample_content_addressed_and_once(tmp_path):
    keep = KeptPhotos(tmp_path / "kept", max_bytes=10 << 20, sample=0.0, margin=0.2)
    unsure, sure = photo(1), photo(2)
    assert keep.offer(answer([0.5, 0.45, 0.05], rid="a"), unsure, LABELS)
    assert not keep.offer(answer([0.9, 0.05, 0.05]), sure, LABELS)  # confident, and no random sample
    assert keep.offer(answer([0.5, 0.45, 0.05], rid="b"), unsure, LABELS)  # same bytes again: deduplicated
    keep.flush()
    sha = hashlib.sha256(unsure).hexdigest()
    assert sorted(p.name for p in (tmp_path / "kept" / "photos").iterdir()) == [f"{sha}.jpg", f"{sha}.json"]
    assert (tmp_path / "kept" / "photos" / f"{sha}.jpg").read_bytes() == unsure
    rec = json.loads((tmp_path / "kept" / "photos" / f"{sha}.json").read_text())
    assert rec["request_id"] == "a" and rec["model_version"] == "v1" and rec["why"] == "uncertain"
    assert rec["answer"]["label"] == "red" and rec["labels"] == LABELS and len(rec["probabilities"]) == 3
    assert rec["time"].endswith("Z") and rec["informativeness"] == pytest.approx(0.95, abs=1e-6)
    assert (keep.kept, keep.duplicates) == (1, 1)
    sampler = KeptPhotos(tmp_path / "all", max_bytes=10 << 20, sample=1.0, margin=0.0)
    assert sampler.offer(answer([0.9, 0.05, 0.05]), sure, LABELS)
    sampler.flush()
    assert json.loads(next((tmp_path / "all" / "photos").glob("*.json")).read_text())["why"] == "random"
    keep.close()
    sampler.close()


def test_bounded_least_informative_then_oldest_evicted_first(tmp_path):
    keep = KeptPhotos(tmp_path / "kept", max_bytes=10 << 20, margin=1.0, sample=0.0)
    shas = []
    for i, probs in enumerate([[0.5, 0.49, 0.01], [0.7, 0.3, 0.0], [0.5, 0.48, 0.02], [0.6, 0.38, 0.02]]):
        data = photo(10 + i)
        shas.append(hashlib.sha256(data).hexdigest())
        keep.offer(answer(probs, rid=str(i)), data, LABELS)
        keep.flush()
        time.sleep(0.01)
    size = keep.bytes
    keep.max_bytes = size - 1  # one photo too many: the least informative (0.6 margin -> 0.6) goes
    keep.offer(answer([0.5, 0.5, 0.0], rid="x"), photo(20), LABELS)
    keep.flush()
    assert shas[1] not in keep and all(s in keep for s in (shas[0], shas[2], shas[3]))
    assert not list((tmp_path / "kept" / "photos").glob(f"{shas[1]}.*"))
    keep.max_bytes = keep.bytes - 1  # next: among equally informative (0.8 when rounded), the oldest: shas[3]
    keep.offer(answer([0.51, 0.49, 0.0], rid="y"), photo(21), LABELS)
    keep.flush()
    assert shas[3] not in keep and shas[0] in keep and keep.evicted == 2
    keep.close()


def test_a_restart_reads_the_folder_back_and_drops_what_a_crash_left(tmp_path):
    keep = KeptPhotos(tmp_path / "kept", max_bytes=10 << 20, margin=1.0)
    data = photo(3)
    keep.offer(answer([0.5, 0.45, 0.05]), data, LABELS)
    keep.flush()
    keep.close()
    photos = tmp_path / "kept" / "photos"
    (photos / ".deadbeef.jpg.123.tmp").write_bytes(data[:100])  # a crash mid-write
    (photos / ("f" * 64 + ".jpg")).write_bytes(data)  # a crash between the photo's rename and its record's
    (photos / ("e" * 64 + ".json")).write_text("{torn")  # a torn record (no photo behind it)
    again = KeptPhotos(tmp_path / "kept", max_bytes=10 << 20, margin=1.0)
    assert hashlib.sha256(data).hexdigest() in again and again.bytes > len(data)
    assert sorted(p.suffix for p in photos.iterdir()) == [".jpg", ".json"]
    again.close()


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_folder_is_said_once_and_never_fails_an_offer(tmp_path, caplog):
    ro = tmp_path / "ro"
    if os.geteuid() == 0:
        ctx = tmpfs(ro, "ro,size=1m")
    else:
        ro.mkdir()
        ro.chmod(0o555)
        ctx = contextlib.nullcontext(ro)
    with ctx, caplog.at_level("WARNING", logger="food_classifier.serving"):
        keep = KeptPhotos(ro / "kept", max_bytes=1 << 20, margin=1.0)
        assert keep.broken and "cannot write" in caplog.text and "predictions are not affected" in caplog.text
        for i in range(3):
            keep.offer(answer([0.5, 0.45, 0.05]), photo(30 + i), LABELS)  # returns; nothing raised
        keep.flush()
        assert keep.errors == 3 and keep.kept == 0
        assert sum("kept photos" in r.message for r in caplog.records) == 2  # the start, then the first failure
        keep.close()


def test_a_full_disk_keeps_no_half_photo_and_counts(tmp_path):
    with tmpfs(tmp_path / "small", "size=64k") as small:
        keep = KeptPhotos(small / "kept", max_bytes=10 << 20, margin=1.0)
        big = image_bytes(colour_image("red", size=(600, 400), noise=120, seed=5))
        assert len(big) > 64 * 1024
        keep.offer(answer([0.5, 0.45, 0.05]), photo(40), LABELS)
        keep.offer(answer([0.5, 0.45, 0.05]), big, LABELS)
        keep.flush()
        assert keep.kept == 1 and keep.errors == 1
        names = [p.name for p in (small / "kept" / "photos").iterdir()]
        assert len(names) == 2 and not any(n.startswith(".") for n in names)  # no temporary, no half photo
        keep.close()


def test_labels_land_in_the_training_layout_with_provenance(tmp_path):
    w = LabelWriter(tmp_path / "data")
    data = photo(50)
    sha = hashlib.sha256(data).hexdigest()
    w.write(sha, data, "red", previous={"label": "green"}, model_version="v1", request_id="r", source="label page")
    assert (tmp_path / "data" / "red" / f"{sha}.jpg").read_bytes() == data
    w.write(sha, data, "blue", previous=None, model_version="v1", request_id="r", source="feedback")
    assert not (tmp_path / "data" / "red" / f"{sha}.jpg").exists()  # the latest label wins, one copy
    w.write(sha, data, "not_food", previous=None, model_version="v1", request_id=None, source="label page")
    assert (tmp_path / "data" / ".not_food" / f"{sha}.jpg").exists()  # hidden: training skips it
    assert read_provenance(tmp_path / "data").labels == {sha: "not_food"}
    w.remove(sha, source="label page")
    assert read_provenance(tmp_path / "data").labels == {} and not w.copies(sha)
    lines = [json.loads(x) for x in (tmp_path / "data" / PROVENANCE).read_text().splitlines()]
    assert [x["label"] for x in lines] == ["red", "blue", "not_food", None]
    assert lines[0]["previous"] == {"label": "green"} and lines[1]["source"] == "feedback"
    with pytest.raises(LabelError, match="cannot be a folder"):
        w.write(sha, data, "../escape", previous=None, model_version=None, request_id=None, source="x")


def test_a_corrupt_provenance_line_is_named_skipped_and_kept(tmp_path):
    w = LabelWriter(tmp_path)
    w.write("a" * 64, photo(1), "red", previous=None, model_version=None, request_id=None, source="t")
    with open(tmp_path / PROVENANCE, "a") as f:
        f.write('{"sha256": "b", "lab')  # a torn line: no newline
    w.write("c" * 64, photo(2), "green", previous=None, model_version=None, request_id=None, source="t")
    before = (tmp_path / PROVENANCE).read_bytes()
    prov = read_provenance(tmp_path)
    assert prov.labels == {"a" * 64: "red", "c" * 64: "green"}
    assert len(prov.problems) == 1 and "line 2" in prov.problems[0] and "left as it is" in prov.problems[0]
    assert (tmp_path / PROVENANCE).read_bytes() == before  # nothing rewritten, nothing lost


def test_feedback_on_a_kept_photo_is_written_and_on_an_evicted_one_is_said(tmp_path, caplog):
    keep = KeptPhotos(tmp_path / "kept", max_bytes=10 << 20, margin=1.0, data=tmp_path / "data")
    a, b = photo(60), photo(61)
    sha_a, sha_b = (hashlib.sha256(x).hexdigest() for x in (a, b))
    keep.offer(answer([0.5, 0.45, 0.05], rid="ra"), a, LABELS)
    keep.offer(answer([0.5, 0.45, 0.05], rid="rb"), b, LABELS)
    keep.flush()
    assert keep.feedback(sha_a, "green", {"label": "red"}, "v1", "ra") == f"green/{sha_a}.jpg"
    assert keep.feedback("0" * 64, "green", {"label": "red"}, "v1", "rx") is None  # never kept
    for p in (tmp_path / "kept" / "photos").glob(f"{sha_b}.*"):  # evicted by another hand between the two steps
        p.unlink()
    with caplog.at_level("WARNING", logger="food_classifier.serving"):
        keep.feedback(sha_b, "blue", {"label": "red"}, "v1", "rb")
        keep.flush()
    assert "after the photo was evicted" in caplog.text
    assert (tmp_path / "data" / "green" / f"{sha_a}.jpg").read_bytes() == a
    assert not (tmp_path / "data" / "blue").exists() and keep.labels == 1
    line = json.loads((tmp_path / "data" / PROVENANCE).read_text())
    assert line["source"] == "feedback" and line["previous"]["confidence"] == pytest.approx(0.5)
    keep.close()
