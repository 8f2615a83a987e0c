"""compose.yaml against the Containerfile, read as text: no podman, so this runs in the fast tier
(tests/test_compose.py brings compose up for real, tests/test_container.py builds and runs the image)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_compose_file_matches_the_containerfile():
    """compose.yaml builds targets that exist, publishes the port the image exposes, mounts /models."""
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    containerfile = (REPO / "Containerfile").read_text()
    stages = {line.split()[-1] for line in containerfile.splitlines() if line.startswith("FROM ") and " AS " in line}
    services = compose["services"]
    assert {"serve", "redis", "worker"} <= set(services) and services["worker"]["profiles"] == ["worker"]
    for name in ("serve", "worker"):
        assert services[name]["build"]["target"] in stages and services[name]["build"]["dockerfile"] == "Containerfile"
        assert services[name]["volumes"] == ["${FOOD_CLASSIFIER_MODELS_DIR:-./models}:/models:ro"]
        # its own image: the README's serve-only build is tagged food-classifier(:latest) and has no Redis client
        assert services[name]["image"] == "food-classifier:full" and services[name]["build"]["target"] == "serve-full"
    assert "EXPOSE 8383" in containerfile and services["serve"]["ports"] == ["${FOOD_CLASSIFIER_PUBLISH:-8383}:8383"]
    assert services["worker"]["command"][:4] == ["worker", "/models", "--kafka", "kafka:9092"]
    assert services["serve"]["environment"]["FOOD_CLASSIFIER_CACHE_URL"].startswith("redis://redis:")
