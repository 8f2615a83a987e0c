"""The Ray engines on a real local Ray: predict-dir over Ray Data, and Ray Serve over the same app.

One Ray session for the module (the CLI test before it starts and stops its own). Everything listens
on 127.0.0.1 only: the variables below are set before Ray is imported (ray_env.py says why).
"""

from __future__ import annotations

import io
import ipaddress
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from conftest import colour_image, image_bytes
from doc_blocks import doc_block
from helpers import make_photos, read_rows

from food_classifier.ray_env import LOCAL_ENV

os.environ.update(LOCAL_ENV)
ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install 'food-classifier[ray]')")

from food_classifier.batch.job import predict_dir, read_source  # noqa: E402
from food_classifier.batch.ray_engine import RayEngine  # noqa: E402
from food_classifier.serving.ray_serve import APP_NAME, application  # noqa: E402
from food_classifier.serving.settings import ServeSettings  # noqa: E402
from food_classifier.testing import free_port, process_tree  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # inside Ray (pydantic, Ray Data)




def _listening(pids: set[int]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Addresses of the TCP sockets these processes listen on (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                raw = cols[1].split(":")[0]
                words = [bytes.fromhex(raw[i:i + 8])[::-1] for i in range(0, len(raw), 8)]  # host-order words
                found.append(ipaddress.ip_address(b"".join(words)))
    return found


def _loopback(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


@pytest.mark.live
def test_serve_engine_ray_from_the_cli_listens_on_loopback_only_and_drains_on_sigterm(colour_bundle):
    port = free_port()
    cmd = [sys.executable, "-m", "food_classifier.cli", "serve", str(colour_bundle), "--engine", "ray", "--host",
           "127.0.0.1", "--port", str(port), "--ort-threads", "1", "--max-ongoing-requests", "4"]
    env = {k: v for k, v in os.environ.items() if k not in LOCAL_ENV}  # the CLI must set them itself
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, ready = time.monotonic() + 180, False
        while time.monotonic() < deadline and not ready and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert ready, f"not ready (exit status {proc.poll()})"
        r = httpx.post(f"http://127.0.0.1:{port}/predict", content=image_bytes(colour_image("blue")), timeout=30)
        assert r.status_code == 200 and r.json()["label"] == "blue"
        tree = process_tree(proc.pid)
        addresses = _listening(tree)
        assert len(tree) > 5 and len(addresses) > 5  # GCS, raylet, workers, Serve proxy and replica
        assert all(_loopback(a) for a in addresses), addresses
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        time.sleep(1)
        assert not [p for p in tree if Path(f"/proc/{p}").exists()
                    and "zombie" not in Path(f"/proc/{p}/status").read_text()], "Ray processes left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _stop_ray_started_in(temp_dir: str) -> None:
    """`ray start` daemonizes: end the processes of this Ray (their command lines name its temp dir), never
    `ray stop`, which stops every Ray of the machine."""
    def ours() -> list[int]:
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                if temp_dir.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
        return found

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)


def test_one_machine_cluster_recipe_joins_and_a_client_without_the_variable_fails_fast(tmp_path, colour_bundle):
    """docs/SCALING.md's one-machine block, as written: its variables for `ray start` and the client join
    (`--ray-address auto`, with Ray 2.60's default token authentication). A client without
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (before: retried a non-loopback GCS address forever, deaf to
    SIGTERM) exits 1 within the join timeout naming the variable; one joining by explicit address without
    the token gets one line naming RAY_AUTH_MODE=token (before: a traceback)."""
    lines = doc_block(ROOT / "docs" / "SCALING.md", "ray-one-machine").splitlines()
    export = shlex.split(lines[0], comments=True)
    assert export[0] == "export" and dict(kv.split("=", 1) for kv in export[1:]) == LOCAL_ENV, lines[0]
    start = shlex.split(next(line for line in lines if line.startswith("ray start")), comments=True)
    predict = shlex.split(next(line for line in lines if line.startswith("food-classifier predict-dir")),
                          comments=True)
    assert start[:4] == ["ray", "start", "--head", "--port"] and predict[-2:] == ["--ray-address", "auto"]
    port, temp = free_port(), tempfile.mkdtemp(prefix="fcray", dir="/tmp")  # Ray's socket paths must stay short
    # This Ray's own temp dir (where `auto` finds it, not another test's Ray) and home (its auth token)
    plain = {**{k: v for k, v in os.environ.items() if k not in LOCAL_ENV and not k.startswith("RAY_")},
             "RAY_TMPDIR": temp, "HOME": temp}
    recipe = {**plain, **LOCAL_ENV}
    ray_cli = str(Path(sys.executable).parent / "ray")
    photos = make_photos(tmp_path / "photos", per_class=2)

    def predict_dir(env: dict, out: str, address: str = "auto") -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "food_classifier.cli", *predict[1:-1], address]
        args[args.index("photos/")], args[args.index("models/food")] = str(photos), str(colour_bundle)
        args[args.index("run.parquet")] = str(tmp_path / out)
        return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)

    try:
        subprocess.run([ray_cli, "get-auth-token", "--generate"], env=recipe, check=True, capture_output=True,
                       timeout=60)  # as on a machine where a local Ray ran once: `ray start` then enables tokens
        subprocess.run([ray_cli, *start[1:4], str(port), "--num-cpus", "1", "--include-dashboard", "false"],
                       env=recipe, check=True, capture_output=True, timeout=180)
        joined = predict_dir(recipe, "run.parquet")
        assert joined.returncode == 0 and "6 scored" in joined.stdout, joined.stdout + joined.stderr
        t = time.monotonic()
        lost = predict_dir(plain, "lost.parquet")
        took = time.monotonic() - t
        tokenless = predict_dir(recipe, "tokenless.parquet", f"127.0.0.1:{port}")
    finally:
        _stop_ray_started_in(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert lost.returncode == 1 and took < 60, (took, lost.stdout, lost.stderr)
    assert "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in lost.stderr and "Traceback" not in lost.stderr, lost.stderr
    assert tokenless.returncode == 1 and "export RAY_AUTH_MODE=token" in tokenless.stderr, tokenless.stderr
    assert "Traceback" not in tokenless.stderr
    assert not (tmp_path / "lost.parquet").exists() and not (tmp_path / "tokenless.parquet").exists()


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2)
    try:
        yield ray
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _same(a: list[dict], b: list[dict]) -> None:
    """Equal rows; probabilities to float32 precision (another batch split may round differently)."""
    assert len(a) == len(b)
    for x, y in zip(sorted(a, key=lambda r: r["path"]), sorted(b, key=lambda r: r["path"]), strict=True):
        assert {**x, "confidence": 0, "top_k": None} == {**y, "confidence": 0, "top_k": None}
        assert (x["confidence"] is None) == (y["confidence"] is None)
        if x["top_k"] is not None:
            assert [t["label"] for t in x["top_k"]] == [t["label"] for t in y["top_k"]]
            assert [t["probability"] for t in x["top_k"]] == pytest.approx([t["probability"] for t in y["top_k"]],
                                                                          abs=1e-6)


