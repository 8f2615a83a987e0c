"""Path 2 of training: end to end (`base_cnn` from scratch, or fine-tuning the last blocks of a
pretrained backbone), with augmentation, one-cycle LR, early stopping on validation loss, the
best checkpoint kept, and `--resume` from the last epoch.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from food_classifier.preprocessing import PreprocessSpec
from food_classifier.training import features as F
from food_classifier.training.config import TrainConfig
from food_classifier.training.data import Row
from food_classifier.training.progress import progress_bar
from food_classifier.training.runs import History, load_checkpoint_state, save_checkpoint


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


def fit_end_to_end(model: nn.Module, tiers: dict[str, list[Row]], labels: list[str], spec: PreprocessSpec,
                   config: TrainConfig, run: Path, fine_tune: bool) -> None:
    """Train end to end with early stopping on validation loss; leaves the best epoch's weights in
    `model` (best.pt) and each epoch's full state in last.pt, from which `--resume` continues."""
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
    multiprocessing.set_forkserver_preload([__name__])  # import torch once, not per worker
    loader = {"num_workers": min(2, os.cpu_count() or 1), "multiprocessing_context": "forkserver",
              "persistent_workers": True}
    gen = torch.Generator().manual_seed(config.seed)
    train_dl = DataLoader(ImageDataset(tiers["train"], labels, spec, True, config.aug_strength), batch_size=bs,
                          shuffle=True, drop_last=len(tiers["train"]) > bs, generator=gen, **loader)
    val_dl = DataLoader(ImageDataset(tiers["validation"], labels, spec, False, 0), batch_size=64, **loader)
    stage = "fine_tune" if fine_tune else "end_to_end"
    hist = History(run, stage, config.patience)
    start = 0
    state = load_checkpoint_state(run, last=True)
    if state is not None:  # --resume
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
        for x, y in progress_bar(train_dl, desc=f"{stage} epoch {epoch + 1}/{epochs}", unit="batch", leave=False):
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
            save_checkpoint(run, {"model": model.state_dict(), "epoch": epoch + 1, "stage": stage})
        save_checkpoint(run, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict(), "epoch": epoch + 1, "stage": stage,
                              "best": hist.best, "bad_epochs": hist.bad_epochs}, last=True)
        if hist.stop:
            break
    model.load_state_dict(load_checkpoint_state(run)["model"])
    model.to(memory_format=torch.contiguous_format)  # as a freshly loaded checkpoint: export sees no difference


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
