"""Training: `fit(manifest, config) -> run_dir`.

Two paths, picked by the model:
- pretrained backbone (default): features of the frozen backbone are cached once (ONNX Runtime),
  then a linear head is fitted to convergence on several views per image of train+validation --
  seconds, not minutes.
  `fine_tune=True` then unfreezes the last blocks end to end at a lower learning rate.
- from scratch (`base_cnn`): end to end with augmentation.
End to end: early stopping on validation loss, best checkpoint kept, one-cycle LR. Both: seeded,
CSV history + plot.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import multiprocessing
import os
import random
import re
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from food_classifier.bundle import file_sha256
from food_classifier.preprocessing import PreprocessSpec
from food_classifier.training import features as F
from food_classifier.training.data import Row, read_manifest
from food_classifier.training.models import (
    LITE_SHA256,
    ModelError,
    create_model,
    default_preprocessing,
    is_pretrained,
    members,
)


@dataclass
class TrainConfig:
    arch: str = "efficientnet_lite0+efficientnet_lite1"
    weights: str | None = None
    epochs: int = 0                # 0 = the path's default (head 40, end-to-end 30, fine-tune 6)
    batch_size: int = 0            # 0 = 32 (end to end; the head path is full-batch)
    lr: float = 0.0                # 0 = the path's default (head L-BFGS 1.0, end-to-end 2e-3, fine-tune 1e-3)
    weight_decay: float = 3e-3    # L2 on the head (cached path); AdamW decay end to end
    label_smoothing: float = 0.1
    patience: int = 5              # early stopping of the end-to-end paths (the head is solved to convergence)
    aug_views: int = 2             # extra views per training image (cached head path): mirror, then random
    aug_strength: float = 1.0
    refit: bool = True             # head path: final head fitted on train+validation (not with fine_tune)
    fine_tune: bool = False
    fine_tune_blocks: int = 2
    image_size: int = 0            # 0 = the model's default crop (288 for the Lite models)
    seed: int = 42
    threads: int = 0               # 0 = all cores


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


def fit(manifest: str | Path, config: TrainConfig, runs_dir: str | Path = "runs",
        resume: str | Path | None = None) -> Path:
    """Train and return the run dir holding best.pt, history.csv, history.png and config.json."""
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
    meta = {"arch": config.arch, "labels": labels, "preprocessing": spec.to_dict(), "config": asdict(config),
            "manifest": str(Path(manifest).resolve()), "started_at": datetime.now(UTC).isoformat(),
            "fit_tiers": fit_tiers(config)}
    (run / "config.json").write_text(json.dumps(meta, indent=2))
    by_tier = {t: [r for r in rows if r.tier == t] for t in ("train", "validation", "test")}
    t0 = time.time()
    if is_pretrained(config.arch, config.weights):
        _fit_head(model, by_tier, labels, spec, config, run)
        if config.fine_tune:
            _fit_end_to_end(model, by_tier, labels, spec, config, run, fine_tune=True)
            for stale in ("oof_logits.npz", "head_logits.npz"):  # they describe the head, not the tuned model
                (run / stale).unlink(missing_ok=True)
    else:
        _fit_end_to_end(model, by_tier, labels, spec, config, run, fine_tune=False)
    meta["train_seconds"] = round(time.time() - t0, 1)
    (run / "config.json").write_text(json.dumps(meta, indent=2))
    plot_history(run / "history.csv", run / "history.png")
    return run


def load_checkpoint(run: str | Path) -> tuple[nn.Module, dict]:
    """The best model of a run, ready for eval, and its config.json."""
    run = Path(run)
    meta = json.loads((run / "config.json").read_text())
    cfg = meta["config"]
    model = create_model(meta["arch"], num_classes=len(meta["labels"]), weights=cfg.get("weights"))
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model.eval(), meta


# --- history ---------------------------------------------------------------------------------

class History:
    """Appends one CSV row per epoch and tracks early stopping on validation loss."""

    FIELDS = ["stage", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]

    def __init__(self, run: Path, stage: str, patience: int):
        self.path, self.stage, self.patience = run / "history.csv", stage, patience
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


def plot_history(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    x = np.arange(1, len(rows) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "acc"), strict=False):
        ax.plot(x, [float(r[f"train_{key}"]) for r in rows], label="train")
        ax.plot(x, [float(r[f"val_{key}"]) for r in rows], label="validation")
        ax.set_xlabel("epoch (all stages)")
        ax.set_title("loss" if key == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# --- path 1: linear head on cached frozen features -------------------------------------------

def backbone_keys(config: TrainConfig) -> list[str]:
    """Feature-cache key of each backbone (one per ensemble member): architecture + weights."""
    keys = []
    for arch in members(config.arch):
        lite = re.fullmatch(r"efficientnet_lite(\d)", arch)
        if config.weights:
            keys.append(f"{arch}-{file_sha256(config.weights)[:12]}")
        elif lite:  # the pinned hash that create_model checks the shipped file against
            keys.append(f"{arch}-{LITE_SHA256[int(lite.group(1))][:8]}")
        else:
            keys.append(f"{arch}-timm")
    return keys


def extract_features(rows: list[Row], model: nn.Module, config: TrainConfig, spec: PreprocessSpec,
                     **kw) -> np.ndarray:
    """Cached backbone features [N, views, D]; an ensemble concatenates its members' caches, so a
    member's features are shared with runs of that backbone alone."""
    parts = list(getattr(model, "members", [model]))
    return np.concatenate([F.extract(rows, m, k, spec, **kw)
                           for m, k in zip(parts, backbone_keys(config), strict=True)], -1)


