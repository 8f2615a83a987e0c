"""Prometheus metrics, kept in a registry per app so several apps (tests) never collide.

Label values are bounded on purpose: `endpoint` is the route template, never the raw path, and
`model` is a loaded model's name or "-", so a client cannot blow up the series count.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("food_classifier_requests", "HTTP requests.", ["model", "endpoint", "status"],
                                registry=r)
        self.latency = Histogram("food_classifier_request_duration_seconds", "HTTP request latency.",
                                 ["model", "endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("food_classifier_images", "Images classified or rejected.", ["model", "outcome"],
                              registry=r)
        self.batch_size = Histogram("food_classifier_batch_size", "Images per model call (micro-batches).",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("food_classifier_inference_duration_seconds", "Model call latency per batch.",
                                   ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_info = Gauge("food_classifier_model_info", "Loaded models (value 1).",
                                ["model", "version", "variant", "default"], registry=r)
        self.reloads = Counter("food_classifier_model_reloads", "Model reloads.", ["model", "outcome"], registry=r)
        self.skipped_versions = Counter("food_classifier_model_versions_skipped",
                                        "Broken bundle versions skipped while (re)loading.", ["source"], registry=r)
        self.in_flight = Gauge("food_classifier_requests_in_flight", "Requests being served.", registry=r)

    def observe_request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        s = str(status)
        self.requests.labels(model, endpoint, s).inc()
        self.latency.labels(model, endpoint, s).observe(seconds)

    def batch_observer(self, model: str):
        """A callback for `MicroBatcher(on_batch=...)`, bound to one model's series."""
        size, inference = self.batch_size.labels(model), self.inference.labels(model)

        def observe(n: int, seconds: float) -> None:
            size.observe(n)
            inference.observe(seconds)
        return observe

    def set_model(self, model: str, version: str, variant: str, default: bool,
                  previous_version: str | None = None, previous_variant: str | None = None) -> None:
        if previous_version is not None:
            try:
                self.model_info.remove(model, previous_version, previous_variant or variant, str(default).lower())
            except KeyError:
                pass
        self.model_info.labels(model, version, variant, str(default).lower()).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
