"""Ray Serve's deployment options from ServeSettings: plain dicts, no Ray needed, so this runs in the fast tier
(tests/test_ray.py starts a Ray cluster)."""

from __future__ import annotations

import pytest

from food_classifier.serving.ray_serve import deployment_options
from food_classifier.serving.settings import ServeSettings


def test_deployment_options_expose_ray_autoscaling():
    fixed = deployment_options(ServeSettings(replicas="3", max_ongoing_requests=6, replica_cpus=0.5))
    assert (fixed["num_replicas"], fixed["max_ongoing_requests"], fixed["ray_actor_options"]) == (
        3, 6, {"num_cpus": 0.5})
    assert fixed["logging_config"] == {"enable_access_log": False, "log_level": "INFO"}  # as uvicorn: no access log
    auto = deployment_options(ServeSettings(replicas="auto", min_replicas=0, max_replicas=4,
                                            target_ongoing_requests=3))
    assert "num_replicas" not in auto and auto["autoscaling_config"] == {
        "min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 3.0}
    with pytest.raises(ValueError, match="replicas"):
        ServeSettings(replicas="many")
