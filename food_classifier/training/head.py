"""Path 1 of training: a linear head on cached features of frozen pretrained backbones.

Features are computed once per (backbone, weights, preprocessing, views) and cached on disk
(`features.py`); the head is then a convex problem, solved to convergence with full-batch L-BFGS
in seconds. Out-of-fold logits of the same recipe give calibration ~950 held-out predictions.
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from food_classifier.bundle import file_sha256
from food_classifier.preprocessing import PreprocessSpec
from food_classifier.training import features as F
from food_classifier.training.config import TrainConfig
from food_classifier.training.data import Row
from food_classifier.training.models import LITE_SHA256, is_pretrained, members
from food_classifier.training.progress import progress_bar
from food_classifier.training.runs import HeldOut, History, save_checkpoint


@dataclass
class HeadFit:
    """What the head fit leaves besides the weights: logits the later stages reuse."""

    fitted_logits: dict[str, np.ndarray]  # image path -> eval-view logits, for the tiers the head was fitted on
    oof: HeldOut                          # out-of-fold logits of train+validation


def fit_tiers(config: TrainConfig) -> list[str]:
    """Tiers the final model was fitted on: their metrics are not held-out estimates."""
    head_path = is_pretrained(config.arch, config.weights) and not config.fine_tune and config.quality != "best"
    return ["train", "validation"] if head_path and config.refit else ["train"]


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


def fit_head(model: nn.Module, tiers: dict[str, list[Row]], labels: list[str], spec: PreprocessSpec,
             config: TrainConfig, run: Path) -> HeadFit:
    """Linear head on cached features, fitted on `fit_tiers(config)`; logs history.csv, saves best.pt.

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
    bar = progress_bar(range(epochs), desc="train head", unit="epoch")
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
    unlabeled = None
    if config.unlabeled:  # self-training: refit on the labelled photos + confident pseudo-labels
        from food_classifier.training.self_train import self_train, unlabeled_rows

        rows = unlabeled_rows(config.unlabeled, {r.sha256 for t in tiers.values() for r in t})
        if rows:
            unlabeled = torch.from_numpy(extract_features(rows, model, config, spec, **kw))
            tuned, added = self_train(head, xs, ys, unlabeled, lambda a, b: solve_head(head, a, b, config))
            head.load_state_dict(tuned.state_dict())
            print(f"self-training: {added:,} of {len(rows):,} unlabeled photos pseudo-labelled and fitted with "
                  f"the {len(ys):,} labelled ones")
    save_checkpoint(run, {"model": model.state_dict(), "epoch": epoch + 1, "stage": "head"})
    with torch.no_grad():  # eval-view logits of the fitted tiers: evaluation need not run the backbones again
        fitted = head(xs[:, 0]).numpy()
    paths = [str(r.path) for t in used for r in tiers[t]]
    members = out_of_fold_member_logits(head, x_all, y_all, config, epochs=epoch + 1, unlabeled=unlabeled)
    oof = HeldOut(members.mean(0), y_all.numpy(), members if len(members) > 1 else None)
    return HeadFit(dict(zip(paths, fitted, strict=True)), oof)


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


def solve_head(template: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
               epochs: int | None = None, seed: int | None = None) -> nn.Module:
    """A fresh copy of `template`'s head fitted on x [N, views, D] (every view a row) and y [N]: `epochs`
    L-BFGS epochs, or until converged (at most 40). For heads fitted again and again on other rows:
    out-of-fold folds, self-training, the active-learning benchmark."""
    torch.manual_seed(config.seed if seed is None else seed)
    head = copy.deepcopy(template)
    for layer in head.modules():
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()
    step = lbfgs_head_step(head, x.reshape(-1, x.shape[-1]), y.repeat_interleave(x.shape[1]), config)
    previous = math.inf
    for _ in range(epochs or config.epochs or 40):
        objective = step().item()
        if epochs is None and previous - objective < HEAD_TOLERANCE * abs(objective):
            break
        previous = objective
    return head.eval()


def out_of_fold_logits(template: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, epochs: int,
                       folds: int = 5) -> np.ndarray:
    """Logits for every train+validation image from a head that never saw it (stratified K folds,
    each head fitted with the final head's recipe and epoch count).

    Why: calibration and the abstention threshold fitted on ~950 out-of-fold predictions are far
    steadier than on a 150-image validation tier. x is [N, views, D] (view 0 = eval view).
    """
    return out_of_fold_member_logits(template, x, y, config, epochs, folds).mean(0)


def out_of_fold_member_logits(template: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
                              epochs: int, folds: int = 5, unlabeled: torch.Tensor | None = None) -> np.ndarray:
    """[M, N, C]: `out_of_fold_logits` per member of an `EnsembleHead` (M = 1 for a plain head); their
    mean is the ensemble's. The cascade chooses its thresholds on them (training/cascade.py). With
    `unlabeled` features each fold's head self-trains from its own fold, as the final head did."""
    rng = np.random.default_rng(config.seed)
    fold = np.empty(len(y), dtype=int)
    for c in np.unique(y.numpy()):
        idx = rng.permutation(np.flatnonzero(y.numpy() == c))
        fold[idx] = np.arange(len(idx)) % folds
    parts = len(getattr(template, "dims", [None]))
    out = torch.zeros(parts, len(y), int(y.max()) + 1)
    for k in range(folds):
        tr = np.flatnonzero(fold != k)
        head = solve_head(template, x[tr], y[tr], config, epochs=epochs, seed=config.seed + k)
        if unlabeled is not None:
            from food_classifier.training.self_train import self_train

            head = self_train(head, x[tr], y[tr], unlabeled, lambda a, b, k=k: solve_head(
                template, a, b, config, epochs=epochs, seed=config.seed + k))[0]
        with torch.no_grad():
            xk = x[fold == k, 0]
            out[:, fold == k] = torch.stack(head.member_logits(xk) if hasattr(head, "member_logits") else [head(xk)])
    return out.numpy()
