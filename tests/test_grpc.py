"""gRPC over a real port on loopback: the same answers, errors, limits and key as HTTP, from the same
PredictionService; streams in order; health and reflection; SIGTERM drains; the extra stays optional.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import colour_image, image_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import png_with_size
from pydantic import TypeAdapter

from food_classifier.client import GrpcClient, PredictionError
from food_classifier.serving.http import schemas
from food_classifier.testing import ServerProcess, free_port
from food_classifier.v1 import classifier_pb2 as pb2
from food_classifier.v1 import classifier_pb2_grpc as pb2_grpc

KEY = "grpc-key"
JPEG = {"content-type": "image/jpeg"}
SERVICE = "food_classifier.v1.Classifier"
ROOT = Path(__file__).resolve().parents[1]


def jpg(colour: str, seed: int = 0) -> bytes:
    return image_bytes(colour_image(colour, seed=seed))


@pytest.fixture(scope="module")
def served(colour_bundle):
    port = free_port()
    srv = ServerProcess([colour_bundle], env={"FOOD_CLASSIFIER_API_KEY": KEY},
                        args=["--grpc-port", str(port), "--max-body-bytes", "200000", "--ort-threads", "1"])
    with srv, httpx.Client(base_url=srv.url, headers={"X-API-Key": KEY}, timeout=30) as http, \
            GrpcClient(f"127.0.0.1:{port}", api_key=KEY) as g:
        yield http, g, port


def http_error(r: httpx.Response) -> tuple[int, str, str]:
    body = r.json()
    return r.status_code, body["error"], body["detail"]


def grpc_error(call) -> PredictionError:
    with pytest.raises(PredictionError) as e:
        call()
    return e.value


@pytest.mark.live
def test_classify_gives_the_http_answer(served):
    http, g, _ = served
    for colour in ("red", "green", "blue"):
        via_grpc = g.predict(jpg(colour), top_k=2)
        via_http = http.post("/predict?top_k=2", content=jpg(colour), headers=JPEG).json()
        schemas.Prediction.model_validate(via_grpc)  # the HTTP wire schema: same keys and types
        same = ("label", "label_idx", "confidence", "top_k", "abstained", "model", "model_version")
        assert {k: via_grpc[k] for k in same} == {k: via_http[k] for k in same}
        assert via_grpc["label"] == colour and len(via_grpc["request_id"]) == 32
    unsure = g.predict(jpg("green"), model="colour", threshold=0.9999)
    assert unsure["abstained"] is True and unsure["label"] == "unsure"


@pytest.mark.live
def test_errors_map_to_grpc_codes_with_the_http_messages(served, tmp_path):
    http, g, port = served
    url = str(http.base_url).rstrip("/")
    C = grpc.StatusCode
    bomb = png_with_size(20_000, 20_000)
    cases = [  # (gRPC call, the same thing over HTTP, gRPC code)
        (lambda: g.predict(b"junk"), lambda: http.post("/predict", content=b"junk", headers=JPEG), C.INVALID_ARGUMENT),
        (lambda: g.predict(bomb), lambda: http.post("/predict", content=bomb, headers=JPEG), C.RESOURCE_EXHAUSTED),
        (lambda: g.predict(b"\xff" * 200_010), lambda: http.post("/predict", content=b"\xff" * 200_010, headers=JPEG),
         C.RESOURCE_EXHAUSTED),
        (lambda: g.predict(jpg("red"), model="nope"),
         lambda: http.post("/v1/models/nope/predict", content=jpg("red"), headers=JPEG), C.NOT_FOUND),
        (lambda: g.predict(jpg("red"), top_k=0),
         lambda: http.post("/predict?top_k=0", content=jpg("red"), headers=JPEG), C.INVALID_ARGUMENT),
        (lambda: g.predict(jpg("red"), threshold=1.5),
         lambda: http.post("/predict?threshold=1.5", content=jpg("red"), headers=JPEG), C.INVALID_ARGUMENT),
        (lambda: GrpcClient(f"127.0.0.1:{port}").predict(jpg("red")),
         lambda: httpx.post(f"{url}/predict", content=jpg("red"), headers=JPEG), C.UNAUTHENTICATED),
        (lambda: GrpcClient(f"127.0.0.1:{port}", api_key="wrong").models(),
         lambda: httpx.get(f"{url}/v1/models", headers={"X-API-Key": "wrong"}), C.UNAUTHENTICATED),
    ]
    for via_grpc, via_http, code in cases:
        err = grpc_error(via_grpc)
        assert err.grpc_code == code
        assert (err.status, err.error, err.detail) == http_error(via_http())
    empty = grpc_error(lambda: g.predict(b""))
    assert (empty.grpc_code, empty.status, empty.error) == (C.INVALID_ARGUMENT, 422, "missing_image")
    huge = grpc_error(lambda: g.predict(b"\xff" * 400_000))  # past the message limit: refused by gRPC itself
    assert (huge.grpc_code, huge.status) == (C.RESOURCE_EXHAUSTED, 413)
    assert g.predict(jpg("red"))["label"] == "red"  # and the server goes on


@pytest.mark.live
def test_stream_answers_in_order_and_a_bad_image_is_an_entry(served):
    http, g, _ = served
    colours = ["red", "green", "blue", "blue", "red"] * 8
    images: list[bytes] = [jpg(c, seed=i) for i, c in enumerate(colours)]
    images[5] = b"not an image"
    results = g.predict_batch(images, top_k=1)
    assert [r.get("label") for r in results] == [None if i == 5 else c for i, c in enumerate(colours)]
    assert results[5] == {"index": 5, "filename": "image5", "error": "invalid_image", "status": 415,
                          "detail": results[5]["detail"]}
    adapter = TypeAdapter(schemas.BatchResult | schemas.BatchError)
    for r in results:
        adapter.validate_python(r)
    files = [("files", (f"image{i}", data, "application/octet-stream")) for i, data in enumerate(images[:8])]
    over_http = http.post("/predict-batch?top_k=1", files=files).json()["results"]
    volatile = ("request_id", "timing", "cache")  # the second sending of an image is a cache hit
    assert [{k: v for k, v in r.items() if k not in volatile} for r in results[:8]] == \
           [{k: v for k, v in r.items() if k not in volatile} for r in over_http]


@pytest.mark.live
def test_list_models_is_the_http_list(served):
    http, g, _ = served
    assert g.models() == http.get("/v1/models").json()["models"]


@pytest.mark.live
def test_grpc_goes_through_the_same_service(served):
    http, g, _ = served

    def images_ok() -> float:
        line = next(x for x in http.get("/metrics").text.splitlines()
                    if x.startswith('food_classifier_images_total{model="colour",outcome="ok"}'))
        return float(line.split()[-1])

    before = images_ok()
    g.predict(jpg("red"))
    g.predict_batch([jpg("blue"), jpg("green")])
    assert images_ok() == before + 3  # counted by PredictionService, whatever the transport
    text = http.get("/metrics").text
    assert 'food_classifier_grpc_requests_total{code="OK",method="Classify"}' in text
    assert 'food_classifier_grpc_requests_total{code="OK",method="ClassifyStream"}' in text


@pytest.mark.live
def test_health_and_reflection(served):
    _, g, port = served
    assert g.ready()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):  # no key needed, like /healthz
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                   health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        ask = [reflection_pb2.ServerReflectionRequest(list_services=""),
               reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]
        with pytest.raises(grpc.RpcError) as e:  # reflection is behind the key, like /openapi.json
            list(refl.ServerReflectionInfo(iter(ask)))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        services, files = refl.ServerReflectionInfo(iter(ask), metadata=(("authorization", f"Bearer {KEY}"),))
    names = {s.name for s in services.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto.FromString(files.file_descriptor_response.file_descriptor_proto[0])
    assert proto.name == "food_classifier/v1/classifier.proto"
    assert [m.name for m in proto.service[0].method] == ["Classify", "ClassifyStream", "ListModels"]


def _in_thread(coro_fn) -> None:
    """Run an asyncio test off the main thread (the app then installs no signal handlers)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coro_fn())
        except BaseException as e:  # noqa: BLE001 (re-raised in the test thread)
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive(), "timed out"
    if errors:
        raise errors[0]