def test_predict_dir_on_ray_gives_the_local_rows_and_resumes(tmp_path, colour_bundle, ray_session):
    photos = make_photos(tmp_path / "photos", per_class=6)
    (photos / "green" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    local = predict_dir(photos, colour_bundle, tmp_path / "local.jsonl", batch_size=4, progress=io.StringIO())
    on_ray = predict_dir(photos, colour_bundle, tmp_path / "ray.parquet", batch_size=4,
                         engine=RayEngine(actors=2), progress=io.StringIO())
    assert (on_ray.scored, on_ray.errors, on_ray.rows) == (local.scored, local.errors, local.rows) == (18, 1, 19)
    assert on_ray.accuracy == local.accuracy and "100.0%" in on_ray.accuracy
    _same(read_rows(tmp_path / "local.jsonl"), read_rows(tmp_path / "ray.parquet"))

    half = read_source(photos).paths[:10]
    (tmp_path / "half.txt").write_text("\n".join(half))
    predict_dir(tmp_path / "half.txt", colour_bundle, tmp_path / "resumed.jsonl", progress=io.StringIO())
    resumed = predict_dir(photos, colour_bundle, tmp_path / "resumed.jsonl", batch_size=4, engine=RayEngine(),
                          progress=io.StringIO())
    assert (resumed.skipped, resumed.scored + resumed.errors, resumed.rows) == (10, 9, 19)
    _same(read_rows(tmp_path / "local.jsonl"), read_rows(tmp_path / "resumed.jsonl"))


@pytest.mark.live
def test_ray_serve_answers_like_the_plain_server(colour_bundle, ray_session, server):
    from ray import serve

    port = free_port()
    settings = ServeSettings(bundles=[colour_bundle], host="127.0.0.1", port=port, ort_threads=1,
                             max_ongoing_requests=4)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(settings), name=APP_NAME, route_prefix="/")
    ray_url = f"http://127.0.0.1:{port}"
    assert httpx.get(ray_url + "/readyz", timeout=10).json()["status"] == "ready"  # ready when serve.run returns
    good, bad = image_bytes(colour_image("green", seed=3)), b"GIF89a not an image"
    with httpx.Client(timeout=30) as client:
        for path, kwargs in [("/predict", {"content": good}), ("/v1/models/colour/predict", {"files": {"f": good}}),
                             ("/predict", {"content": bad}), ("/v1/models/nope/predict", {"content": good}),
                             ("/predict?top_k=0", {"content": good}),
                             ("/predict-batch", {"files": [("a", good), ("b", bad)]})]:
            plain, on_ray = (client.post(base + path, **kwargs) for base in (server.url, ray_url))
            assert on_ray.status_code == plain.status_code, path
            assert on_ray.headers.get("x-cache") == plain.headers.get("x-cache"), path
            assert _untimed(on_ray.json()) == _untimed(plain.json()), path
        assert client.get(ray_url + "/predict", params={"image_path": "x.jpg"}).json()["error"] == (
            "path_access_disabled")
        assert client.get(ray_url + "/v1/models").json()["default"] == "colour"


def _untimed(body: dict) -> dict:
    """Without what differs per request by design: timings and the request id."""
    for item in (body, *body.get("results", [])):
        item.pop("timing", None)
        item.pop("request_id", None)
    return body


def test_predict_dir_on_ray_gives_the_classifier_answers_of_a_cascade(tmp_path, ray_session):
    """One path: Ray's actors answer the cascade bundle's default variant like `Classifier.predict`."""
    from cascade_bundle import make_cascade_bundle

    from food_classifier.inference import Classifier

    models = make_cascade_bundle(tmp_path / "models" / "cascade" / "v1").parent
    photos = make_photos(tmp_path / "photos", per_class=3)
    predict_dir(photos, models, tmp_path / "ray.jsonl", batch_size=4, engine=RayEngine(actors=1),
                progress=io.StringIO())
    clf = Classifier(models)
    rows = read_rows(tmp_path / "ray.jsonl")
    assert rows and {r["stage"] for r in rows} == {1, 2} and "not_food" in {r["reason"] for r in rows}
    for r in rows:
        a = clf.predict(r["path"])
        assert (r["label"], r["abstained"], r["reason"], r["stage"]) == (a.label, a.abstained, a.reason, a.stage)
        assert r["confidence"] == pytest.approx(a.confidence, abs=1e-6)