def fit_tiers(config: TrainConfig) -> list[str]:
    """Tiers the final model was fitted on: their metrics are not held-out estimates."""
    head_path = is_pretrained(config.arch, config.weights) and not config.fine_tune
    return ["train", "validation"] if head_path and config.refit else ["train"]


def _fit_head(model: nn.Module, tiers: dict[str, list[Row]], labels: list[str], spec: PreprocessSpec,
              config: TrainConfig, run: Path) -> None:
    """Linear head on cached features, fitted on `fit_tiers(config)`.

    Why refit on train+validation: the head has no early stopping and its L2 and view count were
    chosen by CV, so validation has no decision left to make; its 168 images are worth more as
    training data (3x5-fold CV, Lite0+Lite1: 0.9686 with 764 training images, 0.9714 with 860).
    The held-out numbers then come from the out-of-fold logits and the test tier.
    """
    index = {lab: i for i, lab in enumerate(labels)}
    kw = {"views": 1 + config.aug_views, "aug_strength": config.aug_strength, "seed": config.seed}
    x = {t: torch.from_numpy(extract_features(tiers[t], model, config, spec, **kw)) for t in ("train", "validation")}
    y = {t: torch.tensor([index[r.label] for r in tiers[t]]) for t in ("train", "validation")}
    x_all, y_all = torch.cat([x["train"], x["validation"]]), torch.cat([y["train"], y["validation"]])
    used = fit_tiers(config)
    xs, ys = (x_all, y_all) if "validation" in used else (x["train"], y["train"])  # [N, views, D], [N]
    xfit, yfit = xs.reshape(-1, xs.shape[-1]), ys.repeat_interleave(xs.shape[1])
    xva, yva = x["validation"][:, 0], y["validation"]

    head = model.classifier
    epochs = config.epochs or 40
    step = lbfgs_head_step(head, xfit, yfit, config)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    # Solved to convergence, not early-stopped: the head is a convex problem whose regulariser is the
    # L2 term. Early stopping on validation loss stopped after 2-3 epochs and cost the ensemble
    # 0.7 points in 3x5-fold CV (0.9585 vs 0.9654 converged); single backbones did not care.
    hist = History(run, "head", patience=epochs)
    bar = tqdm(range(epochs), desc="train head", unit="epoch")
    previous = math.inf
    for epoch in bar:
        t0 = time.time()
        head.train()
        objective = step().item()
        head.eval()
        with torch.no_grad():
            tl = head(xfit)
            train_loss = loss_fn(tl, yfit).item()
            train_acc = (tl.argmax(1) == yfit).float().mean().item()
            # validation inside the fit is no held-out curve: logged as nan, not as a flattering one
            val_loss = val_acc = math.nan
            if "validation" not in used:
                vl = head(xva)
                val_loss = nn.functional.cross_entropy(vl, yva).item()
                val_acc = (vl.argmax(1) == yva).float().mean().item()
        hist.log(epoch + 1, train_loss, train_acc, val_loss, val_acc, config.lr or 1.0, time.time() - t0)
        bar.set_postfix(objective=f"{objective:.4f}")
        if previous - objective < HEAD_TOLERANCE * abs(objective):
            break
        previous = objective
    bar.close()
    torch.save({"model": model.state_dict(), "epoch": epoch + 1, "stage": "head"}, run / "best.pt")
    with torch.no_grad():  # eval-view logits of the fitted tiers: evaluation need not run the backbones again
        np.savez_compressed(run / "head_logits.npz", logits=head(xs[:, 0]).numpy(),
                            path=np.array([str(r.path) for t in used for r in tiers[t]]))
    logits = out_of_fold_logits(head, x_all, y_all, config, epochs=epoch + 1)
    np.savez_compressed(run / "oof_logits.npz", logits=logits, y=y_all.numpy())


