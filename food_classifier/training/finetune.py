"""The `best` recipe (`train --quality best`): fine-tune the last stages of each pretrained backbone
on cached activations of its frozen trunk, then average the tuned members' logits.

Why cached activations: on a 2-core CPU a full fine-tune of Lite0 at 288 px costs ~2 min per epoch
of 1,000 photos, almost all of it in the early, high-resolution stages that barely need to change
for food photos. Here the frozen trunk (stem + all but the last `fine_tune_blocks` stages) runs once
per photo and view through ONNX Runtime (`features.extract`, cached on disk, so a resumed or repeated
run skips it); only the tail (last stages, head conv, classifier) trains, with augmented views
(random-resized crops, flips, colour jitter) sampled per epoch, label smoothing, AdamW with
discriminative learning rates (the classifier 4x the blocks), a one-epoch warm-up then cosine, and
an EMA of the weights that is what gets validated and kept. BatchNorm statistics stay frozen (a
small dataset would wreck them); their affine parameters learn.

The result is an ordinary model of the same architecture (an `Ensemble` of tuned members, or one
member), so export, calibration, int8 and publishing work unchanged. Each epoch leaves its full
state in `last.pt` (per member), from which `--resume` continues; a `--time-budget` stops between
epochs, when the next one would not fit, and says so.
"""

from __future__ import annotations

import math
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from food_classifier.preprocessing import PreprocessSpec
from food_classifier.training import features as F
from food_classifier.training.config import TrainConfig
from food_classifier.training.data import Row
from food_classifier.training.progress import progress_bar
from food_classifier.training.runs import History

DEFAULT_EPOCHS = 8
DEFAULT_LR = 2e-3      # classifier; the tuned blocks get BLOCK_LR_RATIO of it
BLOCK_LR_RATIO = 0.25
DEFAULT_VIEWS = 6      # cached views per training photo: eval, mirror, 4 augmentations
EMA_DECAY = 0.98
WEIGHT_DECAY = 0.05   # AdamW's decoupled decay (TrainConfig.weight_decay is the head path's L2)


class TrunkFeatures(nn.Module):
    """The frozen part of a timm EfficientNet: stem + stages before `start`, as `forward_features`
    (the contract `features.extract` exports to ONNX and caches)."""

    def __init__(self, timm_model: nn.Module, start: int):
        super().__init__()
        self.model, self.start = timm_model, start

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.bn1(m.conv_stem(x))
        for stage in m.blocks[:self.start]:
            x = stage(x)
        return x


def tail_logits(timm_model: nn.Module, start: int, acts: torch.Tensor) -> torch.Tensor:
    """The trainable part: stages from `start`, head conv, pooling, classifier."""
    x = acts
    for stage in timm_model.blocks[start:]:
        x = stage(x)
    return timm_model.forward_head(timm_model.bn2(timm_model.conv_head(x)))


def split_point(timm_model: nn.Module, tuned_stages: int) -> int:
    n = len(timm_model.blocks)
    if not 1 <= tuned_stages <= n - 1:
        raise ValueError(f"fine_tune_blocks must be 1..{n - 1} for this model (got {tuned_stages})")
    return n - tuned_stages


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else the CPU; cuda without a GPU is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to PyTorch here; use --device cpu or auto")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


@dataclass
class MemberData:
    train: torch.Tensor  # [N, V, C, H, W] float16 trunk activations (view 0 = eval view)
    y_train: torch.Tensor
    val: torch.Tensor    # [M, C, H, W] eval view
    y_val: torch.Tensor