@pytest.mark.live
def test_health_is_serving_only_once_models_are_loaded(colour_bundle):
    from food_classifier.serving.compose import build_app
    from food_classifier.serving.settings import ServeSettings

    async def scenario() -> None:
        for default, final in (("colour", health_pb2.HealthCheckResponse.SERVING),
                               ("nope", health_pb2.HealthCheckResponse.NOT_SERVING)):  # loading fails
            port = free_port()
            app = build_app(ServeSettings(bundles=[colour_bundle], grpc_port=port, host="127.0.0.1",
                                           default_model=default))
            gate, warm = asyncio.Event(), app.state.service.warm_up

            async def held(models, warm=warm, gate=gate) -> None:
                await gate.wait()
                await warm(models)

            app.state.service.warm_up = held
            async with app.router.lifespan_context(app), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                health = health_pb2_grpc.HealthStub(ch)
                check = health_pb2.HealthCheckRequest(service="")
                await asyncio.sleep(0.3)
                assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await pb2_grpc.ClassifierStub(ch).Classify(pb2.ClassifyRequest(image=jpg("red")))
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # HTTP's 503, same message
                assert e.value.details().startswith("models are loading" if default == "colour" else
                                                    "models are failed: BundleError: default model 'nope'")
                gate.set()
                deadline = time.monotonic() + 10
                while app.state.registry.state == "loading" and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.1)
                assert (await health.Check(check)).status == final

    _in_thread(scenario)


