"""`food-classifier worker`: the Typer command of the stream worker. Imports only typer at module level.

Flags cover the stream; model and serving settings not given here (variant, threads, limits, cache
timeouts) come from the same `FOOD_CLASSIFIER_*` environment variables as `serve`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def worker(
    bundles: Annotated[list[Path] | None, typer.Argument(
        help="Bundle dir, model dir or dir of model dirs (default: the built-in model).", show_default=False)] = None,
    kafka: Annotated[str | None, typer.Option("--kafka", metavar="BOOTSTRAP",
                                              help="Kafka bootstrap servers, host:port[,host:port...].")] = None,
    redis_stream: Annotated[str | None, typer.Option(
        "--redis-stream", metavar="URL", help="Use Redis Streams instead of Kafka (redis://host:6379/0): topics "
                                              "are stream names, the group a consumer group.")] = None,
    in_topic: Annotated[str, typer.Option("--in-topic", help="Images to classify.")] = "food.images",
    out_topic: Annotated[str, typer.Option("--out-topic", help="One JSON result per input.")] = "food.predictions",
    group: Annotated[str, typer.Option("--group", help="Consumer group: workers in one group share the "
                                                       "partitions.")] = "food-classifier",
    dlq_topic: Annotated[str, typer.Option("--dlq-topic", help="Inputs that failed, with their error in the "
                                                               "headers; '' to not write them.")] = "food.images.dlq",
    kafka_config: Annotated[list[str] | None, typer.Option(
        "--kafka-config", metavar="KEY=VALUE",
        help="librdkafka setting for the consumer and producer (e.g. security.protocol=SASL_SSL); repeatable.",
        show_default=False)] = None,
    claim_idle_ms: Annotated[int, typer.Option("--claim-idle-ms", min=1, help="Redis Streams: take over entries "
                                               "another consumer left unacknowledged this long.")] = 60_000,
    max_deliveries: Annotated[int, typer.Option("--max-deliveries", min=1, help="Redis Streams: dead-letter an "
                                                "entry delivered more often than this.")] = 5,
    model: Annotated[str | None, typer.Option("--model", help="Model name (default: the first).")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="top_k entries per result.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Messages per micro-batch.")] = 32,
    metrics_port: Annotated[int, typer.Option("--metrics-port", min=0, max=65535,
                                              help="Serve Prometheus /metrics on this port (0 = off).")] = 0,
    metrics_host: Annotated[str, typer.Option("--metrics-host", help="Interface for the metrics port.")] = "0.0.0.0",
    cache_url: Annotated[str | None, typer.Option(
        "--cache-url", help="Redis URL of the shared prediction cache. [env FOOD_CLASSIFIER_CACHE_URL]",
        show_default=False)] = None,
    cache_bytes: Annotated[int | None, typer.Option(
        "--cache-bytes", help="In-process cache in bytes (default 64 MiB, 0 = off). [env FOOD_CLASSIFIER_CACHE_BYTES]",
        show_default=False)] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Classify a stream of images from Kafka (or Redis Streams): one JSON result per message.

    At least once (offsets committed after the results are flushed), dead letters, SIGTERM drains.
    """
    import logging

    from pydantic import ValidationError

    from food_classifier.bundle import BundleError
    from food_classifier.cache import CacheError
    from food_classifier.serving.settings import ServeSettings
    from food_classifier.serving.stream.worker import DeliveryFailed, KafkaTransport, WorkerError, run_worker

    if bool(kafka) == bool(redis_stream):
        _fail("give one of --kafka BOOTSTRAP (e.g. --kafka localhost:9092) or --redis-stream URL")
    extra = {}
    for item in kafka_config or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--kafka-config wants KEY=VALUE, got {item!r}")
        extra[key.strip()] = value.strip()
    given = {k: v for k, v in {"bundles": bundles, "cache_url": cache_url, "cache_bytes": cache_bytes}.items()
             if v not in (None, [])}
    try:
        settings = ServeSettings(**given)
    except ValidationError as e:
        first = e.errors()[0]
        _fail(f"invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}")
    if not settings.bundles:
        from food_classifier.cli.serve import _builtin_bundle

        settings = settings.model_copy(update={"bundles": [_builtin_bundle()]})
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def transport(metrics):
        if redis_stream:
            from food_classifier.serving.stream.redis_stream import RedisStreamTransport

            return RedisStreamTransport(redis_stream, in_topic, out_topic, group, dlq_topic or None, metrics,
                                        claim_idle_ms, max_deliveries)
        return KafkaTransport(kafka, in_topic, out_topic, group, dlq_topic or None, extra, metrics)

    try:
        run_worker(settings, transport, model=model, top_k=top_k, batch_size=batch_size,
                   metrics_port=metrics_port, metrics_host=metrics_host)
    except (WorkerError, BundleError, CacheError) as e:
        _fail(str(e))
    except DeliveryFailed as e:  # nothing was committed: a restart replays the batch
        typer.echo(f"error: {e}; exiting without committing", err=True)
        raise typer.Exit(1) from None


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
