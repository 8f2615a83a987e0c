"""The labelling session (labeling/): queue order, labels written at once, undo, and every bad input, on real
files; the `label` command and the server's feedback path as real processes (`live`)."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import image_bytes
from PIL import Image

from food_classifier.answer import Answer, TopK
from food_classifier.labeling.queue import load, order
from food_classifier.labeling.session import FolderLocked, Session, SessionError, lock_folder
from food_classifier.monitoring.keep import KeptPhotos
from food_classifier.monitoring.labels import PROVENANCE, read_provenance
from food_classifier.testing import ServerProcess, free_port

LABELS = ["red", "green", "blue"]


def blocks(seed: int, size=(96, 80)) -> Image.Image:
    """A random 9x8 block picture: distinct seeds give distinct dHashes, a resize of one keeps its dHash."""
    grid = np.random.default_rng(seed).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.NEAREST)


def answer(probs, rid="r") -> Answer:
    p = np.asarray(probs, dtype=np.float32)
    idx = int(np.argmax(p))
    return Answer(label=LABELS[idx], label_idx=idx, confidence=float(p[idx]),
                  top_k=tuple(TopK(LABELS[j], float(p[j])) for j in np.argsort(-p)), abstained=False, reason=None,
                  model="colour", model_version="v1", request_id=rid, probabilities=p)


def kept_folder(root: Path, photos: list[tuple[bytes, list[float]]]) -> tuple[Path, list[str]]:
    keep = KeptPhotos(root, max_bytes=50 << 20, sample=0.0, margin=1.0)
    for i, (data, probs) in enumerate(photos):
        keep.offer(answer(probs, rid=f"req-{i}"), data, LABELS)
    keep.flush()
    keep.close()
    return root, [hashlib.sha256(d).hexdigest() for d, _ in photos]


def test_queue_informative_first_near_duplicates_collapsed_classes_take_turns(tmp_path):
    photos = [(image_bytes(blocks(1)), [0.50, 0.45, 0.05]),   # red, margin .05
              (image_bytes(blocks(2)), [0.48, 0.47, 0.05]),   # red, margin .01: the most informative
              (image_bytes(blocks(3)), [0.10, 0.60, 0.30]),   # green, margin .30
              (image_bytes(blocks(4)), [0.05, 0.15, 0.80]),   # blue, margin .65
              (image_bytes(blocks(2, size=(120, 100))), [0.60, 0.35, 0.05])]  # a near-duplicate of photo 2
    root, sha = kept_folder(tmp_path / "kept", photos)
    items, problems = load(root)
    assert not problems and len(items) == 5
    queue = order(items)
    # round 1: each class's best (red: photo 2, green: 3, blue: 4) by informativeness; round 2: red's next
    assert [it.sha256 for it in queue] == [sha[1], sha[2], sha[3], sha[0]]
    assert queue[0].near_duplicates == 1 and queue[0].top[0][0] == "red"
    # given dHashes (bench_active re-orders the same photos every round) are used instead of reading photos:
    # here all five "look alike", so only the most informative one is left
    for it in items:
        it.photo = tmp_path / "gone.jpg"
    (only,) = order(items, hashes=[7] * len(items))
    assert only.sha256 == sha[1] and only.near_duplicates == 4


def test_labels_are_written_at_once_undo_restores_and_bad_input_is_refused(tmp_path):
    photos = [(image_bytes(blocks(10 + i)), [0.5, 0.3 + 0.01 * i, 0.2 - 0.01 * i]) for i in range(4)]
    root, _ = kept_folder(tmp_path / "kept", photos)
    data = tmp_path / "data"
    s = Session(root, data)
    first = s.state()["item"]["sha256"]
    with pytest.raises(SessionError, match="unknown label 'sushi'.*new-class field") as e:
        s.label(first, "sushi")
    assert e.value.status == 422 and not data.exists()
    with pytest.raises(SessionError, match="cannot be a folder"):
        s.label(first, "../up", new=True)
    out = s.label(first, "green")
    assert (data / "green" / f"{first}.jpg").is_file() and out["progress"]["labelled_here"] == 1
    line = json.loads((data / PROVENANCE).read_text().splitlines()[-1])
    assert line["sha256"] == first and line["label"] == "green" and line["source"] == "label page"
    assert line["previous"]["label"] == "red" and line["model_version"] == "v1"
    assert line["request_id"].startswith("req-")
    second = out["item"]["sha256"]
    s.label(second, "sushi", new=True)  # a discovered class
    assert (data / "sushi" / f"{second}.jpg").is_file() and "sushi" in s.state()["labels"]
    third = s.state()["item"]["sha256"]
    s.skip(third)
    s.undo()  # the skip
    assert s.state()["item"]["sha256"] == third
    s.undo()  # the new-class label: the photo leaves the folder, the provenance says so
    assert not (data / "sushi" / f"{second}.jpg").exists() and s.state()["item"]["sha256"] == second
    assert read_provenance(data).labels == {first: "green"}
    with pytest.raises(SessionError, match="unknown label"):
        s.label(second, "purple")
    # a photo the server evicted while the page was open
    (root / "photos" / f"{second}.jpg").unlink()
    with pytest.raises(SessionError, match="evicted.*nothing was written") as e:
        s.label(second, "red")
    assert e.value.status == 410 and s.state()["item"]["sha256"] == third  # on to the next photo
    assert read_provenance(data).labels == {first: "green"}
    # a restart: what was labelled is out of the queue
    again = Session(root, data)
    assert first not in [it.sha256 for it in again.queue] and again.state()["progress"]["labelled"] == 1


def test_a_corrupt_provenance_line_is_shown_and_nothing_is_lost(tmp_path):
    root, sha = kept_folder(tmp_path / "kept", [(image_bytes(blocks(20 + i)), [0.5, 0.4, 0.1]) for i in range(2)])
    data = tmp_path / "data"
    Session(root, data).label(sha[0], "blue")
    with open(data / PROVENANCE, "ab") as f:
        f.write(b"\x00garbage not json\n")
    before = (data / PROVENANCE).read_bytes()
    s = Session(root, data)
    assert len(s.problems) == 1 and "line 2" in s.problems[0] and s.state()["problems"] == s.problems
    s.label(sha[1], "red")
    after = (data / PROVENANCE).read_bytes()
    assert after.startswith(before) and read_provenance(data).labels == {sha[0]: "blue", sha[1]: "red"}


def test_two_pages_on_one_folder_the_second_is_refused(tmp_path):
    root, _ = kept_folder(tmp_path / "kept", [(image_bytes(blocks(30)), [0.5, 0.4, 0.1])])
    fd = lock_folder(root, tmp_path / "data")
    try:
        with pytest.raises(FolderLocked, match=r"another label page \(pid \d+\) is open on"):
            lock_folder(root, tmp_path / "data")
    finally:
        import os
        os.close(fd)
    os.close(lock_folder(root, tmp_path / "data"))  # released: the next page may open


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "food_classifier.cli", "label", *args]


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "label exited"
        try:
            with urllib.request.urlopen(url + "/api/state", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url)


@pytest.mark.live
def test_label_command_locks_its_folder_and_explains_bad_folders(tmp_path):
    root, _ = kept_folder(tmp_path / "kept", [(image_bytes(blocks(40)), [0.5, 0.4, 0.1])])
    port = free_port()
    first = subprocess.Popen(_cli(str(root), "--port", str(port)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_up(f"http://127.0.0.1:{port}", first)
        second = subprocess.run(_cli(str(root), "--port", str(free_port())), capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 1 and f"another label page (pid {first.pid}) is open on" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.terminate()
        first.wait(15)
    missing = subprocess.run(_cli(str(tmp_path / "nowhere")), capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "--keep-photos" in missing.stderr and "Traceback" not in missing.stderr
    other, _ = kept_folder(tmp_path / "other", [(image_bytes(blocks(41)), [0.5, 0.4, 0.1])])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = subprocess.run(_cli(str(other), "--port", str(busy.getsockname()[1])), capture_output=True,
                               text=True, timeout=60)
    assert taken.returncode == 1 and "pass another --port" in taken.stderr and "Traceback" not in taken.stderr


@pytest.mark.live
def test_feedback_on_a_kept_photo_lands_in_the_training_folder(colour_bundle, tmp_path):
    from conftest import colour_image

    kept = tmp_path / "kept"
    args = ["--ort-threads", "1", "--keep-photos", str(kept), "--keep-margin", "1", "--keep-sample", "0"]
    photo = image_bytes(colour_image("green", size=(90, 70), noise=40, seed=7))
    sha = hashlib.sha256(photo).hexdigest()
    with ServerProcess([colour_bundle], args=args) as srv:
        req = urllib.request.Request(srv.url + "/v1/models/colour/predict", data=photo,
                                     headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(req, timeout=30) as r:
            rid = json.loads(r.read())["request_id"]
        deadline = time.monotonic() + 10
        while not (kept / "photos" / f"{sha}.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        body = json.dumps({"request_id": rid, "label": "blue"}).encode()
        req = urllib.request.Request(srv.url + "/v1/models/colour/feedback", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            out = json.loads(r.read())
        assert out["training_photo"] == f"blue/{sha}.jpg"
        target = kept / "labelled" / "blue" / f"{sha}.jpg"
        deadline = time.monotonic() + 10
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert target.read_bytes() == photo
        with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
            metrics = r.read().decode()
        assert "food_classifier_kept_photos_kept_total 1.0" in metrics
        assert "food_classifier_kept_photos_labels_total 1.0" in metrics
    line = json.loads((kept / "labelled" / PROVENANCE).read_text().splitlines()[-1])
    assert line["source"] == "feedback" and line["label"] == "blue" and line["request_id"] == rid
    assert line["previous"]["label"] == "green" and line["model_version"] == "20260101T000000-colour"
    # the label page then starts with the photo already labelled
    s = Session(kept, kept / "labelled")
    assert s.state()["progress"]["labelled"] == 1 and not s.queue


def test_the_labels_folder_is_what_train_data_reads(tmp_path):
    """The written layout is an ImageFolder for the training side: the provenance and "not food" stay hidden."""
    from food_classifier.training.data import find_image_root, scan

    photos = [(image_bytes(blocks(50 + i)), [0.5, 0.4, 0.1]) for i in range(3)]
    root, sha = kept_folder(tmp_path / "kept", photos)
    data = tmp_path / "data"
    s = Session(root, data)
    for h, label in zip(sha, ["red", "not_food", "blue"], strict=True):
        s.label(h, label)
    assert find_image_root(data) == data
    found = scan(data, progress=False)
    assert sorted((it.label, it.sha256) for it in found.items) == sorted([("red", sha[0]), ("blue", sha[2])])
    assert not found.rejected


def test_a_read_only_kept_folder_is_labelled_into_a_writable_data_folder(tmp_path):
    """An archived copy on a read-only disk: the lock moves to DATA, labels are written; a read-only DATA is
    refused at start with a message naming --data."""
    import os

    from food_classifier.labeling.session import check_writable

    root, sha = kept_folder(tmp_path / "kept", [(image_bytes(blocks(60)), [0.5, 0.4, 0.1])])
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "--bind", str(root), str(ro)], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
    else:
        import shutil

        shutil.copytree(root, ro, dirs_exist_ok=True)
        ro.chmod(0o555)
    try:
        with pytest.raises(SessionError, match="cannot write labels to .* pass --data"):
            check_writable(ro / "labelled")
        data = tmp_path / "data"
        check_writable(data)
        fd = lock_folder(ro, data)
        assert (data / ".label.lock").is_file()
        with pytest.raises(FolderLocked):
            lock_folder(ro, data)
        os.close(fd)
        Session(ro, data).label(sha[0], "red")
        assert (data / "red" / f"{sha[0]}.jpg").is_file()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=True)


def test_model_rescores_the_queue_and_names_the_labels(colour_bundle, tmp_path):
    """--model: the page scores photos with that model (the kept answers may be from an older version)."""
    from conftest import colour_image

    from food_classifier.inference import Classifier

    photos = [(image_bytes(colour_image(c, size=(80, 60), noise=30, seed=i)), [0.34, 0.33, 0.33])
              for i, c in enumerate(["red", "green", "blue"])]
    root, sha = kept_folder(tmp_path / "kept", photos)
    s = Session(root, tmp_path / "data", Classifier(colour_bundle))
    assert s.labels == ["red", "green", "blue"]
    predicted = {it.sha256: it.predicted for it in s.queue}
    assert predicted == dict(zip(sha, ["red", "green", "blue"], strict=True))  # the model's, not the kept rows
    assert all(it.score < 0.9 for it in s.queue)  # confident colours: far from the kept near-ties
