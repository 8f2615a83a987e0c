"""The run folder `runs/<run>/`: its file names and the only code that reads or writes them.

The pipeline passes its values in memory from stage to stage; this folder is the record it leaves
behind, read back only by the commands that start from a finished run (`evaluate RUN`,
`report RUN`, `export RUN`, `train --resume`):

    config.json        RunMeta: architecture, labels, preprocessing, TrainConfig, manifest, timing
    history.csv        one row per epoch (History)
    best.pt, last.pt   best checkpoint; last epoch's full state for --resume (end-to-end paths)
    head_logits.npz    head path: eval-view logits of the tiers the head was fitted on
    oof_logits.npz     head path: out-of-fold logits of train+validation (calibration fits on them)
    model.onnx, model.int8.onnx   exported graphs, until publish moves them into the bundle
    parity.json        ONNX Runtime vs PyTorch on real images
    logits.npz         Scores: the exported model's logits for every manifest image
    metrics.json       per-tier metrics, temperature applied
    calibration.json   temperature, abstention, reliability bins, coverage curves
    cv.json            `train --cv K`
    bundle_path.txt    where the run's bundle was published
    timings.json       wall seconds per stage of `train` (prepare, fit, export, evaluate, ...; pipeline.py)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from food_classifier.preprocessing import PreprocessSpec
from food_classifier.training.config import TrainConfig

CONFIG = "config.json"
HISTORY = "history.csv"
HISTORY_PNG = "history.png"
BEST, LAST = "best.pt", "last.pt"
HEAD_LOGITS = "head_logits.npz"
OOF_LOGITS = "oof_logits.npz"
FP32_ONNX, INT8_ONNX = "model.onnx", "model.int8.onnx"
PARITY = "parity.json"
LOGITS = "logits.npz"
METRICS = "metrics.json"
CALIBRATION = "calibration.json"
CV = "cv.json"
BUNDLE_PATH = "bundle_path.txt"
TIMES = "timings.json"
BUNDLE_DIR = "bundle"  # the publish target when there is no models dir


@dataclass
class RunMeta:
    """config.json: what was trained, on what, how."""

    arch: str
    labels: list[str]
    preprocessing: PreprocessSpec
    config: TrainConfig
    manifest: str
    started_at: str
    fit_tiers: list[str]  # tiers the final model was fitted on: their metrics are not held-out estimates
    train_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"arch": self.arch, "labels": self.labels, "preprocessing": self.preprocessing.to_dict(),
             "config": asdict(self.config), "manifest": self.manifest, "started_at": self.started_at,
             "fit_tiers": self.fit_tiers}
        return d | ({"train_seconds": self.train_seconds} if self.train_seconds is not None else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunMeta:
        return cls(arch=d["arch"], labels=list(d["labels"]), preprocessing=PreprocessSpec.from_dict(d["preprocessing"]),
                   config=TrainConfig(**d["config"]), manifest=d["manifest"], started_at=d.get("started_at", ""),
                   fit_tiers=list(d.get("fit_tiers", ["train"])), train_seconds=d.get("train_seconds"))


@dataclass
class HeldOut:
    """Logits of images the model never saw while fitting (out-of-fold), with their labels."""

    logits: np.ndarray
    y: np.ndarray
    members: np.ndarray | None = None  # [M, N, C] each ensemble member's own logits (the cascade's stages)


@dataclass
class Scores:
    """The exported model's raw logits for every manifest image (logits.npz)."""

    logits: np.ndarray
    y: np.ndarray
    tier: np.ndarray
    path: np.ndarray
    labels: list[str] = field(default_factory=list)


def is_run(run: str | Path) -> bool:
    return (Path(run) / CONFIG).is_file()


def write_meta(run: Path, meta: RunMeta) -> None:
    (run / CONFIG).write_text(json.dumps(meta.to_dict(), indent=2))


def read_meta(run: str | Path) -> RunMeta:
    path = Path(run) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a run dir (no {CONFIG})")
    return RunMeta.from_dict(json.loads(path.read_text()))


