"""Starting or joining Ray, for the two Ray engines (predict-dir's and Ray Serve). Ray is the 'ray' extra.

A local Ray must be told to stay on this machine: without `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` its
GCS, raylet and workers listen on every interface; `RAY_USAGE_STATS_ENABLED=0` keeps it from phoning
home. Ray reads the first when it is imported, so `connect` sets both before the first `import ray`,
and nothing in food_classifier imports Ray at module level.
"""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType

from food_classifier.defaults import MiB, usable_cpus

LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
LOCAL_ADDRESSES = (None, "", "local")
MISSING = "the Ray engine needs the 'ray' extra: pip install 'food-classifier[ray]'"

log = logging.getLogger("food_classifier.ray")


class MissingExtra(ImportError):
    """Ray (or Ray Data / Serve) is not installed: the message names the extra."""


def require() -> ModuleType:
    """The `ray` module with Data and Serve, or `MissingExtra`."""
    try:
        import ray
        import ray.data  # noqa: F401  (pandas, pyarrow)
        import ray.serve  # noqa: F401
    except ImportError as e:
        raise MissingExtra(f"{MISSING} ({e})") from None
    return ray


def local_env() -> None:
    """Loopback only, no usage stats: for a Ray started here (its processes inherit the variables)."""
    constants = sys.modules.get("ray._private.ray_constants")  # read once, when ray is imported
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        log.warning("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: a local Ray may listen "
                    "on all interfaces. Set the variable before importing ray.")
    os.environ.update(LOCAL_ENV)


def connect(address: str | None, num_cpus: int | None = None, object_store_mb: int = 512) -> bool:
    """Join the Ray at `address` (`auto`: the one `ray start` runs on this machine; `ray://host:10001`), or
    start a local one on loopback when `address` is None or "local". True when this call started or joined
    Ray (the caller then shuts it down); False when this process was already connected (tests, notebooks)."""
    if address in LOCAL_ADDRESSES:
        local_env()
    ray = require()
    if ray.is_initialized():
        return False
    if address in LOCAL_ADDRESSES:
        ray.init(address="local",  # a new one: never join a Ray that `ray start` left here (or its stale file)
                 num_cpus=num_cpus or usable_cpus(), include_dashboard=False,
                 object_store_memory=object_store_mb * MiB, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return True




def loopback_replica_grpc() -> None:
    """Called in a Serve replica on a local Ray, before the replica opens its internal gRPC port: Ray Serve
    2.60 binds it to `[::]:0` (hard-coded in ray/serve/_private/replica.py: every interface, even when
    the node is 127.0.0.1); on a one-machine Ray, bind it to the loopback address like the rest."""
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if getattr(original, "loopback", False):
        return
    if original is None:
        log.warning("cannot keep the Ray Serve replica's gRPC port on loopback (Ray changed)")
        return

    def add_port(server: object, address: str) -> int:
        return original(server, address.replace("[::]:", "127.0.0.1:"))

    add_port.loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
