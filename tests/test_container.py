"""The `serve` image of the Containerfile, built and run with podman (there is no Docker engine here).

Follows the recipe in ../shared/FACTS.md: podman configured by tests/container/containers.conf
(runc, cgroupfs, ulimits, and the machine's CA bundle + pip.conf mounted into builds), and a
stand-in for `python:3.11-slim` built from Debian packages (mmdebstrap -> podman import), so the
real Containerfile builds unchanged without a registry. The stand-in's rootfs tarball is cached in
$FOOD_CLASSIFIER_CACHE/container and the image stays in podman's store, so only the first run pays
for it (1-4 min); the test's serve image is kept too (`podman build` reuses its layers: seconds on the
next run) and its container is always removed.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import colour_image, image_bytes, make_colour_bundle
from PIL import Image

from food_classifier.inference import Classifier

pytestmark = pytest.mark.container
REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "container"
BASE = "docker.io/library/python:3.11-slim"
STAND_IN_LABEL = "org.food_classifier.stand_in"
IMAGE = "localhost/food-classifier-test:serve"
REAL_SLIM_MB = 130  # python:3.11-slim (bookworm, amd64) as `docker images` reports it; not pullable here
TARGET_MB = 350


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory) -> dict[str, str]:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (.ci/run installs it: apt-get install podman buildah runc mmdebstrap)")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text((HERE / "containers.conf").read_text().replace("@CONTAINER_DIR@", str(HERE)))
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(env: dict, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def image_mb(env: dict, image: str) -> float:
    return int(podman(env, "image", "inspect", "--format", "{{.Size}}", image).stdout.strip()) / 1e6


def ensure_base(env: dict) -> None:
    """A stand-in python:3.11-slim: Debian bookworm minbase + python3 + a venv first on PATH
    (so `python` and `pip` behave as in the official image)."""
    if podman(env, "image", "exists", BASE, check=False).returncode == 0:
        return
    cache = Path(os.environ.get("FOOD_CLASSIFIER_CACHE", Path.home() / ".cache" / "food_classifier")) / "container"
    tar = cache / "debian-bookworm-python3.tar"
    if not tar.is_file():
        if shutil.which("mmdebstrap") is None:
            pytest.skip("no python:3.11-slim image and no mmdebstrap to build a stand-in")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = tar.with_suffix(".tmp.tar")
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv", "--quiet",
             *[f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale")],
             "--customize-hook=chroot \"$1\" python3 -m venv /opt/python",
             "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*",
             "bookworm", str(tmp)], check=True, timeout=900, capture_output=True)
        tmp.rename(tar)
    podman(env, "import", "--change", "ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
           ":/sbin:/bin", "--change", 'CMD ["python3"]', "--change", f"LABEL {STAND_IN_LABEL}=debian-bookworm",
           str(tar), BASE, timeout=300)


@pytest.fixture(scope="module")
def serve_image(podman_env) -> str:
    ensure_base(podman_env)
    t = time.monotonic()
    build = podman(podman_env, "build", "--format", "docker", "--target", "serve", "-t", IMAGE, "-f",
                   str(REPO / "Containerfile"), str(REPO), timeout=1200)
    print(f"\nbuild: {time.monotonic() - t:.1f} s")
    remove_stale_layers(podman_env, build.stdout)
    return IMAGE


def remove_stale_layers(env: dict, build_log: str) -> None:
    """Untagged images on the stand-in base that this build did not use: earlier builds' layers."""
    used = {line.split()[-1][:11] for line in build_log.splitlines() if line.startswith("--> ")}  # 11 or 64 hex
    listed = podman(env, "images", "-a", "--filter", f"label={STAND_IN_LABEL}", "--format",
                    "{{.ID}} {{.Repository}}").stdout.split("\n")
    stale = [line.split()[0] for line in listed if line.endswith(" <none>") and line[:11] not in used]
    assert len(used) > 5, "no layer ids in the build output: refusing to guess what is stale"
    for image in stale:  # newest first, so children go before their parents
        podman(env, "rmi", image, check=False)


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