def write_head_logits(run: Path, logits: dict[str, np.ndarray]) -> None:
    np.savez_compressed(run / HEAD_LOGITS, logits=np.stack(list(logits.values())), path=np.array(list(logits)))


def read_head_logits(run: Path) -> dict[str, np.ndarray] | None:
    if not (run / HEAD_LOGITS).is_file():
        return None
    with np.load(run / HEAD_LOGITS) as h:
        return dict(zip(h["path"].tolist(), h["logits"], strict=True))


def write_oof(run: Path, oof: HeldOut) -> None:
    extra = {} if oof.members is None else {"members": oof.members}
    np.savez_compressed(run / OOF_LOGITS, logits=oof.logits, y=oof.y, **extra)


def read_oof(run: Path) -> HeldOut | None:
    if not (run / OOF_LOGITS).is_file():
        return None
    with np.load(run / OOF_LOGITS) as o:
        return HeldOut(o["logits"], o["y"], o["members"] if "members" in o else None)


def drop_head_outputs(run: Path) -> None:
    """After fine-tuning, the head's logits no longer describe the model."""
    for stale in (OOF_LOGITS, HEAD_LOGITS):
        (run / stale).unlink(missing_ok=True)


def write_scores(run: Path, s: Scores) -> None:
    np.savez_compressed(run / LOGITS, logits=s.logits, y=s.y, tier=s.tier, path=s.path, labels=np.array(s.labels))


def read_scores(run: str | Path) -> Scores:
    path = Path(run) / LOGITS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `food-classifier evaluate {run}` first")
    with np.load(path) as d:
        return Scores(d["logits"], d["y"], d["tier"], d["path"], [str(x) for x in d["labels"]])


def write_json(run: Path, name: str, value: dict) -> None:
    """metrics.json, calibration.json, parity.json, cv.json."""
    (run / name).write_text(json.dumps(value, indent=2))


def read_json(run: str | Path, name: str) -> dict | None:
    path = Path(run) / name
    return json.loads(path.read_text()) if path.is_file() else None


def write_bundle_path(run: Path, bundle: Path) -> None:
    (run / BUNDLE_PATH).write_text(str(Path(bundle).resolve()) + "\n")


def bundle_dir(run: str | Path) -> Path | None:
    """The run's bundle: where it was published (bundle_path.txt), else `<run>/bundle`."""
    run = Path(run)
    pointer = run / BUNDLE_PATH
    if pointer.is_file():
        published = Path(pointer.read_text().strip())
        if published.is_dir():
            return published
    return run / BUNDLE_DIR if (run / BUNDLE_DIR).is_dir() else None


# --- checkpoints (torch is imported only by the callers that have it) ------------------------

def save_checkpoint(run: Path, state: dict, last: bool = False) -> None:
    import torch

    torch.save(state, run / (LAST if last else BEST))


def load_checkpoint_state(run: Path, last: bool = False) -> dict | None:
    import torch

    path = run / (LAST if last else BEST)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=not last)


# --- history ---------------------------------------------------------------------------------

class History:
    """Appends one CSV row per epoch and tracks early stopping on validation loss."""

    FIELDS = ["stage", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]

    def __init__(self, run: Path, stage: str, patience: int):
        self.path, self.stage, self.patience = run / HISTORY, stage, patience
        self.best, self.bad_epochs = math.inf, 0
        if not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)

    def log(self, epoch: int, train_loss: float, train_acc: float, val_loss: float, val_acc: float,
            lr: float, seconds: float) -> bool:
        """Write the row; True when this epoch is the best so far (save a checkpoint)."""
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([self.stage, epoch, f"{train_loss:.5f}", f"{train_acc:.4f}", f"{val_loss:.5f}",
                                    f"{val_acc:.4f}", f"{lr:.3g}", f"{seconds:.2f}"])
        improved = val_loss < self.best - 1e-4
        self.best, self.bad_epochs = (val_loss, 0) if improved else (self.best, self.bad_epochs + 1)
        return improved

    @property
    def stop(self) -> bool:
        return self.bad_epochs >= self.patience
