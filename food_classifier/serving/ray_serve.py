"""`serve --engine ray`: the same FastAPI app and `PredictionService`, in Ray Serve replicas.

Each replica builds the app with `create_app(settings)` (FastAPI ingress, `serve.ingress`), so the
endpoints, responses, errors, metrics and the micro-batcher are the plain server's; Ray adds the
HTTP proxy, the replicas and their autoscaling. A replica joins the load balancer only when its models
are loaded and warmed (`reconfigure` waits for it), so a scale-up never answers 503 "loading", and a
replica whose models failed is reported unhealthy. Nothing here imports Ray at module level
(ray_env.py says why): `run` starts or joins Ray first.

    run(ServeSettings(bundles=[Path("models/food")], engine="ray", replicas="auto"))
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any

from food_classifier import ray_env
from food_classifier.serving.http.app import EXIT_NO_MODEL, create_app
from food_classifier.serving.settings import ServeSettings

APP_NAME = "food-classifier"
log = logging.getLogger("food_classifier.serving")


class FoodClassifierIngress:
    """The deployment class: Ray wraps it with `serve.ingress()` and calls the hooks below on each replica."""

    def __init__(self, settings: ServeSettings):
        if settings.ray_address in ray_env.LOCAL_ADDRESSES:  # before Ray opens the replica's internal port
            ray_env.loopback_replica_grpc()
        self.settings = settings
        self.fc_app: Any = None  # (`app` is taken: Ray's wrapper has an `app` property)

    def __serve_build_asgi_app__(self) -> Any:  # noqa: N807  (Ray's hook name)
        self.fc_app = create_app(self.settings)
        return self.fc_app

    async def reconfigure(self, _config: dict) -> None:
        """Runs after the app's lifespan started loading the models: returns when they are ready, so Ray
        routes nothing to this replica before /readyz would be green."""
        registry = self.fc_app.state.registry
        while not registry.ready:
            if registry.state == "failed":
                raise RuntimeError(f"models failed to load: {registry.error}")
            await asyncio.sleep(0.05)

    def check_health(self) -> None:
        registry = self.fc_app.state.registry if self.fc_app is not None else None
        if registry is not None and registry.state == "failed":
            raise RuntimeError(f"models failed to load: {registry.error}")


def deployment_options(s: ServeSettings) -> dict[str, Any]:
    """Ray Serve deployment options from the settings: fixed replicas, or autoscaling for `--replicas auto`."""
    opts: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": s.replica_cpus},
        "user_config": {},  # any config makes Ray call `reconfigure`, which waits for the models
        "graceful_shutdown_timeout_s": 10,
        # like uvicorn's: one line per request only with --access-log (it costs CPU per request)
        "logging_config": {"enable_access_log": s.access_log, "log_level": s.log_level.upper()},
    }
    if s.replicas == "auto":
        opts["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": max(s.max_replicas, 1),
                                      "target_ongoing_requests": s.target_ongoing_requests}
    else:
        opts["num_replicas"] = int(s.replicas)
    return opts


def application(settings: ServeSettings, cls: type = FoodClassifierIngress) -> Any:
    """The bound Ray Serve application (Ray must be imported: call `ray_env.connect` first)."""
    from ray import serve

    return serve.deployment(serve.ingress()(cls), name="FoodClassifier",
                            **deployment_options(settings)).bind(settings)


def run(settings: ServeSettings) -> int:
    """Start or join Ray, deploy, serve until SIGTERM/SIGINT, then drain and remove the deployment.
    Returns the exit status (EXIT_NO_MODEL when the replicas cannot load the models)."""
    local = settings.ray_address in ray_env.LOCAL_ADDRESSES
    started = ray_env.connect(settings.ray_address)
    import ray
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(application(settings), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # the replicas failed to start: the model could not be loaded
            log.critical("cannot serve: %s", str(e).strip().splitlines()[0])
            return EXIT_NO_MODEL
        log.warning("Ray Serve: %s on http://%s:%d (%s replicas)", APP_NAME, settings.host, settings.port,
                    settings.replicas)
        stop.wait()
        log.warning("stopping: draining requests in flight")
        return 0
    finally:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        if started:
            ray.shutdown()
