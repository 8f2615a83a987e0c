"""The missing-extra message: pip outside a container; inside one of our images (FOOD_CLASSIFIER_IMAGE set by
the Containerfile) the image target to build. Inside the real images: tests/test_container.py."""

from __future__ import annotations

import re
from pathlib import Path

from food_classifier.extras import FULL_EXTRAS, FULL_TARGET, IMAGE_ENV, missing_extra

ROOT = Path(__file__).resolve().parents[1]


def test_outside_an_image_it_says_pip_install(monkeypatch):
    monkeypatch.delenv(IMAGE_ENV, raising=False)
    assert missing_extra("a Redis cache URL", "cache") == (
        "a Redis cache URL needs the 'cache' extra: pip install 'food-classifier[cache]'")


def test_inside_an_image_it_names_the_target_never_pip(monkeypatch):
    monkeypatch.setenv(IMAGE_ENV, "serve")
    for extra in FULL_EXTRAS:
        said = missing_extra("x", extra)
        assert "target 'serve'" in said and f"--target {FULL_TARGET} -t food-classifier:full" in said
        assert "pip" not in said
    grpc = missing_extra("gRPC", "grpc")
    assert "--build-arg EXTRAS=serve,grpc" in grpc and "pip" not in grpc


def test_the_containerfile_agrees():
    """The targets the message names exist, set the variable, and serve-full installs exactly FULL_EXTRAS."""
    text = (ROOT / "Containerfile").read_text()
    for target in ("serve", FULL_TARGET):
        stage = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert f"ENV {IMAGE_ENV}={target}" in stage
    installed = re.search(r"build-venv\.sh deps (\S+)", text.split(" AS build-full\n", 1)[1]).group(1)
    assert installed.split(",") == ["serve", *FULL_EXTRAS]
