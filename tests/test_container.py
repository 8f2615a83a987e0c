"""The `serve` image of the Containerfile, built and run with podman (there is no Docker engine here).

Follows the recipe in ../shared/FACTS.md (tests/podman_images.py): podman configured by
tests/container/containers.conf (runc, cgroupfs, ulimits, and the machine's CA bundle + pip.conf mounted
into builds), and a stand-in for `python:3.11-slim` built from Debian packages (mmdebstrap -> podman
import), so the real Containerfile builds unchanged without a registry. The stand-in's rootfs tarball is cached in
$FOOD_CLASSIFIER_CACHE/container and the image stays in podman's store, so only the first run pays
for it (1-4 min); the test's serve image is kept too (`podman build` reuses its layers: seconds on the
next run) and its container is always removed.
"""

from __future__ import annotations

import http.client
import io
import json
import select
import socket
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import colour_image, image_bytes, make_colour_bundle
from PIL import Image
from podman_images import BASE, STAND_IN_LABEL, build, configure, image_mb, podman

from food_classifier.inference import Classifier

pytestmark = pytest.mark.container
IMAGE = "localhost/food-classifier-test:serve"
REAL_SLIM_MB = 130  # python:3.11-slim (bookworm, amd64) as `docker images` reports it; not pullable here
TARGET_MB = 350


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory) -> dict[str, str]:
    return configure(tmp_path_factory)


