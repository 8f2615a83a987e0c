"""The model registry: names, the shipped ImageNet weights, any timm architecture with local weights."""

from __future__ import annotations

import pytest
import torch

from food_classifier.training.models import (
    BaseCNN,
    ModelError,
    create_model,
    default_preprocessing,
    list_models,
    lite_weights_path,
    lukemelas_to_timm,
)


def test_registry_lists_the_built_in_models():
    assert {"base_cnn", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(list_models())


@pytest.mark.parametrize("variant,stages", [(1, [1, 3, 3, 4, 4, 5, 1]), (2, [1, 3, 3, 4, 4, 5, 1])])
def test_lite1_lite2_load_their_shipped_weights_strictly(variant, stages):
    from food_classifier.training.models import lite_weights_path

    state = torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)
    model = create_model(f"efficientnet_lite{variant}", num_classes=1000)  # strict load inside
    assert [len(s) for s in model.model.blocks] == stages
    torch.testing.assert_close(model.model.conv_stem.weight, state["_conv_stem.weight"])
    assert model.model.classifier.in_features == 1280


def test_ensemble_concatenates_member_features_and_averages_member_heads():
    from food_classifier.training.models import Ensemble, EnsembleHead, is_pretrained

    name = "efficientnet_lite0+efficientnet_lite1"
    assert is_pretrained(name) and default_preprocessing(name) == default_preprocessing("efficientnet_lite0")
    model = create_model(name, num_classes=3).eval()
    assert isinstance(model, Ensemble) and isinstance(model.classifier, EnsembleHead)
    assert model.num_features == 2560 and not any(p.requires_grad for p in model.members.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(feats[:, :1280], model.members[0].forward_features(x))
        torch.testing.assert_close(feats[:, 1280:], model.members[1].forward_features(x))
        heads = model.classifier.heads
        torch.testing.assert_close(model(x), (heads[0](feats[:, :1280]) + heads[1](feats[:, 1280:])) / 2)


@pytest.mark.parametrize("name,words", [("efficientnet_lite0+base_cnn", "pretrained"),
                                        ("efficientnet_lite0+nosuchnet", "unknown model")])
def test_ensemble_errors_are_one_sentence(name, words):
    with pytest.raises(ModelError, match=words):
        create_model(name, num_classes=3)


@pytest.mark.parametrize("classes", [2, 5])
def test_base_cnn_any_number_of_classes(classes):
    model = create_model("base_cnn", num_classes=classes).eval()
    spec = default_preprocessing("base_cnn")
    x = torch.randn(3, 3, spec.crop, spec.crop)
    assert model(x).shape == (3, classes)
    assert model.forward_features(x).shape == (3, model.num_features)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 4


def test_lite0_loads_shipped_weights_strictly_and_maps_every_key():
    import timm

    state = torch.load(lite_weights_path(0), map_location="cpu", weights_only=True)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = lukemelas_to_timm(state, [len(s) for s in ref.blocks])
    assert set(mapped) == set(ref.state_dict())  # strict: nothing missing, nothing extra
    model = create_model("efficientnet_lite0", num_classes=1000)
    torch.testing.assert_close(model.model.conv_stem.weight, state["_conv_stem.weight"])


def test_lite0_new_head_keeps_the_backbone():
    model = create_model("efficientnet_lite0", num_classes=3).eval()
    assert model.classifier.out_features == 3
    spec = default_preprocessing("efficientnet_lite0")
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)  # FACTS: x/127.5 - 1
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)


def test_any_timm_architecture_with_a_local_weights_file(tmp_path):
    import timm

    src = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    model = create_model("resnet18", num_classes=4, weights=path).eval()
    torch.testing.assert_close(model.model.conv1.weight, src.conv1.weight)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    assert default_preprocessing("resnet18").crop == 224


def test_wrong_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "cnn.pth"
    torch.save(BaseCNN(3).state_dict(), path)
    with pytest.raises(ModelError, match="does not fit"):
        create_model("resnet18", num_classes=3, weights=path)
    with pytest.raises(ModelError, match="not found"):
        create_model("resnet18", num_classes=3, weights=tmp_path / "missing.pth")


def test_unknown_model_name():
    with pytest.raises(ModelError, match="unknown model 'pizzanet'"):
        create_model("pizzanet", num_classes=3)