def trunk_activations(timm_model: nn.Module, key: str, start: int, tiers: dict[str, list[Row]],
                      labels: list[str], spec: PreprocessSpec, config: TrainConfig) -> MemberData:
    """Cached trunk outputs: `views` per training photo, the eval view per validation photo."""
    trunk, trunk_key = TrunkFeatures(timm_model, start).eval(), f"{key}-trunk{start}"
    index = {lab: i for i, lab in enumerate(labels)}
    views = max(1 + config.aug_views, DEFAULT_VIEWS)

    def acts(rows: list[Row], v: int) -> torch.Tensor:
        if not rows:
            return torch.zeros(0)
        a = F.extract(rows, trunk, trunk_key, spec, views=v, aug_strength=config.aug_strength, seed=config.seed)
        return torch.from_numpy(a).to(torch.float16)

    ys = {t: torch.tensor([index[r.label] for r in tiers[t]]) for t in ("train", "validation")}
    val = acts(tiers["validation"], 1)
    return MemberData(acts(tiers["train"], views), ys["train"], val[:, 0] if len(val) else val, ys["validation"])


def _param_groups(timm_model: nn.Module, start: int, lr: float, weight_decay: float) -> list[dict]:
    for p in timm_model.parameters():
        p.requires_grad = False
    blocks = [p for s in timm_model.blocks[start:] for p in s.parameters()]
    blocks += list(timm_model.conv_head.parameters()) + list(timm_model.bn2.parameters())
    head = list(timm_model.get_classifier().parameters())
    for p in blocks + head:
        p.requires_grad = True
    decay = [p for p in blocks + head if p.ndim > 1]
    keep = {id(p) for p in decay}
    return [{"params": [p for p in blocks if id(p) in keep], "lr": lr * BLOCK_LR_RATIO, "weight_decay": weight_decay},
            {"params": [p for p in blocks if id(p) not in keep], "lr": lr * BLOCK_LR_RATIO, "weight_decay": 0.0},
            {"params": [p for p in head if id(p) in keep], "lr": lr, "weight_decay": weight_decay},
            {"params": [p for p in head if id(p) not in keep], "lr": lr, "weight_decay": 0.0}]


