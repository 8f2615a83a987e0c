"""Self-training (`train --unlabeled DIR`): the heads refitted on the labelled photos plus confident
pseudo-labels of unlabelled ones, e.g. the photos `serve --keep-photos` kept.

No human in the loop: the fitted heads label the unlabelled photos they are surest of, per predicted class,
at most PER_LABEL x as many as that class has real labels (so an easy class cannot swamp the rest), and the
heads are fitted again on both. Every out-of-fold head does the same from its own fold, so calibration and
the abstention threshold see what the final head does. On food101_ten it paid +2.7 points with 20 labels
per class, under 1 point from 45 per class on (bench/bench_active.py, docs/BENCHMARKS.md "Active learning").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from food_classifier.compare import IMAGE_SUFFIXES
from food_classifier.training.data import Row, check_images, visible_files
from food_classifier.training.sources import DataError

MIN_CONFIDENCE = 0.5  # softmax of the uncalibrated heads (label smoothing keeps them below ~0.9)
PER_LABEL = 3.0       # pseudo-labels per class, at most this multiple of the class's real labels


def pseudo_label(probs: np.ndarray, labelled_y: np.ndarray, num_classes: int,
                 min_confidence: float = MIN_CONFIDENCE, per_label: float = PER_LABEL) -> tuple[np.ndarray, np.ndarray]:
    """(indices into `probs`, their pseudo-labels): per predicted class the most confident photos with
    confidence >= `min_confidence`, at most `per_label` x that class's real labels."""
    pred, conf = probs.argmax(1), probs.max(1)
    counts = np.bincount(labelled_y, minlength=num_classes)
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero((pred == c) & (conf >= min_confidence))
        keep.append(idx[np.argsort(-conf[idx], kind="stable")][: int(per_label * counts[c])])
    idx = np.sort(np.concatenate(keep)).astype(int)
    return idx, pred[idx]


def self_train(head: nn.Module, x: torch.Tensor, y: torch.Tensor, unlabeled: torch.Tensor,
               refit: Callable[[torch.Tensor, torch.Tensor], nn.Module]) -> tuple[nn.Module, int]:
    """(`refit` on x + the confident pseudo-labelled `unlabeled` rows, how many were added). x, unlabeled:
    [N, views, D] features, view 0 the eval view that `head` labels; `head` was fitted on (x, y)."""
    with torch.no_grad():
        probs = torch.softmax(head(unlabeled[:, 0]), 1).numpy()
    idx, pseudo = pseudo_label(probs, y.numpy(), probs.shape[1])
    if not len(idx):
        return head, 0
    return refit(torch.cat([x, unlabeled[idx]]), torch.cat([y, torch.from_numpy(pseudo).to(y.dtype)])), len(idx)


def unlabeled_rows(folder: str | Path, labelled: set[str]) -> list[Row]:
    """Every decodable photo under `folder` (any depth, hidden files skipped) that is not one of the
    labelled photos (by sha256), each once; tier "unlabeled"."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"--unlabeled {root}: no such folder (a folder of photos without labels, any layout)")
    files = sorted(f for f in visible_files(root) if f.suffix.lower() in IMAGE_SUFFIXES)
    rows, seen, bad = [], set(labelled), 0
    for f, checked in zip(files, check_images(files, progress=False), strict=True):
        if isinstance(checked, str):
            bad += 1
        elif checked[0] not in seen:
            seen.add(checked[0])
            rows.append(Row(f, "", "unlabeled", checked[0]))
    print(f"unlabeled: {len(rows):,} photos under {root}" + (f" ({bad} unreadable skipped)" if bad else ""))
    return rows