@pytest.fixture(scope="module")
def serve_image(podman_env) -> str:
    return build(podman_env, "serve", IMAGE)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("container_models")
    make_colour_bundle(root / "colour" / "20260101T000000-colour")
    for p in [root, *root.rglob("*")]:  # the server runs as UID 10001: it must be able to read them
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def fetch(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def multipart(field: str, files: list[bytes], ctype: str = "image/jpeg") -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{i}.img\"\r\n"
                    f"Content-Type: {ctype}\r\n\r\n".encode() + payload + b"\r\n" for i, payload in enumerate(files))
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def container(podman_env, serve_image, models):
    from food_classifier.testing import free_port

    port = free_port()
    name = f"fc-test-{uuid.uuid4().hex[:8]}"
    podman(podman_env, "run", "-d", "--read-only", "--name", name, "-p", f"127.0.0.1:{port}:8383",
           "-v", f"{models}:/models:ro",
           "--health-interval", "disable",  # no systemd timers here; the check is run by hand below
           "-e", "FOOD_CLASSIFIER_TOP_K=3", serve_image)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if fetch(url + "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            state = podman(podman_env, "inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                logs = podman(podman_env, "logs", name, check=False)
                raise AssertionError(f"container {state}, not ready:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}")
            time.sleep(0.2)
        yield name, url
    finally:
        podman(podman_env, "rm", "-f", "-t", "0", name, check=False)


def test_ready_and_prediction_equals_local_classifier(container, models):
    _, url = container
    status, body = fetch(url + "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    photo = image_bytes(colour_image("blue", size=(90, 70), noise=30, seed=7))
    status, body = fetch(url + "/predict", *multipart("file", [photo]))
    assert status == 200, body
    got = json.loads(body)
    local = Classifier(models / "colour").predict(photo, top_k=3)
    assert got["label"] == local.label == "blue"
    assert got["confidence"] == pytest.approx(local.confidence, abs=1e-5)
    assert [t["label"] for t in got["top_k"]] == [t.label for t in local.top_k]  # FOOD_CLASSIFIER_TOP_K=3
    status, body = fetch(url + "/predict", b"not an image", {"Content-Type": "application/octet-stream"})
    assert 400 <= status < 500, (status, body)  # user errors stay 4xx inside the image too


def test_runs_as_non_root_without_torch_and_healthcheck_passes(container, podman_env, serve_image):
    name, _ = container
    assert podman(podman_env, "exec", name, "id", "-u").stdout.strip() == "10001"
    pid1 = podman(podman_env, "exec", name, "cat", "/proc/1/status").stdout
    assert next(line for line in pid1.splitlines() if line.startswith("Uid:")).split()[1:] == ["10001"] * 4
    config = json.loads(podman(podman_env, "image", "inspect", serve_image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001" and "8383/tcp" in config["ExposedPorts"]
    assert podman(podman_env, "healthcheck", "run", name).returncode == 0  # the image's own /readyz probe
    probe = "import importlib.util as u; print([m for m in ('torch', 'timm', 'sklearn', 'pip') if u.find_spec(m)])"
    assert podman(podman_env, "exec", name, "python", "-c", probe).stdout.strip() == "[]"


def test_a_bundle_whose_model_changed_is_refused_at_start(serve_image, podman_env, tmp_path):
    from helpers import update_meta

    from food_classifier.bundle import file_sha256

    bundle = make_colour_bundle(tmp_path / "models" / "colour" / "20260101T000000-colour")
    update_meta(bundle, {"variants": {"fp32": {"file": "model.onnx", "sha256": file_sha256(bundle / "model.onnx")}}})
    with open(bundle / "model.onnx", "ab") as f:
        f.write(b"\0")  # one byte more: the recorded sha256 no longer matches
    for p in [tmp_path / "models", *(tmp_path / "models").rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    tmp_path.chmod(0o755)
    out = podman(podman_env, "run", "--rm", "--read-only", "-v", f"{tmp_path / 'models'}:/models:ro", serve_image,
                 timeout=120, check=False)
    assert out.returncode not in (0, 137), out  # a clear refusal, not a crash loop or a kill
    assert "sha256 does not match" in out.stdout + out.stderr and "Traceback" not in out.stdout + out.stderr


def test_image_size(serve_image, podman_env):
    total, base = image_mb(podman_env, serve_image), image_mb(podman_env, BASE)
    stand_in = podman(podman_env, "image", "inspect", "--format", f"{{{{index .Labels \"{STAND_IN_LABEL}\"}}}}",
                      BASE).stdout.strip()
    ours = total - base
    print(f"\nserve image: {total:.0f} MB = base {base:.0f} MB{' (Debian stand-in)' if stand_in else ''} "
          f"+ {ours:.0f} MB of ours; on the real python:3.11-slim (~{REAL_SLIM_MB} MB): ~{REAL_SLIM_MB + ours:.0f} MB "
          f"(target <= {TARGET_MB} MB)")
    assert REAL_SLIM_MB + ours <= TARGET_MB


def test_sigterm_drains_the_request_in_flight(container, podman_env):
    """`podman stop` (SIGTERM) while a slow batch is being decoded: the server stops accepting new
    connections, still answers the batch it holds, then exits 0."""
    name, url = container
    pngs = []
    for seed in range(12):  # 12 Mpx PNGs (0.7 MB each), all different: slow to decode, cheap to send
        noise = np.random.default_rng(seed).integers(0, 256, (300, 400, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noise.repeat(10, 0).repeat(10, 1)).save(buf, "PNG", compress_level=1)
        pngs.append(buf.getvalue())
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=60)
    body, headers = multipart("files", pngs, "image/png")
    conn.request("POST", "/predict-batch", body, headers)  # returns once the whole body is sent
    stop_sent = time.monotonic()
    stopper = threading.Thread(target=podman, args=(podman_env, "stop", "-t", "30", name))  # SIGKILL after 30 s
    stopper.start()
    while time.monotonic() - stop_sent < 20:  # wait until the server refuses new connections
        try:
            with socket.create_connection(("127.0.0.1", conn.port), timeout=1) as probe:
                probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if not probe.recv(1):
                    break
        except OSError:
            break
        time.sleep(0.05)
    unanswered = not select.select([conn.sock], [], [], 0)[0]  # no byte of our answer yet
    response = conn.getresponse()
    batch = json.loads(response.read())
    stopper.join(60)
    code = podman(podman_env, "inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    logs = podman(podman_env, "logs", name)
    assert response.status == 200 and batch["count"] == len(pngs) and batch["failed"] == 0, batch
    assert unanswered, "the batch was answered before shutdown began: nothing was in flight (make it heavier)"
    assert code == "0", code  # exited by itself, not killed (137)
    assert "Finished server process" in logs.stdout + logs.stderr


def test_a_missing_extra_names_the_image_target_that_has_it(serve_image, podman_env, models):
    """The serve image has neither the Redis nor the Kafka client. Asking for them used to say
    "pip install 'food-classifier[cache]'" inside an image without pip; now it names the target to build."""
    runs = {
        "cache": ["-e", "FOOD_CLASSIFIER_CACHE_URL=redis://redis:6379/0", serve_image],
        "kafka": [serve_image, "worker", "/models", "--kafka", "kafka:9092", "--in-topic", "in", "--out-topic", "out"],
    }
    for extra, args in runs.items():
        out = podman(podman_env, "run", "--rm", "--read-only", "-v", f"{models}:/models:ro", *args, timeout=120,
                     check=False)
        said = out.stdout + out.stderr
        assert out.returncode not in (0, 137), said
        assert f"needs the '{extra}' extra, which this image (Containerfile target 'serve') does not have" in said
        assert "--target serve-full" in said and "pip install" not in said and "Traceback" not in said, said


def test_a_models_folder_closed_to_the_image_user_is_named_with_the_uid(serve_image, podman_env, tmp_path):
    """Before: "Permission denied: '/models/bundle.json'", a file that does not exist."""
    tmp_path.chmod(0o755)
    models = tmp_path / "models"
    make_colour_bundle(models / "colour" / "20260101T000000-colour")
    models.chmod(0o700)  # root's: UID 10001 in the container cannot enter it
    out = podman(podman_env, "run", "--rm", "--read-only", "-v", f"{models}:/models:ro", serve_image, timeout=120,
                 check=False)
    said = out.stdout + out.stderr
    assert out.returncode not in (0, 137), said
    assert "cannot read /models as UID 10001 (GID 10001): permission denied" in said, said
    assert "bundle.json" not in said and "Traceback" not in said, said