def _train_mode(timm_model: nn.Module) -> None:
    timm_model.train()
    for m in timm_model.modules():  # frozen BatchNorm statistics; dropout stays on
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _schedule(steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return f


@torch.no_grad()
def _evaluate(timm_model: nn.Module, start: int, acts: torch.Tensor, y: torch.Tensor, device: torch.device,
              batch: int = 64) -> tuple[float, float]:
    timm_model.eval()
    if len(y) == 0:
        return math.nan, math.nan
    logits = torch.cat([tail_logits(timm_model, start, acts[i:i + batch].to(device).float()).float().cpu()
                        for i in range(0, len(y), batch)])
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


@dataclass
class Budget:
    """Wall-clock seconds left for the whole fit, shared by its members."""

    deadline: float | None  # time.monotonic() value, None = no budget
    stopped: str = ""       # why a member stopped early, for the report

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()


def fine_tune_member(wrapper: nn.Module, key: str, member: int, tiers: dict[str, list[Row]], labels: list[str],
                     spec: PreprocessSpec, config: TrainConfig, run: Path, budget: Budget, share: float,
                     device: torch.device) -> None:
    """Tune one backbone (`_TimmWrapper`) in place; resumes from `run/member{i}-last.pt` if present.
    `share` = the part of the remaining budget this member may use."""
    m = wrapper.model
    start = split_point(m, config.fine_tune_blocks)
    done = run / f"member{member}.pt"
    if done.is_file():  # finished before an interruption
        wrapper.load_state_dict(torch.load(done, map_location="cpu", weights_only=True))
        print(f"member {member} ({key}): already tuned, loaded {done.name}")
        return
    t_member = time.monotonic()
    data = trunk_activations(m, key, start, tiers, labels, spec, config)
    m.to(device)
    epochs, bs = config.epochs or DEFAULT_EPOCHS, config.batch_size or 32
    lr = config.lr or DEFAULT_LR
    opt = torch.optim.AdamW(_param_groups(m, start, lr, WEIGHT_DECAY), betas=(0.9, 0.999))
    n, views = len(data.y_train), data.train.shape[1]
    per_epoch = max(1, n // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(epochs * per_epoch, per_epoch))
    ema = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    hist = History(run, f"best_member{member}", config.patience)
    last = run / f"member{member}-last.pt"
    start_epoch, gen = 0, torch.Generator().manual_seed(config.seed + zlib.crc32(key.encode()))
    if last.is_file():  # --resume
        state = torch.load(last, map_location="cpu", weights_only=False)
        m.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        start_epoch, hist.best, hist.bad_epochs = state["epoch"], state["best"], state["bad_epochs"]
        print(f"member {member} ({key}): resuming at epoch {start_epoch + 1}/{epochs}")
    best_state = torch.load(run / f"member{member}-best.pt", map_location="cpu", weights_only=True) \
        if start_epoch and (run / f"member{member}-best.pt").is_file() else None
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    my_deadline = time.monotonic() + share * budget.left()
    epoch_seconds: list[float] = []
    bar = progress_bar(total=(epochs - start_epoch) * per_epoch, desc=f"fine-tune {key}", unit="step")
    for epoch in range(start_epoch, epochs):
        if epoch_seconds and time.monotonic() + max(epoch_seconds[-2:]) > my_deadline:
            budget.stopped = (f"member {member} ({key}) stopped after epoch {epoch}/{epochs}: the next epoch "
                              f"(~{max(epoch_seconds[-2:]):.0f} s) would pass the time budget")
            print(budget.stopped)
            break
        t0 = time.time()
        _train_mode(m)
        order = torch.randperm(n, generator=gen)
        pick = torch.randint(0, views, (n,), generator=gen)
        tot, correct, seen = 0.0, 0, 0
        for s in range(per_epoch):
            idx = order[s * bs:(s + 1) * bs]
            x = data.train[idx, pick[idx]].to(device).float().contiguous(memory_format=torch.channels_last)
            y = data.y_train[idx].to(device)
            with amp:
                logits = tail_logits(m, start, x)
                loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            ema.update_parameters(m)
            tot += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.update(1)
        val_loss, val_acc = _evaluate(ema.module, start, data.val, data.y_val, device)
        epoch_seconds.append(time.time() - t0)
        left = (epochs - epoch - 1) * float(np.mean(epoch_seconds))
        bar.set_postfix(val_acc=f"{val_acc:.3f}", eta=f"{left:.0f}s")
        improved = hist.log(epoch + 1, tot / seen, correct / seen, val_loss, val_acc, sched.get_last_lr()[-1],
                            epoch_seconds[-1])
        if improved or math.isnan(val_loss):
            best_state = {k: v.detach().cpu().clone() for k, v in ema.module.state_dict().items()}
            torch.save(best_state, run / f"member{member}-best.pt")
        torch.save({"model": m.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "generator": gen.get_state(), "epoch": epoch + 1,
                    "best": hist.best, "bad_epochs": hist.bad_epochs}, last)
        if hist.stop:
            print(f"member {member} ({key}): early stop at epoch {epoch + 1} (no better validation loss "
                  f"for {config.patience} epochs)")
            break
    bar.close()
    m.load_state_dict(best_state if best_state is not None else ema.module.state_dict())
    m.to("cpu").eval()
    for p in m.parameters():
        p.requires_grad = False
    torch.save(wrapper.state_dict(), done)
    print(f"member {member} ({key}): tuned in {time.monotonic() - t_member:.0f} s")


def fit_best(model: nn.Module, keys: list[str], tiers: dict[str, list[Row]], labels: list[str],
             spec: PreprocessSpec, config: TrainConfig, run: Path) -> Budget:
    """Tune every member of `model` (an `Ensemble`, or one backbone) and make its head the average of
    the tuned members' classifiers; the model is left in eval mode with the kept weights."""
    budget = Budget(time.monotonic() + config.time_budget if config.time_budget else None)
    device = resolve_device(config.device)
    parts = list(getattr(model, "members", [model]))
    for i, (wrapper, key) in enumerate(zip(parts, keys, strict=True)):
        fine_tune_member(wrapper, key, i, tiers, labels, spec, config, run, budget, 1 / (len(parts) - i), device)
    if hasattr(model, "members"):  # the ensemble's per-member heads = the tuned classifiers
        for head, wrapper in zip(model.classifier.heads, parts, strict=True):
            head.load_state_dict(wrapper.classifier.state_dict())
    model.eval()
    return budget
