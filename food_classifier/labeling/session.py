"""One labelling session over a kept-photos folder: the queue, the labels written, undo, and the folder's lock.

Every label is written at once (`monitoring.labels.LabelWriter`: the photo under DATA/<class>/, one provenance
line), so closing the page, or a crash, loses nothing but the position in the queue. Undo rewrites the folder to
what it was before the last label (and says so in the provenance), or steps back over the last skip.
"""

from __future__ import annotations

import fcntl
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from food_classifier.labeling.queue import Item, load, order
from food_classifier.monitoring.labels import (
    NOT_FOOD_DIR,
    NOT_FOOD_LABEL,
    LabelError,
    LabelWriter,
    check_class_name,
    read_provenance,
)

SOURCE = "label page"
LOCK = ".label.lock"


class SessionError(Exception):
    """A request the page cannot honour: `status` and `code` for the JSON answer, the message for a person."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status or self.status
        self.code = code or self.code


class FolderLocked(SessionError):
    status, code = 409, "locked"


@dataclass
class _Done:
    sha256: str
    position: int
    before: str | None  # the photo's label before this action (None: unlabelled)
    label: str | None  # the label given (None: a skip)


def check_writable(data: Path) -> None:
    """Fail at start, not at the first label, when the labels cannot be written."""
    probe = Path(data) / f".probe.{os.getpid()}"
    try:
        Path(data).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SessionError(f"cannot write labels to {data} ({exc.strerror or exc}): pass --data to a writable "
                           f"folder") from None


def lock_folder(keep_dir: Path, data: Path) -> int:
    """Hold the folder's lock for this process's life: two pages on one folder would label photos twice. A
    read-only kept folder (an archived copy) is locked through its labels folder instead."""
    try:
        fd = os.open(Path(keep_dir) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        fd = os.open(Path(data) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise FolderLocked(f"another label page (pid {holder}) is open on {keep_dir}; close it first, or label "
                           f"another folder") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


class Session:
    def __init__(self, keep_dir: str | Path, data: str | Path, classifier: Any = None):
        self.keep_dir = Path(keep_dir)
        self.data = Path(data)
        self.writer = LabelWriter(self.data)
        prov = read_provenance(self.data)
        items, problems = load(self.keep_dir, classifier)
        self.problems = prov.problems + problems
        self.labelled: dict[str, str] = prov.labels
        self.total = len(items)
        self.queue: list[Item] = order([it for it in items if it.sha256 not in self.labelled]) if items else []
        self.position = 0
        self.history: list[_Done] = []
        model_labels = list(classifier.labels) if classifier is not None else []
        for it in items if classifier is None else []:
            model_labels += [label for label in it.record.get("labels", []) if label not in model_labels]
        folders = sorted(p.name for p in self.data.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if self.data.is_dir() else []
        self.labels = model_labels + [f for f in folders if f not in model_labels]
        self._lock = threading.Lock()

    # --- what the page shows ---------------------------------------------------------------------------
    def state(self, notice: str | None = None) -> dict[str, Any]:
        with self._lock:
            item = self.queue[self.position] if self.position < len(self.queue) else None
            done = sum(1 for it in self.queue if it.sha256 in self.labelled)
            return {"item": None if item is None else self._show(item), "labels": self.labels,
                    "progress": {"position": self.position, "queue": len(self.queue), "labelled_here": done,
                                 "labelled": len(self.labelled), "kept": self.total},
                    "data": str(self.data), "problems": self.problems, "notice": notice,
                    "can_undo": bool(self.history)}

    @staticmethod
    def _show(item: Item) -> dict[str, Any]:
        rec = item.record
        return {"sha256": item.sha256, "top": [[label, round(p, 4)] for label, p in item.top[:3]],
                "answer": rec.get("answer", {}), "model": rec.get("model"), "model_version": rec.get("model_version"),
                "why": rec.get("why"), "informativeness": round(item.score, 3), "time": rec.get("time"),
                "near_duplicates": item.near_duplicates}

    def photo(self, sha256: str) -> Path:
        item = self._find(sha256)
        if not item.photo.is_file():
            raise self._evicted(sha256)
        return item.photo

    # --- actions -----------------------------------------------------------------------------------------
    def label(self, sha256: str, label: str, new: bool = False) -> dict[str, Any]:
        """Write `label` for the photo now (a new class only with `new`), then move on."""
        label = (label or "").strip()
        with self._lock:
            item = self._find(sha256)
            if label == NOT_FOOD_LABEL or label in self.labels:
                pass
            elif new:
                try:
                    check_class_name(label)
                except LabelError as exc:
                    raise SessionError(str(exc), 422, "bad_class_name") from None
            else:
                shown = label if len(label) <= 80 else label[:80] + "..."
                raise SessionError(f"unknown label {shown!r}: not a label of the model nor a class folder of "
                                   f"{self.data}; to add it, type it in the new-class field and confirm", 422,
                                   "unknown_label")
            try:
                image = item.photo.read_bytes()
            except FileNotFoundError:
                self.position = max(self.position, self.queue.index(item) + 1)
                raise self._evicted(sha256) from None
            before = self.labelled.get(sha256)
            try:
                self.writer.write(sha256, image, label, previous=item.previous(),
                                  model_version=item.record.get("model_version"),
                                  request_id=item.record.get("request_id"), source=SOURCE)
            except LabelError as exc:  # a model's own label that cannot be a folder name
                raise SessionError(str(exc), 422, "bad_class_name") from None
            except OSError as exc:
                raise SessionError(f"could not save the label in {self.data} ({exc.strerror or exc}): nothing was "
                                   f"written; free some space or pass --data to a writable folder", 507,
                                   "write_failed") from None
            if label not in self.labels and label != NOT_FOOD_LABEL:
                self.labels.append(label)
            self.labelled[sha256] = label
            self._advance(item, before, label)
        shown = "not food" if label == NOT_FOOD_LABEL else label
        where = NOT_FOOD_DIR if label == NOT_FOOD_LABEL else label
        return self.state(f"labelled {shown} → {self.data / where}")

    def skip(self, sha256: str) -> dict[str, Any]:
        with self._lock:
            item = self._find(sha256)
            self._advance(item, self.labelled.get(sha256), None)
        return self.state("skipped")

    def undo(self) -> dict[str, Any]:
        with self._lock:
            if not self.history:
                raise SessionError("nothing to undo", 409, "nothing_to_undo")
            last = self.history.pop()
            item = self._find(last.sha256)
            if last.label is not None:
                restore = None
                if last.before is not None:
                    try:
                        restore = (last.before, item.photo.read_bytes())
                    except FileNotFoundError:  # evicted meanwhile: the labelled copy still has the bytes
                        copies = self.writer.copies(last.sha256)
                        restore = (last.before, copies[0].read_bytes()) if copies else None
                self.writer.remove(last.sha256, source=SOURCE, restore=restore)
                if restore is None:
                    self.labelled.pop(last.sha256, None)
                else:
                    self.labelled[last.sha256] = last.before
            self.position = last.position
        return self.state("undone: " + ("label" if last.label is not None else "skip"))

    # --- helpers ----------------------------------------------------------------------------------------
    def _advance(self, item: Item, before: str | None, label: str | None) -> None:
        index = self.queue.index(item)
        self.history.append(_Done(item.sha256, index, before, label))
        self.position = max(self.position, index + 1)

    def _find(self, sha256: str) -> Item:
        for it in self.queue:
            if it.sha256 == sha256:
                return it
        raise SessionError(f"photo {sha256[:80]!r} is not in this page's queue (reload the page)", 404, "unknown_photo")

    def _evicted(self, sha256: str) -> SessionError:
        return SessionError(f"photo {sha256[:12]}… was evicted from {self.keep_dir} (the server needed the room) "
                            f"before it was labelled: nothing was written; on to the next photo", 410, "evicted")
