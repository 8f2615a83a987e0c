"""Choose the built-in model's abstention threshold on data; prints the table behind `builtin.ABSTENTION`.

The built-in model is zero-shot over 44 ImageNet food classes, so the data that can judge it is:
  * should answer: Food-101 breakfast_burrito photos it calls "burrito" (the one class of the shared
    set its vocabulary names; other answers on food it does not know are wrong anyway);
  * should abstain: the non-food photos scikit-image and scikit-learn ship (astronaut, cat, rocket,
    bricks, text, microscopy, ...; the coffee photo is left out: espresso is one of its classes).
The threshold maximizes Youden's J = (correct answers kept) + (non-food photos abstained) − 1 over a
0.01 grid (ties: the lowest). Also printed: the share of all shared food photos still answered.

    FOOD_CLASSIFIER_DATA=../shared/datasets/food101_mini3 python bench/builtin_threshold.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from food_classifier import builtin  # noqa: E402
from food_classifier.inference import Classifier  # noqa: E402

SKIMAGE = ["astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "chessboard_RGB.png",
           "clock_motion.png", "coins.png", "color.png", "grass.png", "gravel.png", "horse.png",
           "hubble_deep_field.jpg", "ihc.png", "logo.png", "microaneurysms.png", "moon.png", "motorcycle_left.png",
           "page.png", "phantom.png", "retina.jpg", "rocket.jpg", "text.png"]
SKLEARN = ["china.jpg", "flower.jpg"]


def non_food_photos() -> list[Path]:
    import skimage
    import sklearn.datasets

    return ([Path(skimage.__file__).parent / "data" / f for f in SKIMAGE]
            + [Path(sklearn.datasets.__file__).parent / "images" / f for f in SKLEARN])


def confidences(clf: Classifier, photos: list[Path]) -> tuple[np.ndarray, list[str]]:
    preds = clf.predict_batch(photos, threshold=0.0)  # files, decoded as the server decodes uploads
    return np.array([p.confidence for p in preds]), [p.label for p in preds]


def main() -> int:
    data = Path(os.environ.get("FOOD_CLASSIFIER_DATA", ROOT.parent / "shared" / "datasets" / "food101_mini3"))
    if not (data / "breakfast_burrito").is_dir():
        print(f"needs the Food-101 subset with breakfast_burrito/ (FOOD_CLASSIFIER_DATA={data})", file=sys.stderr)
        return 2
    clf = Classifier(builtin.builtin_bundle_path(), threads=2)
    food = sorted(data.glob("*/*.jpg"))
    food_conf, food_label = confidences(clf, food)
    burrito = np.array([p.parent.name == "breakfast_burrito" for p in food])
    correct = burrito & (np.array(food_label) == "burrito")
    other, other_label = confidences(clf, non_food_photos())
    grid = np.round(np.arange(0.05, 0.96, 0.01), 2)
    j = [(food_conf[correct] >= t).mean() + (other < t).mean() - 1 for t in grid]
    best = float(grid[int(np.argmax(j))])
    print(f"{len(food)} food photos ({correct.sum()} burrito photos answered 'burrito'), {len(other)} non-food photos")
    print(f"{'threshold':>9} {'correct kept':>12} {'non-food abstained':>18} {'food answered':>13} {'J':>6}")
    for t, jt in zip(grid, j, strict=True):
        if round(t * 100) % 5 == 0 or t == best:
            print(f"{t:9.2f} {(food_conf[correct] >= t).mean():12.3f} {(other < t).mean():18.3f} "
                  f"{(food_conf >= t).mean():13.3f} {jt:6.3f}" + ("  <- chosen" if t == best else ""))
    answered = [f"{p.name} -> {lab} {c:.2f}"
                for p, lab, c in zip(non_food_photos(), other_label, other, strict=True) if c >= best]
    print("non-food still answered at the chosen threshold:", ", ".join(answered) or "none")
    print(f"chosen: {best} (builtin.ABSTAIN_THRESHOLD = {builtin.ABSTAIN_THRESHOLD})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
