"""Training: `fit_run(manifest, config) -> Fitted` (in memory), `fit(...) -> run dir`.

Two paths, picked by the model:
- pretrained backbone (default): a linear head on cached frozen features (`head.py`), seconds;
  `fine_tune=True` then unfreezes the last blocks end to end at a lower learning rate (`loop.py`).
- from scratch (`base_cnn`): end to end with augmentation (`loop.py`).
- `quality="best"`: the last stage of each pretrained backbone tuned on cached trunk activations
  (`finetune.py`), the tuned classifiers as the ensemble's heads.
Both: seeded, history.csv + plot, the files of `runs.py` left in the run dir.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from food_classifier.training import runs
from food_classifier.training.config import TrainConfig
from food_classifier.training.data import TIERS, read_manifest
from food_classifier.training.head import backbone_keys, fit_head, fit_tiers
from food_classifier.training.loop import fit_end_to_end
from food_classifier.training.models import ModelError, create_model, default_preprocessing, is_pretrained, members
from food_classifier.training.report_plots import plot_history
from food_classifier.training.runs import HeldOut, RunMeta

__all__ = ["Fitted", "TrainConfig", "fit", "fit_run", "load_checkpoint", "load_fitted"]


@dataclass
class Fitted:
    """A trained model and what the later stages reuse from fitting it; `dir` holds the record."""

    dir: Path
    meta: RunMeta
    model: nn.Module                                # best weights, eval mode
    head_logits: dict[str, np.ndarray] | None = None  # head path: eval-view logits of the fitted tiers
    oof: HeldOut | None = None                        # head path: out-of-fold logits of train+validation
    stopped: str = ""                                 # --quality best: why fine-tuning stopped early, if it did


def new_run_dir(root: str | Path, arch: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    run = Path(root) / f"{stamp}-{arch}"
    n = 1
    while run.exists():
        run, n = Path(root) / f"{stamp}-{arch}-{n}", n + 1
    run.mkdir(parents=True)
    return run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit_run(manifest: str | Path, config: TrainConfig, runs_dir: str | Path = "runs",
            resume: str | Path | None = None) -> Fitted:
    """Train; the run dir gets best.pt, history.csv, history.png, config.json (and the head's logits)."""
    if config.fine_tune and "+" in config.arch:
        raise ModelError("--fine-tune trains one backbone end to end; pick one member of "
                         f"'{config.arch}' (e.g. --arch {members(config.arch)[0]})")
    seed_everything(config.seed)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    rows = read_manifest(manifest)
    labels = sorted({r.label for r in rows})
    run = Path(resume) if resume else new_run_dir(runs_dir, config.arch)
    spec = default_preprocessing(config.arch)
    if config.image_size:  # keep the model's resize/crop ratio
        spec = replace(spec, crop=config.image_size, resize=round(config.image_size * spec.resize / spec.crop))
    model = create_model(config.arch, num_classes=len(labels), weights=config.weights)
    meta = RunMeta(arch=config.arch, labels=labels, preprocessing=spec, config=config,
                   manifest=str(Path(manifest).resolve()), started_at=datetime.now(UTC).isoformat(),
                   fit_tiers=fit_tiers(config))
    runs.write_meta(run, meta)
    by_tier = {t: [r for r in rows if r.tier == t] for t in TIERS}
    t0 = time.time()
    fitted = Fitted(run, meta, model)
    if config.quality == "best":
        if not is_pretrained(config.arch, config.weights):
            raise ModelError("--quality best fine-tunes pretrained backbones; train a from-scratch model "
                             "with the default --quality fast")
        from food_classifier.training.finetune import fit_best

        fitted.stopped = fit_best(model, backbone_keys(config), by_tier, labels, spec, config, run).stopped
        runs.save_checkpoint(run, {"model": model.state_dict(), "epoch": 0, "stage": "best"})
    elif is_pretrained(config.arch, config.weights):
        head = fit_head(model, by_tier, labels, spec, config, run)
        fitted.head_logits, fitted.oof = head.fitted_logits, head.oof
        runs.write_head_logits(run, head.fitted_logits)
        runs.write_oof(run, head.oof)
        if config.fine_tune:
            fit_end_to_end(model, by_tier, labels, spec, config, run, fine_tune=True)
            fitted.head_logits = fitted.oof = None  # they describe the head, not the tuned model
            runs.drop_head_outputs(run)
    else:
        fit_end_to_end(model, by_tier, labels, spec, config, run, fine_tune=False)
    meta.train_seconds = round(time.time() - t0, 1)
    runs.write_meta(run, meta)
    plot_history(run / runs.HISTORY, run / runs.HISTORY_PNG)
    model.eval()
    return fitted


def fit(manifest: str | Path, config: TrainConfig, runs_dir: str | Path = "runs",
        resume: str | Path | None = None) -> Path:
    """`fit_run`, for callers that only want the run dir."""
    return fit_run(manifest, config, runs_dir=runs_dir, resume=resume).dir


def load_checkpoint(run: str | Path) -> tuple[nn.Module, RunMeta]:
    """The best model of a run, ready for eval, and its config.json."""
    run = Path(run)
    meta = runs.read_meta(run)
    model = create_model(meta.arch, num_classes=len(meta.labels), weights=meta.config.weights)
    model.load_state_dict(runs.load_checkpoint_state(run)["model"])
    return model.eval(), meta


def load_fitted(run: str | Path) -> Fitted:
    """A finished run read back from its folder (`export RUN`)."""
    run = Path(run)
    model, meta = load_checkpoint(run)
    return Fitted(run, meta, model, runs.read_head_logits(run), runs.read_oof(run))