HEAD_TOLERANCE = 1e-5  # relative change of the L-BFGS objective between epochs that counts as converged


def lbfgs_head_step(head: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig):
    """One "epoch" of the head fit: 5 iterations of full-batch L-BFGS on cross-entropy + L2;
    returns the objective. A convex problem of a few thousand rows: solved in seconds, deterministic.
    """
    opt = torch.optim.LBFGS(head.parameters(), lr=config.lr or 1.0, max_iter=5, history_size=20,
                            line_search_fn="strong_wolfe")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    weights = [p for name, p in head.named_parameters() if name.endswith("weight")]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        # an EnsembleHead's members are independent problems: the sum of their losses fits each one
        outs = head.member_logits(x) if hasattr(head, "member_logits") else [head(x)]
        loss = sum(loss_fn(o, y) for o in outs) + 0.5 * config.weight_decay * sum(w.pow(2).sum() for w in weights)
        loss.backward()
        return loss

    return lambda: opt.step(closure).detach()


def out_of_fold_logits(template: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, epochs: int,
                       folds: int = 5) -> np.ndarray:
    """Logits for every train+validation image from a head that never saw it (stratified K folds,
    each head fitted with the final head's recipe and epoch count).

    Why: calibration and the abstention threshold fitted on ~950 out-of-fold predictions are far
    steadier than on a 150-image validation tier. x is [N, views, D] (view 0 = eval view).
    """
    rng = np.random.default_rng(config.seed)
    fold = np.empty(len(y), dtype=int)
    for c in np.unique(y.numpy()):
        idx = rng.permutation(np.flatnonzero(y.numpy() == c))
        fold[idx] = np.arange(len(idx)) % folds
    out = torch.zeros(len(y), int(y.max()) + 1)
    for k in range(folds):
        tr = np.flatnonzero(fold != k)
        torch.manual_seed(config.seed + k)
        head = copy.deepcopy(template)
        for layer in head.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        step = lbfgs_head_step(head, x[tr].reshape(-1, x.shape[-1]), y[tr].repeat_interleave(x.shape[1]), config)
        for _ in range(epochs):
            step()
        with torch.no_grad():
            out[fold == k] = head(x[fold == k, 0])
    return out.numpy()


# --- path 2: end to end (base_cnn, or fine-tuning the last blocks) ---------------------------

class ImageDataset(Dataset):
    def __init__(self, rows: list[Row], labels: list[str], spec: PreprocessSpec, train: bool, strength: float):
        self.rows, self.spec = rows, spec
        self.index = {lab: i for i, lab in enumerate(labels)}
        self.aug = F.augmenter(spec, strength) if train else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        r = self.rows[i]
        x = F.load_view(r.path, self.spec, 2 if self.aug else 0, self.aug, seed=None)
        return torch.from_numpy(x), self.index[r.label]


