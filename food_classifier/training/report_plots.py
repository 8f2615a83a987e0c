"""Figures of the evaluation report (matplotlib, Agg): each function writes one readable PNG and returns its path."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 13, "axes.grid": False, "figure.dpi": 110})
    return plt


def _save(fig, path: Path, dpi: int = 110) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    _plt().close(fig)
    return path



def plot_tiers(metrics: dict, f1_ci: dict, path: Path) -> Path:
    plt = _plt()
    tiers = list(metrics)
    x = np.arange(len(tiers))
    fig, ax = plt.subplots(figsize=(7, 4))
    for off, key, ci, colour in ((-0.18, "accuracy", {t: metrics[t]["accuracy_ci95"] for t in tiers}, "#3b6fb6"),
                                 (0.18, "macro_f1", f1_ci, "#e08a2c")):
        v = np.array([metrics[t][key] for t in tiers])
        # a percentile bootstrap interval on a tiny tier need not contain the estimate: clip the bars
        err = np.clip(np.array([[v[i] - ci[t][0], ci[t][1] - v[i]] for i, t in enumerate(tiers)]).T, 0, None)
        ax.bar(x + off, v, 0.34, yerr=err, capsize=5, color=colour, label=key.replace("_", "-") + " (95% CI)")
        for xi, vi in zip(x + off, v, strict=True):
            ax.text(xi, 0.02, f"{vi:.3f}", ha="center", va="bottom", color="white", fontsize=10, fontweight="bold")
    ax.set_xticks(x, [f"{t}\n(n={metrics[t]['n']}{'' if metrics[t].get('held_out', True) else ', fitted on'})"
                      for t in tiers])
    ax.set_ylim(0, 1.2)
    ax.set_yticks(np.arange(0, 1.01, 0.2))
    ax.set_title("Per-tier accuracy and macro-F1 with 95% intervals")
    ax.legend(loc="upper center", ncol=2, frameon=False)
    return _save(fig, path)


def plot_confusion(cm: np.ndarray, labels: list[str], tier: str, path: Path) -> Path:
    plt = _plt()
    n = len(labels)
    size = max(5.5, 0.38 * n + 3)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), labels, rotation=40 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{cm[i, j]}\n{norm[i, j]:.0%}", ha="center", va="center", fontsize=10 if n <= 8 else 7,
                        color="white" if norm[i, j] > 0.55 else "#1d2430")
    ax.set_title(f"Confusion matrix ({tier} tier, n={int(cm.sum())})")
    return _save(fig, path)


def plot_per_class(per_class: dict, tier: str, path: Path) -> Path:
    plt = _plt()
    labels = list(per_class)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(7, 0.45 * n * 1.6), 4.2))
    x = np.arange(n)
    for k, (key, colour) in enumerate((("precision", "#3b6fb6"), ("recall", "#4aa35a"), ("f1", "#e08a2c"))):
        ax.bar(x + (k - 1) * 0.27, [per_class[lab][key] for lab in labels], 0.27, color=colour, label=key)
    ax.set_xticks(x, [f"{lab}\n(n={per_class[lab]['support']})" for lab in labels],
                  rotation=40 if n > 6 else 0, ha="right" if n > 6 else "center")
    low = min([per_class[lab][k] for lab in labels for k in ("precision", "recall", "f1")] + [1.0])
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    if low - 0.1 > 0:
        ax.set_ylabel("score (axis does not start at 0)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(f"Per-class precision / recall / F1 ({tier} tier)")
    return _save(fig, path)


def roc_data(y: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, dict]:
    """One-vs-rest ROC per class (only classes with both positives and negatives in `y`)."""
    from sklearn.metrics import auc, roc_curve

    out = {}
    for i, lab in enumerate(labels):
        pos = y == i
        if pos.any() and (~pos).any():
            fpr, tpr, _ = roc_curve(pos, probs[:, i])
            out[lab] = {"fpr": fpr, "tpr": tpr, "auc": float(auc(fpr, tpr))}
    return out


def plot_roc(roc: dict[str, dict], tier: str, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    shown = sorted(roc.items(), key=lambda kv: kv[1]["auc"])[:10]  # many classes: the 10 weakest
    for lab, r in shown:
        ax.plot(r["fpr"], r["tpr"], lw=2, label=f"{lab}  AUC {r['auc']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(-0.01, 1.0)
    ax.set_ylim(0.0, 1.01)
    more = f", weakest 10 of {len(roc)}" if len(roc) > 10 else ""
    ax.set_title(f"One-vs-rest ROC ({tier} tier{more})")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_reliability(before: list[dict], after: list[dict], ece: tuple[float, float], temperature: float,
                     tier: str, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for col, (bins, e, name) in enumerate(((before, ece[0], "before (T = 1)"),
                                           (after, ece[1], f"after (T = {temperature:.3f})"))):
        ax, hx = axes[0, col], axes[1, col]
        lo = np.array([b["lo"] for b in bins])
        w = bins[0]["hi"] - bins[0]["lo"]
        acc = np.array([b["accuracy"] if b["count"] else 0 for b in bins])
        conf = np.array([b["confidence"] if b["count"] else 0 for b in bins])
        has = np.array([b["count"] > 0 for b in bins])
        ax.bar(lo[has], acc[has], w, align="edge", color="#3b6fb6", edgecolor="white", label="accuracy")
        ax.bar(lo[has], (conf - acc)[has], w, bottom=acc[has], align="edge", color="#e0554b", alpha=0.35,
               edgecolor="#e0554b", hatch="//", label="gap to confidence")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: ECE {e:.4f}")
        ax.set_ylabel("accuracy in bin")
        ax.legend(loc="upper left", fontsize=9)
        hx.bar(lo, [b["count"] for b in bins], w, align="edge", color="#8a94a6", edgecolor="white")
        hx.set_yscale("symlog")
        hx.set_xlabel("top-1 confidence (15 bins)")
        hx.set_ylabel("images")
        hx.set_xlim(0, 1)
    fig.suptitle(f"Reliability diagram, {tier} tier", fontsize=14)
    fig.tight_layout()
    return _save(fig, path)


def plot_coverage(curves: dict[str, dict], threshold: float | None, marks: dict[str, dict], path: Path,
                  target_precision: float | None = None, target_coverage: float | None = None,
                  rule: str | None = None) -> Path:
    """Coverage-accuracy curves (most confident first), each chosen/served point marked (`marks` may name
    a point without a curve, e.g. a cascade's test tier), and the rule's target as a dashed line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colours = ("#3b6fb6", "#8a94a6", "#e08a2c", "#4f9a5a")
    for name, colour in zip(dict.fromkeys([*curves, *marks]), colours * 3, strict=False):
        if name in curves:
            c = curves[name]
            ax.plot(c["coverage"], c["accuracy"], lw=2, color=colour, label=name, drawstyle="steps-post")
        m = marks.get(name)
        if m and m.get("accuracy_covered") is not None:
            ax.plot([m["coverage"]], [m["accuracy_covered"]], "o", ms=9, color=colour, mec="black",
                    label=f"{name} at the threshold: answers {100 * m['coverage']:.0f} %, "
                          f"{100 * m['accuracy_covered']:.1f} % right")
    if target_precision is not None:
        ax.axhline(target_precision, ls="--", lw=1, color="#c0504d", label=f"target precision {target_precision:.3f}")
    if target_coverage is not None:
        ax.axvline(target_coverage, ls="--", lw=1, color="#c0504d", label=f"target coverage {target_coverage:.2f}")
    ax.set_xlabel("coverage (share of images answered, most confident first)")
    ax.set_ylabel("accuracy on answered images")
    ax.set_xlim(0, 1.02)
    lows = [min(c["accuracy"]) for c in curves.values() if c["accuracy"]]
    lows += [m["accuracy_covered"] for m in marks.values() if m and m.get("accuracy_covered") is not None]
    lo = min(lows + [1.0, target_precision if target_precision is not None else 1.0])
    ax.set_ylim(max(0.0, lo - 0.03), 1.005)
    ax.grid(alpha=0.3)
    thr = "none" if threshold is None else "0: never abstains" if threshold == 0 else f"{threshold:.3f}"
    ax.set_title(f"Coverage vs accuracy (abstention threshold {thr}{f', rule {rule}' if rule else ''})")
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.14), fontsize=8, frameon=False)  # below: never on a curve
    return _save(fig, path)


