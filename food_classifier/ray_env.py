"""Starting or joining Ray, for the two Ray engines (predict-dir's and Ray Serve). Ray is the 'ray' extra.

A local Ray must be told to stay on this machine: without `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` its
GCS, raylet and workers listen on every interface; `RAY_USAGE_STATS_ENABLED=0` keeps it from phoning
home. Ray reads the first when it is imported, so `connect` sets both before the first `import ray`,
and nothing in food_classifier imports Ray at module level.

Joining a Ray (`--ray-address`) is checked first, bounded: `ray.init` retries a GCS it cannot reach
forever (it even ignores SIGTERM), and a client without that variable rewrites a loopback address to
this machine's network address, where a Ray started with it does not listen.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import time
from types import ModuleType

from food_classifier.defaults import MiB, usable_cpus

LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
LOCAL_ADDRESSES = (None, "", "local")
MISSING = "the Ray engine needs the 'ray' extra: pip install 'food-classifier[ray]'"

JOIN_TIMEOUT_S = 15.0
log = logging.getLogger("food_classifier.ray")


class RayError(Exception):
    """Ray cannot be used here: the message says why and what to do."""


class MissingExtra(RayError, ImportError):
    """Ray (or Ray Data / Serve) is not installed: the message names the extra."""


class Unreachable(RayError):
    """No Ray answers at the address to join (checked before `ray.init`, which would wait forever)."""


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
        check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
            raise Unreachable(_join_failure(address, e)) from None
    return True


def _join_failure(address: str, e: Exception) -> str:
    """One line for a failed `ray.init(address)` (Ray's own text may carry a whole traceback)."""
    chain: list[BaseException] = []
    cause: BaseException | None = e
    while cause is not None and len(chain) < 10:  # Ray wraps the RPC error it got (an AuthenticationError)
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = "\n".join(f"{type(c).__name__}: {c}" for c in chain)
    if "InvalidAuthToken" in text or "AuthenticationError" in text:
        return (f"the Ray at {address!r} uses token authentication and this client sent no valid token: "
                "export RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN "
                "(`ray get-auth-token` prints it on the head node). An explicit address (not `auto`) or "
                "RAY_ADDRESS never picks the token up by itself")
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return f"cannot join Ray at {address!r}: {first[:300]}"


def check_reachable(address: str, timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """`Unreachable` unless the GCS that `ray.init(address)` will dial accepts a TCP connection within
    `timeout_s`. The message names the fix when the cause is the loopback rewrite (module docstring).
    Ray Client addresses (`ray://`) are left to Ray, which times out by itself."""
    if address.startswith("ray://"):
        return
    from ray._private import ray_constants, services

    try:  # Ray's own resolution ("auto": RAY_ADDRESS or the address `ray start` recorded), so both agree
        given = services.get_ray_address_from_environment(address, None)
        target = services.canonicalize_bootstrap_address(given)
    except (ConnectionError, ValueError) as e:  # "auto" with no Ray started here, a malformed address
        raise Unreachable(f"cannot join Ray at {address!r}: {e}") from None
    except AttributeError:  # a Ray whose internals moved: join unchecked
        log.warning("cannot check the Ray address before joining (Ray changed): ray.init may wait forever")
        return
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, deadline - time.monotonic())):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                problem = f"no Ray answers at {target} (from {address!r}) after {timeout_s:.0f} s: {e}"
                break
        time.sleep(0.2)
    if _is_loopback(given.rpartition(":")[0].strip("[]")) and not _is_loopback(host) and getattr(
            ray_constants, "ENABLE_RAY_CLUSTER", True):
        problem += (f". Ray turned the loopback address {given} into this machine's address because "
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is not set here; a Ray started on one machine with it "
                    "(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head`) needs it for this command too: "
                    "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0")
    else:
        problem += " (is that Ray running, and its GCS port reachable from here?)"
    raise Unreachable(problem)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