def _trainable(model: nn.Module, fine_tune: bool, blocks: int, lr: float) -> list[dict]:
    """Fine-tuning: only the last `blocks` stages + head learn; the rest (and its BatchNorm) stay frozen."""
    if not fine_tune:
        return [{"params": list(model.parameters()), "lr": lr}]
    inner = model.model
    for p in model.parameters():
        p.requires_grad = False
    tail = list(inner.blocks[-blocks:]) + [m for m in (getattr(inner, "conv_head", None),
                                                       getattr(inner, "bn2", None)) if m is not None]
    tail_params = [p for m in tail for p in m.parameters()]
    head_params = list(model.classifier.parameters())
    for p in tail_params + head_params:
        p.requires_grad = True
    return [{"params": tail_params, "lr": lr * 0.1}, {"params": head_params, "lr": lr}]


def _set_train_mode(model: nn.Module, fine_tune: bool) -> None:
    model.train()
    if fine_tune:  # frozen BatchNorm statistics: a small dataset would wreck them
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and not m.weight.requires_grad:
                m.eval()


def _fit_end_to_end(model: nn.Module, tiers: dict[str, list[Row]], labels: list[str], spec: PreprocessSpec,
                    config: TrainConfig, run: Path, fine_tune: bool) -> None:
    epochs = config.epochs or (6 if fine_tune else 30)
    bs, lr = config.batch_size or 32, config.lr or (1e-3 if fine_tune else 2e-3)
    groups = _trainable(model, fine_tune, config.fine_tune_blocks, lr)
    opt = torch.optim.AdamW(groups, weight_decay=5e-4 if not fine_tune else config.weight_decay)
    steps = epochs * math.ceil(len(tiers["train"]) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps,
                                                pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    # Decode workers come from a clean forkserver: forking this (multi-threaded: ONNX Runtime, thread
    # pools, servers in the same process) can deadlock a child on a lock held by another thread.
    multiprocessing.set_forkserver_preload(["food_classifier.training.train"])  # import torch once, not per worker
    loader = {"num_workers": min(2, os.cpu_count() or 1), "multiprocessing_context": "forkserver",
              "persistent_workers": True}
    gen = torch.Generator().manual_seed(config.seed)
    train_dl = DataLoader(ImageDataset(tiers["train"], labels, spec, True, config.aug_strength), batch_size=bs,
                          shuffle=True, drop_last=len(tiers["train"]) > bs, generator=gen, **loader)
    val_dl = DataLoader(ImageDataset(tiers["validation"], labels, spec, False, 0), batch_size=64, **loader)
    stage = "fine_tune" if fine_tune else "end_to_end"
    hist = History(run, stage, config.patience)
    start = 0
    if (run / "last.pt").is_file():  # --resume
        state = torch.load(run / "last.pt", weights_only=False)
        if state.get("stage") == stage:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start, hist.best, hist.bad_epochs = state["epoch"], state["best"], state["bad_epochs"]
            print(f"resuming {stage} at epoch {start + 1}")
    model = model.to(memory_format=torch.channels_last)
    for epoch in range(start, epochs):
        t0 = time.time()
        _set_train_mode(model, fine_tune)
        tot, correct, n = 0.0, 0, 0
        for x, y in tqdm(train_dl, desc=f"{stage} epoch {epoch + 1}/{epochs}", unit="batch", leave=False):
            logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = loss_fn(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
        val_loss, val_acc = evaluate_loader(model, val_dl)
        improved = hist.log(epoch + 1, tot / n, correct / n, val_loss, val_acc, sched.get_last_lr()[-1],
                            time.time() - t0)
        print(f"{stage} epoch {epoch + 1}/{epochs}: train loss {tot / n:.3f} acc {correct / n:.3f} | "
              f"val loss {val_loss:.3f} acc {val_acc:.3f}")
        if improved:
            torch.save({"model": model.state_dict(), "epoch": epoch + 1, "stage": stage}, run / "best.pt")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "epoch": epoch + 1, "stage": stage, "best": hist.best, "bad_epochs": hist.bad_epochs},
                   run / "last.pt")
        if hist.stop:
            break
    model.load_state_dict(torch.load(run / "best.pt", weights_only=True)["model"])


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    model.eval()
    tot, correct, n = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        tot += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    return tot / max(n, 1), correct / max(n, 1)
