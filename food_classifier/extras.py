"""The message for a missing optional extra, shared by every place that imports one lazily.

Outside a container the fix is `pip install`. Inside one of our images it is not: pip is not in the
image, and an image is rebuilt, not patched. The Containerfile sets FOOD_CLASSIFIER_IMAGE to the target
an image was built from, so the message can name the target that has the extra instead.
"""

from __future__ import annotations

import os

IMAGE_ENV = "FOOD_CLASSIFIER_IMAGE"
FULL_TARGET = "serve-full"  # the Containerfile target with the `cache` and `kafka` extras (compose.yaml builds it)
FULL_EXTRAS = ("cache", "kafka")


def missing_extra(what: str, extra: str) -> str:
    """'<what> needs the '<extra>' extra: <how to get it here>'."""
    image = os.environ.get(IMAGE_ENV)
    if not image:
        return f"{what} needs the '{extra}' extra: pip install 'food-classifier[{extra}]'"
    if extra in FULL_EXTRAS:
        build, tag = f"--target {FULL_TARGET}", "food-classifier:full"
        how = f"build the Containerfile's '{FULL_TARGET}' target instead (compose.yaml does)"
    else:
        build, tag = f"--target serve --build-arg EXTRAS=serve,{extra}", f"food-classifier:{extra}"
        how = f"rebuild it with the extra: EXTRAS=serve,{extra}"
    return (f"{what} needs the '{extra}' extra, which this image (Containerfile target '{image}') does not have: "
            f"{how}, e.g. `docker build -f Containerfile {build} -t {tag} .`")
