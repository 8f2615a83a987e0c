"""The `train` recipe's settings, declared once: `TrainConfig` is what `fit` reads, what config.json
and bundle.json record, and where the `train` command takes each option's default and help text.

No torch here, so the CLI can build its options (and `--help`) without the training extras.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

DEFAULT_ARCH = "efficientnet_lite0+efficientnet_lite1"
# abstention, when neither target is set: the most coverage whose out-of-fold precision reaches
# min(ABSTAIN_MAX_PRECISION, out-of-fold accuracy + ABSTAIN_MARGIN) (calibrate.AbstentionRule)
ABSTAIN_MAX_PRECISION = 0.98
ABSTAIN_MARGIN = 0.07
QUALITIES = ("fast", "best")
DEVICES = ("auto", "cpu", "cuda")


def _opt(default: Any, help: str = "", **cli: Any) -> Any:
    """A field that is also a `train` option: its help, and how the flag is spelled (`flag`, `metavar`, `min`...)."""
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass
class TrainConfig:
    quality: str = _opt("fast", metavar="fast|best", help=(
        "fast: linear heads on frozen features of each backbone (minutes); best: also fine-tune the last stages of "
        "each backbone (docs/BENCHMARKS.md, 'Quality on ten classes')."))
    time_budget: float = _opt(600.0, min=0.0, metavar="SECONDS", help=(
        "--quality best: seconds the fit may take (trunk activations + fine-tuning); it stops between epochs, "
        "keeping the best weights so far, when the next epoch would pass it; 0 = no limit."))
    device: str = _opt("auto", metavar="auto|cpu|cuda", help=(
        "--quality best: where fine-tuning runs: auto = a CUDA GPU when PyTorch sees one (mixed precision), else "
        "the CPU."))
    arch: str = _opt(DEFAULT_ARCH, "Registered name, any timm architecture, or an ensemble a+b.")
    weights: str | None = _opt(None, "Local checkpoint for a timm architecture.")
    epochs: int = _opt(0, "0 = default for the chosen path.")  # head 40, end-to-end 30, fine-tune 6
    batch_size: int = _opt(0, "0 = default for the chosen path.")  # 32 end to end; the head is full-batch
    lr: float = _opt(0.0, "0 = default for the chosen path.")  # head L-BFGS 1.0, end-to-end 2e-3, fine-tune 1e-3
    weight_decay: float = 3e-3    # L2 on the head (cached path); AdamW decay end to end
    label_smoothing: float = _opt(0.1)
    patience: int = _opt(5, "Early stopping patience (epochs).")  # end-to-end paths; the head is solved
    aug_views: int = _opt(2, "Extra views per training image beyond the plain one: its mirror image, "
                             "then random augmentations.")
    aug_strength: float = 1.0
    refit: bool = _opt(True, flag="--refit/--no-refit", help=(  # not with fine_tune
        "Head path: fit the final head on train+validation (held-out numbers then come from out-of-fold logits and "
        "the test tier)."))
    fine_tune: bool = _opt(False, "Also unfreeze the last blocks.", flag="--fine-tune")
    fine_tune_blocks: int = 2
    image_size: int = _opt(0, "Input crop in px; 0 = the model's default (288 for Lite0).")
    seed: int = _opt(42)
    target_precision: float | None = _opt(
        None, flag="--target-precision", metavar="P", min=0.0, max=1.0, show_default="auto", help=(
            "Abstention: answer only as many photos as keep this precision on held-out photos (the most confident "
            "first); excludes --target-coverage. Default: chosen for the task, precision >= "
            f"min({ABSTAIN_MAX_PRECISION:g}, the model's out-of-fold accuracy + {ABSTAIN_MARGIN:g})."))
    target_coverage: float | None = _opt(
        None, flag="--target-coverage", metavar="C", min=0.0, max=1.0, help=(
            "Abstention: answer this share of photos (the most confident), 'unsure' on the rest, whatever the "
            "precision; excludes --target-precision."))
    unlabeled: str | None = _opt(None, metavar="DIR", show_default=False, help=(
        "Self-training: photos without labels (any layout, e.g. the photos `serve --keep-photos` kept); the heads "
        "are refitted with the ones they are surest of, pseudo-labelled. Pays with few labels per class "
        "(docs/BENCHMARKS.md, 'Active learning'). Not with --quality best."))
    threads: int = 0               # 0 = all cores


def abstention_check(target_precision: float | None, target_coverage: float | None) -> str | None:
    """What is wrong with this pair of abstention targets, for the user (None: nothing)."""
    if target_precision is not None and target_coverage is not None:
        return ("--target-precision and --target-coverage exclude each other: pass one of them, or neither for "
                "the default rule")
    for flag, v in (("--target-precision", target_precision), ("--target-coverage", target_coverage)):
        if v is not None and not 0.0 < v <= 1.0:
            return f"{flag} must be in (0, 1], got {v:g}"
    return None


def options() -> list[tuple[str, Any, str | None, dict[str, Any]]]:
    """(name, default, help, flag spelling) of every TrainConfig field that is a `train` option, in order."""
    out = []
    for f in fields(TrainConfig):
        if "help" in f.metadata:
            assert f.default is not MISSING
            out.append((f.name, f.default, f.metadata["help"] or None, dict(f.metadata["cli"])))
    return out
