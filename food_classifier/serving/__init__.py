"""The prediction service (never imports torch): the core (`service.py`: `PredictionService`, `build_service`), the
model registry, batching, admission, cache wiring, errors, settings, metrics, keys and the OIP codec; the transports
below it never import each other: `http/` (FastAPI), `grpc/`, `stream/` (Kafka, Redis Streams), `ray_serve.py`.
`compose.py` puts HTTP and gRPC together for `food-classifier serve` (cli/serve.py).
"""
