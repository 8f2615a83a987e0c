"""Prometheus metrics, kept in a registry per app so several apps (tests) never collide.

Label values are bounded on purpose: `endpoint` is the route template, never the raw path, and
`model` is a loaded model's name or "-", so a client cannot blow up the series count.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from food_classifier.cache import PredictionCache

if TYPE_CHECKING:
    from food_classifier.serving.observer import ServingMonitor
    from food_classifier.serving.shadow import Shadow

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
        self.stages = Counter("food_classifier_cascade_stage", "Images answered, by the cascade stage that "
                              "answered: stage k's escalation rate is the share answered past k.", ["model", "stage"],
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
        self.grpc_requests = Counter("food_classifier_grpc_requests", "gRPC calls.", ["method", "code"], registry=r)
        self.grpc_latency = Histogram("food_classifier_grpc_request_duration_seconds", "gRPC call latency.",
                                      ["method", "code"], buckets=LATENCY_BUCKETS, registry=r)

    def watch_monitor(self, monitor: ServingMonitor) -> None:
        """Export the monitor's drift, abstention and accuracy figures (computed when scraped)."""
        self.registry.register(MonitorCollector(monitor))

    def watch_shadow(self, shadow: Shadow) -> None:
        """Export shadow mode's agreement and per-class disagreement (serving/shadow.py)."""
        self.registry.register(ShadowCollector(shadow))

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

    def watch_cache(self, cache: PredictionCache) -> None:
        """Export the cache's own counters at scrape time (the cache module stays free of Prometheus)."""
        self.registry.register(_CacheCollector(cache))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WorkerMetrics:
    """The stream worker's series, beside the service's (images, cache) in the same registry."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.messages = Counter("food_classifier_worker_messages", "Stream messages answered (ok) or dead-lettered "
                                "(error).", ["outcome"], registry=r)
        self.batch_seconds = Histogram("food_classifier_worker_batch_duration_seconds", "Micro-batch time, from "
                                       "poll to commit.", buckets=LATENCY_BUCKETS, registry=r)
        self.lag = Gauge("food_classifier_worker_lag", "Messages behind the end of the partition, after the last "
                         "commit.", ["topic", "partition"], registry=r)
        self.assigned = Gauge("food_classifier_worker_assigned_partitions", "Partitions owned by this worker.",
                              registry=r)
        self.commit_failures = Counter("food_classifier_worker_commit_failures", "Offset commits that failed "
                                       "(those messages are processed again).", registry=r)

    def observe_batch(self, ok: int, failed: int, seconds: float) -> None:
        self.messages.labels("ok").inc(ok)
        self.messages.labels("error").inc(failed)
        self.batch_seconds.observe(seconds)


class _CacheCollector(Collector):
    def __init__(self, cache: PredictionCache):
        self.cache = cache

    def collect(self) -> Iterator:
        stats, status = self.cache.stats, self.cache.status()
        lookups = CounterMetricFamily("food_classifier_cache_lookups", "Prediction cache lookups per level.",
                                      labels=["model", "level", "result"])
        for (model, level, result), n in sorted(stats.lookups.items()):
            lookups.add_metric([model, level, result], n)
        errors = CounterMetricFamily("food_classifier_cache_errors", "Cache backend errors (requests went on "
                                     "without the cache).", labels=["backend", "op"])
        for (backend, op), n in sorted(stats.errors.items()):
            errors.add_metric([backend, op], n)
        skipped = CounterMetricFamily("food_classifier_cache_skipped", "Backend calls skipped while its circuit "
                                      "breaker was open.", labels=["backend"])
        for backend, n in sorted(stats.skipped.items()):
            skipped.add_metric([backend], n)
        degraded = GaugeMetricFamily("food_classifier_cache_degraded", "1 while a cache backend is failing.")
        degraded.add_metric([], 1.0 if status["state"] == "degraded" else 0.0)
        yield from (lookups, errors, skipped, degraded)
        if "memory" in status:
            size = GaugeMetricFamily("food_classifier_cache_memory_bytes", "Accounted size of the in-process cache.")
            size.add_metric([], status["memory"]["bytes"])
            yield size


# stat key of `monitoring.drift` / `ServingMonitor.snapshot` -> (gauge, help)
MONITOR_GAUGES = {
    "n": ("food_classifier_monitor_window_predictions", "Predictions in the drift window (cache hits excluded)."),
    "class_psi": ("food_classifier_drift_class_psi", "PSI of the window's predicted classes vs the bundle's "
                                                     "reference (> 0.2: shifted)."),
    "class_chi2_pvalue": ("food_classifier_drift_class_chi2_pvalue", "Chi-squared p-value of the window's "
                                                                     "predicted classes vs the reference."),
    "confidence_ks": ("food_classifier_drift_confidence_ks", "KS statistic of the window's top-1 confidence vs "
                                                             "the reference."),
    "entropy_psi": ("food_classifier_drift_entropy_psi", "PSI of the window's prediction entropy vs the "
                                                         "reference."),
    "abstention_rate": ("food_classifier_abstention_rate", "Share of abstained predictions in the window."),
    "reference_abstention_rate": ("food_classifier_reference_abstention_rate", "Abstention rate on the "
                                                                               "reference predictions."),
    "estimated_accuracy": ("food_classifier_estimated_accuracy", "Mean calibrated top-1 probability in the "
                                                                 "window (accuracy expected if calibrated)."),
    "reference_estimated_accuracy": ("food_classifier_reference_estimated_accuracy", "Mean top-1 probability "
                                                                                     "on the reference."),
    "live_accuracy": ("food_classifier_live_accuracy", "Accuracy on the latest predictions that got feedback."),
    "feedback_window": ("food_classifier_feedback_window", "Feedbacks behind food_classifier_live_accuracy."),
}


class MonitorCollector(Collector):
    def __init__(self, monitor: ServingMonitor):
        self.monitor = monitor

    def collect(self) -> Iterator:
        snap = self.monitor.snapshot()
        gauges = {key: GaugeMetricFamily(name, doc, labels=["model"]) for key, (name, doc) in MONITOR_GAUGES.items()}
        hits = CounterMetricFamily("food_classifier_monitor_cache_hits", "Cache hits, kept out of the drift window.",
                                   labels=["model"])
        for m in snap:
            hits.add_metric([m["model"]], m["cache_hits"])
            for key, value in m["stats"].items():
                if key in gauges:
                    gauges[key].add_metric([m["model"]], value)
        feedback = CounterMetricFamily("food_classifier_feedback", "Feedbacks received, by whether the prediction "
                                                                   "was right.", labels=["model", "outcome"])
        for (model, outcome), count in sorted(self.monitor.feedback_counts.items()):
            feedback.add_metric([model, outcome], count)
        yield from (*gauges.values(), hits, feedback)
        plog = self.monitor.log
        if plog is not None:
            for name, value, doc in (("lines", plog.lines, "Lines written to the prediction log."),
                                     ("rotations", plog.rotations, "Prediction log rotations."),
                                     ("images", plog.images, "Images saved beside the prediction log."),
                                     ("errors", self.monitor.log_errors, "Prediction log writes that failed.")):
                yield CounterMetricFamily(f"food_classifier_prediction_log_{name}", doc, value=value)
        keep = self.monitor.keep
        if keep is not None:
            for name, value, doc in (("kept", keep.kept, "Photos kept for labelling."),
                                     ("duplicates", keep.duplicates, "Photos not kept again (same sha256)."),
                                     ("evicted", keep.evicted, "Kept photos removed to stay under --keep-max-mb."),
                                     ("labels", keep.labels, "Feedback labels written to the training folder."),
                                     ("dropped", keep.dropped, "Photos not kept because the writer was behind."),
                                     ("errors", keep.errors, "Kept-photo writes that failed (full or read-only "
                                                             "disk).")):
                yield CounterMetricFamily(f"food_classifier_kept_photos_{name}", doc, value=value)
            yield GaugeMetricFamily("food_classifier_kept_photos_bytes", "Bytes of kept photos on disk.",
                                    value=keep.bytes)


class ShadowCollector(Collector):
    """Shadow mode's counts, read when scraped. Label values are the two models' class names (bounded)."""

    def __init__(self, shadow: Shadow):
        self.shadow = shadow

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.shadow
        labels = [s.name, s.version]
        compared = CounterMetricFamily("food_classifier_shadow_compared", "Live photos the shadow version also "
                                       "answered, by whether its best class agreed.", labels=["model", "shadow_version",
                                                                                             "outcome"])
        compared.add_metric([*labels, "agree"], s.agree)
        compared.add_metric([*labels, "disagree"], s.disagree)
        n = s.agree + s.disagree
        agreement = GaugeMetricFamily("food_classifier_shadow_agreement", "Share of compared photos where the "
                                      "shadow's best class is the served one (NaN before the first).",
                                      labels=["model", "shadow_version"])
        agreement.add_metric(labels, s.agree / n if n else float("nan"))
        by_class = CounterMetricFamily("food_classifier_shadow_disagreements", "Disagreements by the served class "
                                       "and the shadow's class.", labels=["model", "shadow_version", "served",
                                                                          "shadow"])
        for (served, theirs), count in sorted(s.by_class.items()):
            by_class.add_metric([*labels, served, theirs], count)
        yield from (compared, agreement, by_class)
        for name, value, doc in (("dropped", s.dropped, "Photos the shadow skipped because it was behind."),
                                 ("errors", s.errors, "Shadow runs that failed (never seen by clients)."),
                                 ("served", s.served, "Sampled photos not compared: the shadow version is the "
                                                      "served one (promoted and reloaded).")):
            yield _counter(f"food_classifier_shadow_{name}", doc, labels, value)


def _counter(name: str, doc: str, labels: list[str], value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=["model", "shadow_version"])
    c.add_metric(labels, value)
    return c
