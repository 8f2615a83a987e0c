"""The gRPC transport (`server.py`), imported only when `serve --grpc-port` asks for it."""
