"""The composition root of the server process: one service, HTTP over it and, with `--grpc-port`, gRPC beside it
on the same loop. Above the transports (it alone knows them all), below the CLI and Ray Serve's replicas.

    app = build_app(ServeSettings(bundles=[Path("models/food")], grpc_port=50051))
"""

from __future__ import annotations

from fastapi import FastAPI

from food_classifier.serving.http.app import Sibling, create_app
from food_classifier.serving.service import build_service
from food_classifier.serving.settings import ServeSettings


def build_app(settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    siblings: list[Sibling] = []
    if settings.grpc_port is not None:  # a missing grpc extra or a taken port fails here, before serving
        from food_classifier.serving.grpc.server import GrpcTransport

        siblings.append(GrpcTransport(settings))
    app = create_app(settings, build_service(settings), siblings)
    app.state.siblings = siblings
    return app
