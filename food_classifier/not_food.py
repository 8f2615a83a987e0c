"""Reject photos that are clearly not food, from the ImageNet head the stage-1 backbone keeps.

    mask = reject(imagenet_logits, meta.not_food)     # bool [N], True = answer "not_food"

Why this rule: a food classifier has no "none of these" class, so a portrait or a cat gets a
confident food label. The Lite0 backbone's own 1000-class ImageNet head already knows people,
animals, screens and rooms. The score is the probability ImageNet puts on food-ish classes (foods,
and the plates, bowls, cookware and kitchens food is photographed with): summing over a broad set
is robust where any one class is not (a burrito photo is often "plate" or "tray", not "burrito").
A photo is rejected when that mass is below `threshold`, which `training/not_food.fit_rule` picks
on the bundle's own food photos so that, with 95 % confidence, at most 1 % of food photos would be
rejected (docs/BENCHMARKS.md "Not food"). Only numpy: serving imports this.
"""

from __future__ import annotations

import numpy as np

from food_classifier.bundle_schema import NotFood

NOT_FOOD = "not_food"


def score(imagenet_logits: np.ndarray, rule: NotFood) -> np.ndarray:
    """Food-ish probability mass per image, float64 [N] in [0, 1] (softmax at `rule.temperature`)."""
    z = np.asarray(imagenet_logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"imagenet_logits must be [N, classes], got shape {z.shape}")
    if z.shape[1] <= max(rule.food_classes):
        raise ValueError(f"imagenet_logits has {z.shape[1]} classes; the not-food rule names class "
                         f"{max(rule.food_classes)} (output {rule.output!r} should carry the 1000 ImageNet logits)")
    z = z / rule.temperature
    top = z.max(axis=1, keepdims=True)
    e = np.exp(z - top)  # the max-shift keeps exp finite; the ratio is unchanged
    return e[:, rule.food_classes].sum(axis=1) / e.sum(axis=1)


def reject(imagenet_logits: np.ndarray, rule: NotFood) -> np.ndarray:
    """True where the photo is clearly not food (food-ish mass below the rule's threshold)."""
    return score(imagenet_logits, rule) < rule.threshold
