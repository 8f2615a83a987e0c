"""Choose the "not food" rule on data (the training side of `food_classifier/not_food.py`).

    images = nonfood_images()                              # [(name, PIL image)], deterministic
    rule = fit_rule(food_logits, nonfood_logits)           # NotFood: threshold chosen on the food photos
    rule = fit_for(run, spec, food_logits, test_logits)    # the same, non-food logits computed by `run`

The rule's score is the softmax mass the ImageNet head puts on `FOODISH_CLASSES`. Its threshold rejects
so few of the given food photos (a bundle's train and validation tiers: never its test tier) that the
false-rejection rate is below `max_false_reject` with 95 % confidence, not just on those photos: with
~1,000 photos the plain 1 % quantile rejected 2.4 % of unseen test photos (bench/not_food.py). The
temperature of that softmax is the one, among a few, that catches the most non-food photos then.
Non-food photos: the ones scikit-image and scikit-learn ship (nothing downloaded), their
crops, flips and rescales, and synthetic screenshots, documents, charts, gradients and noise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from food_classifier import runtime
from food_classifier.bundle_schema import NotFood
from food_classifier.not_food import score
from food_classifier.preprocessing import PreprocessSpec, normalize, resize_crop

# ImageNet-1k indices counted as food-ish: everything a food photo plausibly shows.
FOODISH_CLASSES: list[int] = sorted({
    *range(923, 958), *range(959, 970),  # plate, dishes, bread, fruit, vegetables, drinks, cup (958 hay left out)
    987, 998,  # corn, ear (of grain)
    992, 996, 997,  # agaric, hen-of-the-woods, bolete: mushrooms as they are served
    118, 119, 121, 122, 123, 124,  # crabs, lobsters, crayfish: ImageNet shows them live, menus cooked
    415, 467, 509, 582, 762,  # bakery, butcher shop, confectionery, grocery store, restaurant
    469, 521, 544, 567, 766, 827, 859, 891, 909,  # caldron, Crock Pot, Dutch oven, frying pan, rotisserie,
    # stove, toaster, waffle iron, wok
    499, 618, 647, 659, 813, 828, 910,  # cleaver, ladle, measuring cup, mixing bowl, spatula, strainer, spoon
    504, 505, 532, 533, 729, 773, 809, 849, 868,  # coffee mug, coffeepot, dining table, dishrag, plate rack,
    # saltshaker, soup bowl, teapot, tray
    478, 692,  # carton, packet: packaged food (boxed apple pies of the training photos)
    599,  # honeycomb
})
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
# scikit-image photos that are clearly not food. Left out: coffee.png (a cup of coffee: a drink, scored
# food-ish by design), the grey chessboard (a duplicate of the RGB one), and non-photo data files.
SKIMAGE = ["astronaut", "brick", "camera", "cell", "chelsea", "chessboard_RGB", "clock_motion", "coins", "color",
           "grass", "gravel", "horse", "hubble_deep_field", "ihc", "logo", "microaneurysms", "moon", "motorcycle_left",
           "motorcycle_right", "page", "phantom", "retina", "rocket", "text"]
SKLEARN = ["china.jpg", "flower.jpg"]
WORDS = ("invoice total account settings profile search results download update report meeting agenda "
         "password login submit cancel network server latency error warning status chart revenue quarter "
         "monday tuesday project deadline review comment share export import delete save open close").split()


def package_photos() -> list[tuple[str, Image.Image]]:
    """The non-food photos scikit-image and scikit-learn ship, as RGB."""
    from pathlib import Path

    import skimage
    import sklearn.datasets

    root = Path(skimage.__file__).parent / "data"
    out = []
    for name in SKIMAGE:
        path = next(p for p in root.glob(f"{name}.*") if p.suffix in (".png", ".jpg"))
        out.append((f"skimage/{name}", _rgb(Image.open(path))))
    for name in SKLEARN:
        out.append((f"sklearn/{Path(name).stem}", Image.fromarray(sklearn.datasets.load_sample_image(name))))
    return out


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I", "F"):  # 16-bit greyscale (e.g. microscopy): scale to 8 bits
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.uint8(255 * (a - a.min()) / max(a.max() - a.min(), 1e-9)))
    return img.convert("RGB")


def variants(name: str, img: Image.Image) -> list[tuple[str, Image.Image]]:
    """Crops, a flip, a rotation and a blur-rescale of one photo (more looks at the same content)."""
    w, h = img.size
    return [
        (f"{name}~crop-left", img.crop((0, 0, max(1, w * 2 // 3), h))),
        (f"{name}~crop-right", img.crop((w // 3, 0, w, h))),
        (f"{name}~crop-centre", img.crop((w // 6, h // 6, w - w // 6, h - h // 6))),
        (f"{name}~flip", img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        (f"{name}~rot90", img.transpose(Image.Transpose.ROTATE_90)),
        (f"{name}~small", img.resize((max(1, w // 3), max(1, h // 3)), Image.BILINEAR).resize((w, h), Image.BICUBIC)),
    ]


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))  # type: ignore[return-value]


def _text_page(rng: np.random.Generator, dark: bool) -> Image.Image:
    """A document or chat screenshot: lines of words on a light (or dark-mode) background."""
    bg, fg = ((30, 30, 36), (220, 220, 220)) if dark else ((250, 250, 250), (20, 20, 20))
    img = Image.new("RGB", (int(rng.integers(400, 800)), int(rng.integers(400, 800))), bg)
    draw = ImageDraw.Draw(img)
    size = int(rng.integers(12, 28))
    font = ImageFont.load_default(size=size)
    y = 10
    while y < img.height - size:
        words = " ".join(rng.choice(WORDS, int(rng.integers(2, 9))))
        draw.text((10 + int(rng.integers(0, 40)), y), words, fill=fg, font=font)
        y += int(size * rng.uniform(1.3, 2.2))
    return img


def _ui(rng: np.random.Generator) -> Image.Image:
    """An app screenshot: a title bar, a sidebar, panels, buttons with labels."""
    w, h = int(rng.integers(500, 900)), int(rng.integers(400, 700))
    img = Image.new("RGB", (w, h), _colour(rng, 200))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    draw.rectangle((0, 0, w, 40), fill=_colour(rng, 0, 120))
    draw.rectangle((0, 40, w // 5, h), fill=_colour(rng, 150, 230))
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(w // 5 + 10, w - 120)), int(rng.integers(50, h - 60))
        x1, y1 = min(w - 5, x0 + int(rng.integers(80, 300))), min(h - 5, y0 + int(rng.integers(30, 200)))
        draw.rounded_rectangle((x0, y0, x1, y1), radius=6, fill=_colour(rng, 180), outline=_colour(rng, 0, 100))
        draw.text((x0 + 8, y0 + 8), str(rng.choice(WORDS)).title(), fill=(0, 0, 0), font=font)
    for i in range(int(rng.integers(4, 10))):
        draw.text((10, 55 + 28 * i), str(rng.choice(WORDS)), fill=(40, 40, 40), font=font)
    return img


def _chart(rng: np.random.Generator) -> Image.Image:
    """A bar or line chart with axes."""
    w, h = 640, 480
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.line((60, 20, 60, h - 50), fill=(0, 0, 0), width=2)
    draw.line((60, h - 50, w - 20, h - 50), fill=(0, 0, 0), width=2)
    values = rng.uniform(0.1, 1.0, int(rng.integers(5, 14)))
    step = (w - 100) / len(values)
    if rng.random() < 0.5:
        for i, v in enumerate(values):
            x = 70 + i * step
            draw.rectangle((x, h - 50 - v * (h - 90), x + step * 0.7, h - 51), fill=_colour(rng, 0, 200))
    else:
        pts = [(70 + i * step, h - 50 - v * (h - 90)) for i, v in enumerate(values)]
        draw.line(pts, fill=_colour(rng, 0, 200), width=3)
    return img


def _gradient(rng: np.random.Generator) -> Image.Image:
    """A linear or radial two-colour gradient."""
    h, w = 300, 400
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    t = np.hypot(yy - 0.5, xx - 0.5) * 1.4 if rng.random() < 0.5 else (yy * rng.random() + xx * rng.random()) / 2
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    return Image.fromarray(np.uint8(a + (b - a) * np.clip(t, 0, 1)[..., None]))


def _noise(rng: np.random.Generator) -> Image.Image:
    """Colour noise, sometimes blurred into blotches."""
    img = Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))
    return img.filter(ImageFilter.GaussianBlur(float(rng.choice([0, 2, 6])))) if rng.random() < 0.7 else img


SYNTHETIC = {"text": lambda r: _text_page(r, False), "text-dark": lambda r: _text_page(r, True), "ui": _ui,
             "chart": _chart, "gradient": _gradient, "noise": _noise}


def synthetic_images(per_kind: int = 6, seed: int = 0) -> list[tuple[str, Image.Image]]:
    """Screenshots, documents, charts, gradients and noise, the same for the same seed."""
    out = []
    for kind, make in SYNTHETIC.items():
        for i in range(per_kind):
            rng = np.random.default_rng([seed, i, int(hashlib.sha256(kind.encode()).hexdigest()[:8], 16)])
            out.append((f"synthetic/{kind}-{i}", make(rng)))
    return out


def nonfood_images(with_variants: bool = True, per_kind: int = 6) -> list[tuple[str, Image.Image]]:
    """Package photos (and their variants: `name~variant`) followed by synthetic images."""
    photos = package_photos()
    out = list(photos)
    if with_variants:
        for name, img in photos:
            out += variants(name, img)
    return out + synthetic_images(per_kind)


def source(name: str) -> str:
    """The photo or synthetic image a sample was made from (`skimage/astronaut~flip` -> `skimage/astronaut`)."""
    return name.split("~")[0]


def is_held_out(name: str) -> bool:
    """A fixed third of the sources (all their variants with them) is held out of rule fitting."""
    return int(hashlib.sha256(source(name).encode()).hexdigest(), 16) % 3 == 0


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if p <= 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
            + (n - i) * math.log1p(-p) for i in range(k + 1)]
    return float(sum(math.exp(v) for v in logs))


def allowed_rejections(n: int, max_false_reject: float, confidence: float) -> tuple[int, bool]:
    """How many of `n` food photos may fall below the threshold: the most for which the rate stays below
    `max_false_reject` with `confidence` (one-sided Clopper-Pearson: P(X <= k | n, max) <= 1 - confidence),
    so the rate on new photos, not just on these, is likely within the cap. Also whether that bound is met
    (with too few photos even k = 0 is not: the threshold is then the lowest food score)."""
    if confidence <= 0:
        return int(math.floor(max_false_reject * n)), True
    k = -1
    while k + 1 < n and _binom_cdf(k + 1, n, max_false_reject) <= 1 - confidence:
        k += 1
    return max(k, 0), k >= 0


def _threshold(food_scores: np.ndarray, k: int) -> float:
    """The highest threshold with at most `k` food scores strictly below it (reject: score < threshold)."""
    s = np.sort(food_scores)
    return float(s[min(k, len(s) - 1)])


def rates(rule: NotFood, food_logits: np.ndarray, nonfood_logits: np.ndarray) -> dict[str, float | int]:
    """False rejections of food photos and catches of non-food photos under `rule`."""
    from food_classifier.not_food import reject

    out: dict[str, float | int] = {}
    if len(food_logits):
        out.update(food_false_reject=round(float(reject(food_logits, rule).mean()), 4), n_food=len(food_logits))
    if len(nonfood_logits):
        out.update(nonfood_caught=round(float(reject(nonfood_logits, rule).mean()), 4), n_nonfood=len(nonfood_logits))
    return out


def fit_rule(food_logits: np.ndarray, nonfood_logits: np.ndarray, max_false_reject: float = 0.01, *,
             confidence: float = 0.95, food_classes: Sequence[int] = FOODISH_CLASSES,
             temperatures: Sequence[float] = TEMPERATURES, output: str = "imagenet_logits",
             chosen_on: str | None = None) -> NotFood:
    """The rule whose false-rejection rate on food photos is below `max_false_reject` with `confidence`
    (`allowed_rejections`; 0: just the rate on these photos) and which, among the candidate temperatures,
    catches the most of `nonfood_logits` (ties: T nearest 1). Pass the food photos the model was fitted
    on (train, validation), never the test tier."""
    food_logits, nonfood_logits = np.asarray(food_logits), np.asarray(nonfood_logits)
    if len(food_logits) == 0:
        raise ValueError("fit_rule needs food photos' logits to choose a threshold on")
    if not 0 < max_false_reject < 1:
        raise ValueError(f"max_false_reject must be in (0, 1), got {max_false_reject}")
    k, bound_met = allowed_rejections(len(food_logits), max_false_reject, confidence)
    best: tuple[tuple, NotFood] | None = None
    for t in temperatures:
        probe = NotFood(output=output, food_classes=list(food_classes), threshold=0.0, temperature=t)
        rule = probe.model_copy(update={"threshold": _threshold(score(food_logits, probe), k)})
        key = (rates(rule, food_logits, nonfood_logits).get("nonfood_caught", 0.0), -abs(math.log(t)))
        if best is None or key > best[0]:
            best = (key, rule)
    assert best is not None
    rule = best[1]
    fit = {**rates(rule, food_logits, nonfood_logits), "confidence": confidence, "bound_met": bound_met}
    return NotFood(output=output, food_classes=list(food_classes), threshold=rule.threshold,
                   temperature=rule.temperature, max_false_reject=max_false_reject, chosen_on=chosen_on,
                   measured={"fit": fit})


def fit_for(run: Callable[[np.ndarray], np.ndarray], spec: PreprocessSpec, food_logits: np.ndarray,
            test_logits: np.ndarray | None = None, max_false_reject: float = 0.01, **kwargs) -> NotFood:
    """`fit_rule` for a graph: `run(batch)` returns its ImageNet logits for `spec`-preprocessed images
    (a bundle's stage-1 output). Fits on the non-held-out non-food images and records, under `measured`,
    the catch rate on the held-out ones and, when given, false rejections on the test tier's food logits."""
    images = nonfood_images()
    held = np.array([is_held_out(name) for name, _ in images])
    other = np.concatenate(runtime.map_batched([img for _, img in images],
                                               lambda img: normalize(resize_crop(img, spec), spec), run))
    rule = fit_rule(food_logits, other[~held], max_false_reject, **kwargs)
    extra = {"nonfood_held_out": rates(rule, other[:0], other[held])}
    if test_logits is not None and len(test_logits):
        extra["test"] = rates(rule, np.asarray(test_logits), other[:0])
    return rule.model_copy(update={"measured": {**rule.measured, **extra}})