def thumbnail(path: str, size: int = 220) -> bytes | None:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=82)
            return buf.getvalue()
    except (OSError, ValueError):
        return None


def plot_mistakes(items: list[dict], tier: str, path: Path) -> Path:
    from PIL import Image

    plt = _plt()
    cols = 4
    rows = max(1, -(-len(items) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.1, rows * 3.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, it in zip(axes.flat, items, strict=False):
        if it["thumb"]:
            ax.imshow(Image.open(io.BytesIO(it["thumb"])))
        ax.set_title(f"true: {it['true']}\npred: {it['pred']} ({it['confidence']:.2f})", fontsize=10.5,
                     color="#b3261e")
    if not items:
        fig.text(0.5, 0.45, "no mistakes on this tier", ha="center", va="center", fontsize=14)
    fig.suptitle(f"Most confident mistakes ({tier} tier)", fontsize=14)
    fig.tight_layout()
    return _save(fig, path, dpi=80)  # photos make big PNGs; thumbnails are 220 px anyway


def plot_history(csv_path: Path, path: Path) -> Path | None:
    if not csv_path.is_file():
        return None
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    x = np.arange(1, len(rows) + 1)
    # the checkpoint kept: the last head epoch (solved to convergence), else the best validation loss
    val = np.array([float(r["val_loss"]) if r["stage"] != "head" else np.nan for r in rows])
    best = len(rows) - 1 if np.isnan(val).all() else int(np.nanargmin(val))
    # a refitted head logs no validation curve (validation is in its fit): say so instead of an empty line
    refit = all(np.isnan(float(r["val_loss"])) for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, name in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        marker = "o" if len(rows) <= 30 else None  # a 1-epoch run is a point, not an invisible line
        ax.plot(x, [float(r[f"train_{key}"]) for r in rows], lw=2, marker=marker,
                label="train + validation (all fitted on)" if refit else "train")
        if not refit:
            ax.plot(x, [float(r[f"val_{key}"]) for r in rows], lw=2, marker=marker, label="validation")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(0.5, len(rows) + 0.5)
        ax.axvline(best + 1, color="grey", ls=":", label=f"{'converged head' if refit else 'best checkpoint'} "
                                                      f"(epoch {best + 1})")
        for i in range(1, len(rows)):
            if rows[i]["stage"] != rows[i - 1]["stage"]:
                ax.axvline(i + 0.5, color="black", lw=1)
                ax.text(i + 0.7, ax.get_ylim()[1], rows[i]["stage"], va="top", fontsize=9)
        ax.set_xlabel("epoch (all stages)")
        ax.set_title(f"{name} ({rows[0]['stage']}{' ...' if len({r['stage'] for r in rows}) > 1 else ''})")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.tight_layout()
    return _save(fig, path)
