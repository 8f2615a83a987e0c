"""`food-classifier worker`: a Typer command whose flags are built from `WorkerSettings` (serving/settings.py), as
`serve`'s are from `ServeSettings`: the stream's fields and the service settings a worker needs are flags; every
other setting (threads, limits, cache timeouts...) comes from the same `FOOD_CLASSIFIER_*` env vars as `serve`.
Importing this module imports only typer: the command is built on first use."""

from __future__ import annotations

from functools import cache
from typing import Any

import typer

from food_classifier.cli.serve import _builtin_bundle, _fail, command_for

WORKER_HELP = ("Classify a stream of images from Kafka (or Redis Streams): one JSON result per message.\n\n"
               "At least once (offsets committed after the results are flushed), dead letters, SIGTERM drains.")
FLAGS = ("bundles", "kafka", "redis_stream", "in_topic", "out_topic", "group", "dlq_topic", "kafka_config",
         "claim_idle_ms", "max_deliveries", "model", "variant", "top_k", "batch_size", "metrics_port", "metrics_host",
         "cache_url", "cache_bytes", "prediction_log", "log_level")


def run(settings: Any) -> None:
    import logging

    from food_classifier.bundle import BundleError
    from food_classifier.cache import CacheError
    from food_classifier.serving.stream.worker import DeliveryFailed, WorkerError, run_worker

    if not settings.bundles:
        settings = settings.model_copy(update={"bundles": [_builtin_bundle()]})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def transport(metrics: Any) -> Any:
        dlq = settings.dlq_topic or None
        if settings.redis_stream:
            from food_classifier.serving.stream.redis_stream import RedisStreamTransport

            return RedisStreamTransport(settings.redis_stream, settings.in_topic, settings.out_topic, settings.group,
                                        dlq, metrics, settings.claim_idle_ms, settings.max_deliveries)
        from food_classifier.serving.stream.kafka import KafkaTransport

        return KafkaTransport(settings.kafka, settings.in_topic, settings.out_topic, settings.group, dlq,
                              settings.kafka_extra(), metrics)

    try:
        run_worker(settings, transport)
    except (WorkerError, BundleError, CacheError) as e:
        _fail(str(e))
    except DeliveryFailed as e:  # nothing was committed: a restart replays the batch
        typer.echo(f"error: {e}; exiting without committing", err=True)
        raise typer.Exit(1) from None


@cache
def _worker() -> Any:
    from food_classifier.serving.settings import WorkerSettings

    fn = command_for(WorkerSettings, run, WORKER_HELP, fields=FLAGS)
    fn.__name__ = fn.__qualname__ = "worker"
    fn.__module__ = __name__
    return fn


def worker_command(name: str = "worker") -> Any:
    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command(name, short_help="Classify images from Kafka or Redis Streams.")(_worker())
    return typer.main.get_command(app)