@pytest.mark.live
def test_sigterm_lets_a_stream_in_flight_finish(colour_bundle):
    port = free_port()
    with ServerProcess([colour_bundle], args=["--grpc-port", str(port)]) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        first = threading.Event()

        def requests():
            for i in range(30):
                if i == 3:
                    first.wait(10)
                    srv.signal(signal.SIGTERM)  # the server starts shutting down mid-stream
                time.sleep(0.03)
                yield pb2.ClassifyRequest(image=jpg("blue", seed=i))

        answers = []
        for r in pb2_grpc.ClassifierStub(ch).ClassifyStream(requests(), timeout=30):
            answers.append(r.label)
            first.set()
        assert answers == ["blue"] * 30
        assert srv.proc.wait(20) in (0, -signal.SIGTERM)  # graceful; uvicorn re-raises the signal (not -9)


@pytest.mark.live
def test_port_in_use_is_a_clear_startup_error(colour_bundle):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "food_classifier.cli", "serve", str(colour_bundle), "--host",
                              "127.0.0.1", "--port", "0", "--grpc-port", str(taken)],
                             capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr == f"error: cannot listen for gRPC on 127.0.0.1:{taken}: Address already in use\n"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_without_the_extra_grpc_is_one_clear_error(colour_bundle):
    blocked = "import sys; sys.modules['grpc'] = None\n"
    serve = _python(blocked + "from food_classifier.cli.serve import serve_command\n"
                    f"serve_command()(args=['{colour_bundle}', '--grpc-port', '0'], prog_name='serve')")
    assert serve.returncode == 2, serve.stderr
    assert serve.stderr.startswith("error: gRPC needs the grpc extra: pip install 'food-classifier[grpc]'")
    assert "Traceback" not in serve.stderr
    client = _python(blocked + "from food_classifier.client import GrpcClient\n"
                     "try:\n    GrpcClient()\nexcept ImportError as e:\n    print(e)")
    assert client.stdout.startswith("gRPC needs the grpc extra: pip install 'food-classifier[grpc]'"), client


def test_the_core_never_imports_grpc(colour_bundle):
    run = _python("import sys\n"
                  "import food_classifier.client, food_classifier.inference, food_classifier.monitoring.statistics\n"
                  "from food_classifier.serving.http.app import create_app\n"
                  "from food_classifier.serving.settings import ServeSettings\n"
                  f"create_app(ServeSettings(bundles=['{colour_bundle}'], prediction_log=None))\n"
                  "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'grpc_health', 'google')))")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_regenerating_the_stubs_changes_nothing(tmp_path):
    pytest.importorskip("grpc_tools")
    from food_classifier.v1.codegen import ROOT as PACKAGE_ROOT
    from food_classifier.v1.codegen import generate

    for fresh in generate(tmp_path):
        checked_in = PACKAGE_ROOT / "food_classifier" / "v1" / fresh.name
        assert fresh.read_bytes() == checked_in.read_bytes(), f"{fresh.name} is stale: run `make proto`"
