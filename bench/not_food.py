"""Choose and measure the "not food" rule on Lite0's ImageNet logits; prints the numbers behind docs/BENCHMARKS.md.

Food photos: the shared Food-101 subset, split as `train` splits it (seed 42); the rule is fitted on
its train + validation tiers and the test tier only reports. Non-food: `training/not_food.nonfood_images`
(package photos, their variants, synthetic images); a fixed third of the sources is held out of fitting.
Two inputs, as the two models see them:
  * stage1  — the project's Lite0 spec (resize 320, crop 288, mean = std = 0.5), the 288 crop bilinearly
              downsampled to 224 as the stage-1 graph does before Lite0;
  * builtin — the built-in model's preprocessing (resize 256, crop 224): prints `builtin.NOT_FOOD`.

    FOOD_CLASSIFIER_DATA=../shared/datasets/food101_mini3 python bench/not_food.py [--mode stage1|builtin|both]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from food_classifier import builtin, runtime  # noqa: E402
from food_classifier.not_food import reject, score  # noqa: E402
from food_classifier.preprocessing import PreprocessSpec, normalize, open_image, resize_crop  # noqa: E402
from food_classifier.training import data  # noqa: E402
from food_classifier.training.features import cache_dir  # noqa: E402
from food_classifier.training.models import create_model  # noqa: E402
from food_classifier.training.not_food import (  # noqa: E402
    TEMPERATURES,
    fit_rule,
    is_held_out,
    nonfood_images,
    rates,
    source,
)

MODES = {"stage1": (PreprocessSpec(resize=320, crop=288), 224),
         "builtin": (PreprocessSpec.from_dict(builtin.PREPROCESSING), None)}


def imagenet_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0] for i in range(1000)]


def logits(model: torch.nn.Module, images: list, spec: PreprocessSpec, size: int | None, key: str) -> np.ndarray:
    """[N, 1000] ImageNet logits (images: paths or PIL images), cached by `key` under the feature cache."""
    path = cache_dir() / "not_food_bench" / f"{key}.npy"
    if path.is_file():
        return np.load(path)

    def prepare(img) -> np.ndarray:
        img = open_image(img, draft=spec.resize) if not hasattr(img, "size") else img.convert("RGB")
        return normalize(resize_crop(img, spec), spec)

    def compute(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)
        if size is not None:  # what the stage-1 graph does before Lite0
            t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        with torch.inference_mode():
            return model(t).numpy()

    out = np.concatenate(runtime.map_batched(images, prepare, compute, batch_size=32))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def coffee_photo():
    import skimage.data
    from PIL import Image

    return Image.fromarray(skimage.data.coffee())


def study(mode: str, model, rows, nonfood, names: list[str]) -> None:
    spec, size = MODES[mode]
    tag = hashlib.sha256("".join(str(r.path) for r in rows).encode() + "".join(n for n, _ in nonfood).encode())
    key = f"{mode}-{spec.key}-{size}-{tag.hexdigest()[:12]}"
    food = logits(model, [r.path for r in rows], spec, size, f"{key}-food")
    other = logits(model, [img for _, img in nonfood], spec, size, f"{key}-nonfood")
    tiers = np.array([r.tier for r in rows])
    fit_food = food[np.isin(tiers, ["train", "validation"])]
    held = np.array([is_held_out(n) for n, _ in nonfood])
    rule = fit_rule(fit_food, other[~held], 0.01, chosen_on=f"bench/not_food.py --mode {mode}")
    print(f"\n=== {mode}: preprocessing {spec.key}" + (f", bilinear to {size}" if size else ""))
    print(f"rule: food-ish mass over {len(rule.food_classes)} ImageNet classes at T={rule.temperature:g} "
          f"< {rule.threshold:.4g} -> not food")
    for t in TEMPERATURES:  # every candidate, for the record (the test column did not choose)
        r = fit_rule(fit_food, other[~held], 0.01, temperatures=[t])
        fit_caught = r.measured["fit"]["nonfood_caught"]
        print(f"  candidate T={t:g}: threshold {r.threshold:.4g}, fit catches {fit_caught:.3f},"
              f" held-out catches {reject(other[held], r).mean():.3f}, test false rejections "
              f"{reject(food[tiers == 'test'], r).sum()}")
    per_tier = {t: rates(rule, food[tiers == t], other[:0]) for t in data.TIERS}
    for t, got in per_tier.items():
        print(f"food false rejections, {t:10s}: {got['food_false_reject']:.4f} of {got['n_food']}")
    fit_c, held_c = rates(rule, other[:0], other[~held]), rates(rule, other[:0], other[held])
    print(f"non-food caught: fit {fit_c['nonfood_caught']:.3f} of {fit_c['n_nonfood']}, "
          f"held out {held_c['nonfood_caught']:.3f} of {held_c['n_nonfood']}, "
          f"all {reject(other, rule).mean():.3f} of {len(other)}")
    s_food, s_other, rej = score(food, rule), score(other, rule), reject(other, rule)
    wrong = [i for i in np.flatnonzero(reject(food, rule))]
    print("food photos rejected (tier, file, score, ImageNet top-1):")
    for i in wrong:
        print(f"  {rows[i].tier:10s} {rows[i].path.parent.name}/{rows[i].path.name} {s_food[i]:.3f} "
              f"{names[int(food[i].argmax())]}")
    print("package photos (original | variants caught), score, ImageNet top-1:")
    groups = defaultdict(list)
    for i, (n, _) in enumerate(nonfood):
        groups[source(n)].append(i)
    for src, idx in groups.items():
        i0 = idx[0]
        caught_var = sum(bool(rej[i]) for i in idx[1:])
        print(f"  {src:28s} {'caught' if rej[i0] else 'MISSED':6s} | {caught_var}/{len(idx) - 1:<2d} "
              f"{s_other[i0]:.3f} {names[int(other[i0].argmax())]}{'  (held out)' if held[i0] else ''}")
    kinds = Counter(n.split("/")[1].rsplit("-", 1)[0] for n, _ in nonfood if n.startswith("synthetic/"))
    caught = Counter(n.split("/")[1].rsplit("-", 1)[0] for (n, _), r in zip(nonfood, rej, strict=True)
                     if r and n.startswith("synthetic/"))
    print("synthetic kinds caught: " + ", ".join(f"{k} {caught[k]}/{c}" for k, c in kinds.items()))
    coffee = logits(model, [coffee_photo()], spec, size, f"{key}-coffee")
    print(f"skimage coffee (a drink, in neither set): score {score(coffee, rule)[0]:.3f}, "
          f"{'rejected' if reject(coffee, rule)[0] else 'kept'}, top-1 {names[int(coffee[0].argmax())]}")
    if mode == "builtin":
        test = per_tier["test"]
        print("builtin.NOT_FOOD = " + repr({
            "threshold": round(rule.threshold, 6), "temperature": rule.temperature, "max_false_reject": 0.01,
            "measured": {"fit": rule.measured["fit"], "test": test, "nonfood_held_out": held_c,
                         "nonfood_all": rates(rule, other[:0], other)}}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    args = parser.parse_args()
    root = Path(os.environ.get("FOOD_CLASSIFIER_DATA", ROOT.parent / "shared" / "datasets" / "food101_mini3"))
    if not root.is_dir():
        print(f"needs the shared food photos (FOOD_CLASSIFIER_DATA={root})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = data.split(root, Path(tmp) / "manifest.csv", progress=False)
    torch.set_num_threads(runtime.default_threads())
    model = create_model("efficientnet_lite0", num_classes=1000).eval()
    nonfood = nonfood_images()
    names = imagenet_names()
    print(f"{len(rows)} food photos ({dict(Counter(r.tier for r in rows))}), {len(nonfood)} non-food images")
    for mode in (MODES if args.mode == "both" else [args.mode]):
        study(mode, model, rows, nonfood, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
