"""The stream transport: the worker loop over Kafka (`worker.py`) and Redis Streams (`redis_stream.py`)."""
