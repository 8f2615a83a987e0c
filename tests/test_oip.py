"""The Open Inference Protocol (v2) over a real server, driven by tritonclient from PyPI: REST with the
JSON form and the binary-data extension, and gRPC. Answers equal `Classifier`'s; errors come in the
protocol's form; the same core (cache, limits, API key, metrics) serves them.

tritonclient's gRPC stubs and the server's define the same protobuf package (`inference`), which one
process cannot load twice, so the gRPC client runs in a child process (the server is one anyway).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from conftest import SHARED_DATA, colour_image, image_bytes
from tritonclient.utils import InferenceServerException

from food_classifier.inference import Classifier
from food_classifier.testing import ServerProcess, free_port

KEY = "oip-key"
AUTH = {"X-API-Key": KEY}


def auth() -> dict[str, str]:
    """A fresh headers dict per call: tritonclient's infer writes Inference-Header-Content-Length into
    the dict it is given, and a stale one would cut the next JSON request short."""
    return dict(AUTH)
COLOURS = ["red", "green", "blue"]


def jpg(colour: str, seed: int = 0) -> bytes:
    return image_bytes(colour_image(colour, seed=seed))


@pytest.fixture(scope="module")
def served(colour_bundle):
    grpc_port = free_port()
    srv = ServerProcess([colour_bundle], env={"FOOD_CLASSIFIER_API_KEY": KEY},
                        args=["--grpc-port", str(grpc_port), "--max-body-bytes", "300000", "--max-batch-images", "4",
                              "--ort-threads", "1"])
    with srv, httpx.Client(base_url=srv.url, headers=auth(), timeout=30) as http:
        yield srv, http, th.InferenceServerClient(srv.url.removeprefix("http://")), grpc_port


@pytest.fixture(scope="module")
def clf(colour_bundle) -> Classifier:
    return Classifier(colour_bundle, threads=1)


def image_input(photos: list[bytes], binary: bool) -> th.InferInput:
    """BYTES input: raw photo bytes with binary data; base64 strings in the JSON form."""
    inp = th.InferInput("image", [len(photos)], "BYTES")
    values = photos if binary else [base64.b64encode(p) for p in photos]
    return inp.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)


def outputs(binary: bool, class_count: int = 0) -> list[th.InferRequestedOutput]:
    return [th.InferRequestedOutput("label", binary_data=binary),
            th.InferRequestedOutput("label_idx", binary_data=binary),
            th.InferRequestedOutput("probabilities", binary_data=binary, class_count=class_count)]


def expected(clf: Classifier, photos: list[bytes], threshold: float | None = None, k: int = 3):
    preds = [clf.predict(p, top_k=k, threshold=threshold) for p in photos]
    probs = clf.predict_proba(np.stack([clf.preprocess(p) for p in photos]))
    top = [[f"{t.probability:f}:{clf.labels.index(t.label)}:{t.label}" for t in p.top_k] for p in preds]
    return [p.label for p in preds], [p.label_idx for p in preds], probs, top


@pytest.mark.live
def test_http_json_and_binary_answers_equal_the_classifier(served, clf):
    _, _, client, _ = served
    photos = [jpg(c, seed=i) for i, c in enumerate(COLOURS + ["blue"])]
    labels, idx, probs, top = expected(clf, photos)
    assert labels == COLOURS + ["blue"]
    for binary in (False, True):
        r = client.infer("colour", [image_input(photos, binary)], outputs=outputs(binary), headers=auth())
        assert [x.decode() if isinstance(x, bytes) else x for x in r.as_numpy("label")] == labels
        assert r.as_numpy("label_idx").tolist() == idx and r.as_numpy("label_idx").dtype == np.int64
        got = r.as_numpy("probabilities")
        assert got.dtype == np.float32 and got.shape == (4, 3)
        np.testing.assert_allclose(got, probs, atol=1e-6)
        response = r.get_response()
        assert response["model_name"] == "colour" and response["model_version"] == clf.version
        has_binary = any("binary_data_size" in o.get("parameters", {}) for o in response["outputs"])
        assert has_binary is binary
    # no outputs named: tritonclient asks for all of them, binary
    r = client.infer("colour", [image_input(photos[:1], True)], headers=auth(), request_id="mine")
    assert r.as_numpy("label").tolist() == [b"red"] and r.get_response()["id"] == "mine"


@pytest.mark.live
def test_parameters_threshold_top_k_and_classification(served, clf):
    _, _, client, _ = served
    photos = [jpg("green", seed=5), jpg("red", seed=6)]
    labels, _, _, top = expected(clf, photos, threshold=0.9999, k=2)
    assert labels == ["unsure", "unsure"]
    r = client.infer("colour", [image_input(photos, False)], outputs=outputs(False), headers=auth(),
                     parameters={"threshold": 0.9999, "top_k": 2})
    assert r.as_numpy("label").tolist() == labels
    assert r.as_numpy("probabilities").tolist() == top  # top_k: Triton's classification strings
    r = client.infer("colour", [image_input(photos, True)], outputs=outputs(True, class_count=1), headers=auth())
    assert [[x.decode() for x in row] for row in r.as_numpy("probabilities")] == [row[:1] for row in top]
    for bad in ({"top_k": 0}, {"top_k": "many"}, {"threshold": 1.5}):
        with pytest.raises(InferenceServerException) as e:
            client.infer("colour", [image_input(photos, True)], headers=auth(), parameters=bad)
        assert e.value.status() == "400" and "parameter" in e.value.message()


@pytest.mark.live
def test_pixels_input_skips_decoding_and_gives_the_same_answer(served, clf):
    srv, http, client, _ = served
    photos = [jpg(c, seed=20 + i) for i, c in enumerate(COLOURS)]
    pixels = np.stack([clf.preprocess(p) for p in photos])
    labels, _, probs, _ = expected(clf, photos)
    for binary in (True, False):
        inp = th.InferInput("pixels", list(pixels.shape), "FP32").set_data_from_numpy(pixels, binary_data=binary)
        r = client.infer("colour", [inp], outputs=outputs(binary), headers=auth())
        assert r.as_numpy("label").tolist() == [lab.encode() if binary else lab for lab in labels]
        np.testing.assert_allclose(r.as_numpy("probabilities"), probs, atol=1e-6)
    wrong = th.InferInput("pixels", [1, 3, 16, 16], "FP32").set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    nan = th.InferInput("pixels", [1, 3, 32, 32], "FP32").set_data_from_numpy(np.full((1, 3, 32, 32), np.nan,
                                                                                      np.float32))
    for inp, status, words in ((wrong, "400", "[N, 3, 32, 32]"), (nan, "422", "NaN")):
        with pytest.raises(InferenceServerException) as e:
            client.infer("colour", [inp], headers=auth())
        assert e.value.status() == status and words in e.value.message()


@pytest.mark.live
def test_errors_come_in_the_protocol_form(served):
    srv, http, client, _ = served
    one = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(jpg("red")).decode()]}
    cases = [  # (request, status, words in the error)
        (http.post("/v2/models/nope/infer", json={"inputs": [one]}), 404, "no model named 'nope'"),
        (http.post("/v2/models/colour/versions/v9/infer", json={"inputs": [one]}), 404, "no version 'v9'"),
        (http.post("/v2/models/colour/infer", json={"inputs": [{**one, "data": ["%%"]}]}), 400, "base64"),
        (http.post("/v2/models/colour/infer", json={"inputs": [{**one, "data": [base64.b64encode(b"junk").decode()]}]}),
         415, "not a readable image"),
        (http.post("/v2/models/colour/infer", json={"inputs": [{**one, "name": "photo"}]}), 400, "exactly one input"),
        (http.post("/v2/models/colour/infer", json={"inputs": [{**one, "shape": [2]}]}), 400, "needs 2 elements"),
        (http.post("/v2/models/colour/infer", json={"inputs": [{**one, "shape": [5], "data": one["data"] * 5}]}),
         413, "at most 4"),
        (http.post("/v2/models/colour/infer", json={"inputs": [one], "outputs": [{"name": "logits"}]}), 400,
         "unknown output"),
        (http.post("/v2/models/colour/infer", content=b"{not json"), 400, "invalid inference request"),
        (http.post("/v2/models/colour/infer", content=b'{"inputs": []}xx', headers={
            "Inference-Header-Content-Length": "99"}), 400, "does not fit"),
        (http.post("/v2/models/colour/infer", content=json.dumps({"inputs": [
            {**one, "data": None, "parameters": {"binary_data_size": 10}}]}).encode() + b"abc",
            headers={"Inference-Header-Content-Length": str(len(json.dumps({"inputs": [
                {**one, "data": None, "parameters": {"binary_data_size": 10}}]})))}), 400, "binary_data_size"),
        (http.post("/v2/models/colour/infer", content=gzip.compress(b"x" * 400_000),
                   headers={"Content-Encoding": "gzip"}), 413, "inflates past the limit"),
        (http.get("/v2/models/nope"), 404, "no model named"),
        (http.get("/v2/models/nope/ready"), 404, "no model named"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"error"} and words in body["error"], body
    # the middleware's refusals keep the service's form, whose `error` is a string too
    r = httpx.post(f"{srv.url}/v2/models/colour/infer", json={"inputs": [one]})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    with pytest.raises(InferenceServerException) as e:
        client.infer("colour", [image_input([b"\xff" * 310_000], True)], headers=auth())
    assert e.value.status() == "413"
    assert client.infer("colour", [image_input([jpg("blue")], True)], headers=auth()).as_numpy("label")[0] == b"blue"


@pytest.mark.live
def test_compressed_requests_health_metadata_and_the_same_core(served, clf):
    srv, http, client, _ = served
    r = client.infer("colour", [image_input([jpg("green", seed=40)], True)], headers=auth(),
                     request_compression_algorithm="gzip")
    assert r.as_numpy("label").tolist() == [b"green"]
    for path in ("/v2/health/live", "/v2/health/ready"):  # probes need no key, like /healthz
        assert httpx.get(srv.url + path).status_code == 200
    assert httpx.get(srv.url + "/v2").status_code == 401
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("colour", headers=auth())
    meta = client.get_model_metadata("colour", headers=auth())
    assert meta == {"name": "colour", "versions": [clf.version], "platform": "onnxruntime_onnx",
                    "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
                    "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                                {"name": "label_idx", "datatype": "INT64", "shape": [-1]},
                                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                                {"name": "stage", "datatype": "INT64", "shape": [-1]},
                                {"name": "reason", "datatype": "BYTES", "shape": [-1]}]}
    assert client.get_server_metadata(headers=auth())["extensions"] == ["binary_tensor_data", "classification",
                                                                     "parameters"]
    photo = jpg("red", seed=41)
    first = client.infer("colour", [image_input([photo], True)], headers=auth()).get_response()
    again = http.post("/predict", content=photo, headers={"content-type": "image/jpeg"}).json()
    assert again["cache"] == "hit-bytes"  # the OIP answer filled the service's prediction cache
    feedback = http.post("/v1/models/colour/feedback", json={"request_id": first["parameters"]["request_id"],
                                                              "label": "red"})
    assert feedback.status_code == 200 and feedback.json()["correct"] is True  # and the monitor saw it
    metrics = http.get("/metrics").text
    assert 'endpoint="/v2/models/{name}/infer",model="colour",status="200"' in metrics
    assert 'endpoint="/v2/models/{name}/infer",model="colour",status="415"' in metrics


GRPC_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as tg
port, key, photos = sys.argv[1], sys.argv[2], [bytes.fromhex(h) for h in json.load(sys.stdin)]
c = tg.InferenceServerClient(f"127.0.0.1:{port}")
h = {"x-api-key": key}
inp = tg.InferInput("image", [len(photos)], "BYTES").set_data_from_numpy(np.array(photos, dtype=object))
r = c.infer("colour", [inp], headers=h)
top = c.infer("colour", [inp], headers=h, parameters={"threshold": 0.9999},
              outputs=[tg.InferRequestedOutput("label"), tg.InferRequestedOutput("probabilities", class_count=2)])
errors = []
for call in (lambda: c.infer("colour", [inp]), lambda: c.infer("nope", [inp], headers=h),
             lambda: c.infer("colour", [tg.InferInput("image", [1], "BYTES").set_data_from_numpy(
                 np.array([b"junk"], dtype=object))], headers=h)):
    try:
        call()
    except tg.InferenceServerException as e:
        errors.append([e.status(), e.message()])
print(json.dumps({"live": c.is_server_live(), "ready": c.is_server_ready(), "model_ready": c.is_model_ready(
    "colour", headers=h), "meta": c.get_model_metadata("colour", headers=h, as_json=True),
    "label": [x.decode() for x in r.as_numpy("label")], "label_idx": r.as_numpy("label_idx").tolist(),
    "probabilities": r.as_numpy("probabilities").tolist(), "dtype": str(r.as_numpy("probabilities").dtype),
    "unsure": [x.decode() for x in top.as_numpy("label")],
    "top": [[x.decode() for x in row] for row in top.as_numpy("probabilities")], "errors": errors}))
"""


@pytest.mark.live
def test_grpc_answers_equal_the_classifier(served, clf):
    _, http, _, port = served
    photos = [jpg(c, seed=60 + i) for i, c in enumerate(COLOURS)]
    run = subprocess.run([sys.executable, "-c", GRPC_CLIENT, str(port), KEY],
                         input=json.dumps([p.hex() for p in photos]), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    labels, idx, probs, _ = expected(clf, photos)
    _, _, _, top = expected(clf, photos, k=2)
    assert (got["live"], got["ready"], got["model_ready"]) == (True, True, True)
    assert got["meta"]["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["-1"]}]
    assert (got["label"], got["label_idx"], got["dtype"]) == (labels, idx, "float32")
    np.testing.assert_allclose(got["probabilities"], probs, atol=1e-6)
    assert got["unsure"] == ["unsure"] * 3 and got["top"] == top
    assert got["errors"] == [["StatusCode.UNAUTHENTICATED", "missing or wrong API key (send X-API-Key or "
                                                             "Authorization: Bearer)"],
                             ["StatusCode.NOT_FOUND", "no model named 'nope'; available: colour"],
                             ["StatusCode.INVALID_ARGUMENT", "not a readable image (or not one of the accepted "
                                                             "formats: JPEG, PNG, WEBP, GIF, BMP, TIFF)"]]
    metrics = http.get("/metrics").text
    assert 'food_classifier_grpc_requests_total{code="OK",method="ModelInfer"}' in metrics


@pytest.mark.live
@pytest.mark.slow
def test_a_real_photo_through_the_builtin_model(builtin_bundle):
    """Lite0 on a Food-101 photo: the OIP answer is the Classifier's (the built-in bundle: conftest)."""
    from food_classifier import builtin

    photo = next(iter(sorted((SHARED_DATA / "bibimbap").glob("*.jpg"))), None) if SHARED_DATA.is_dir() else None
    if photo is None:
        pytest.skip("needs the shared Food-101 photos")
    bundle = builtin_bundle
    want = Classifier(bundle, threads=1).predict(photo.read_bytes(), top_k=3)
    with ServerProcess([bundle], args=["--ort-threads", "1"]) as srv:
        client = th.InferenceServerClient(srv.url.removeprefix("http://"))
        r = client.infer(builtin.NAME, [image_input([photo.read_bytes()], True)],
                         outputs=[th.InferRequestedOutput("label"),
                                  th.InferRequestedOutput("probabilities", class_count=3)])
    assert r.as_numpy("label").tolist() == [want.label.encode()]
    assert [float(s.split(b":")[0]) for s in r.as_numpy("probabilities")[0]] == pytest.approx(
        [t.probability for t in want.top_k], abs=1e-5)


KSERVE_CLIENT = """
import asyncio, base64, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
url, photos = sys.argv[1], [bytes.fromhex(h) for h in json.load(sys.stdin)]

async def main():
    c = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    out = {"ready": await c.is_server_ready(url)}
    for binary in (False, True):
        inp = InferInput("image", [len(photos)], "BYTES")
        inp.set_data_from_numpy(np.array(photos if binary else [base64.b64encode(p) for p in photos], dtype=object),
                                binary_data=binary)
        res = await c.infer(url, InferRequest(model_name="colour", infer_inputs=[inp], request_id="k",
                                              parameters={"top_k": 2}), model_name="colour")
        out[str(binary)] = {"id": res.id, **{o.name: [x.decode() if isinstance(x, bytes) else x
                                                      for x in o.as_numpy().reshape(-1).tolist()] for o in res.outputs}}
    await c.close()
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.mark.live
def test_the_kserve_rest_client(colour_bundle, clf):
    """kserve cannot install beside our pins (it wants protobuf<7): point FOOD_CLASSIFIER_KSERVE_PYTHON at
    the python of a venv that has it (`python3.11 -m venv v && v/bin/pip install kserve`)."""
    python = os.environ.get("FOOD_CLASSIFIER_KSERVE_PYTHON")
    if not python:
        pytest.skip("set FOOD_CLASSIFIER_KSERVE_PYTHON to a python with the kserve SDK")
    photos = [jpg(c, seed=80 + i) for i, c in enumerate(COLOURS)]
    with ServerProcess([colour_bundle], args=["--ort-threads", "1"]) as srv:
        run = subprocess.run([python, "-c", KSERVE_CLIENT, srv.url], input=json.dumps([p.hex() for p in photos]),
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    labels, idx, _, top = expected(clf, photos, k=2)
    assert got["ready"] is True
    for form in ("False", "True"):  # the JSON form, then binary data
        assert got[form] == {"id": "k", "label": labels, "label_idx": idx, "probabilities": sum(top, [])}


HOSTILE_TENSORS = [  # issue 22 #12: each was a JSON 500 internal_error (np.prod wrapped, numpy overflowed)
    ({"name": "pixels", "shape": [1], "datatype": "UINT8", "data": [300]}, "out of range for UINT8 (0 to 255)"),
    ({"name": "pixels", "shape": [1], "datatype": "UINT8", "data": [-1]}, "out of range for UINT8"),
    ({"name": "pixels", "shape": [1], "datatype": "INT64", "data": [2**70]}, "out of range for INT64"),
    ({"name": "pixels", "shape": [1], "datatype": "UINT64", "data": [2**64]}, "out of range for UINT64"),
    ({"name": "pixels", "shape": [2**70], "datatype": "FP32", "data": []}, "more than 2,147,483,647 elements"),
    ({"name": "pixels", "shape": [4294967296, 4294967296], "datatype": "FP32", "data": []}, "more than"),
    ({"name": "pixels", "shape": [0, 2**62], "datatype": "FP32", "data": []}, "more than"),
    ({"name": "pixels", "shape": [1] * 70, "datatype": "FP32", "data": [0.5]}, "at most 32"),
    ({"name": "image", "shape": [4294967296, 4294967296], "datatype": "BYTES", "data": []}, "more than"),
    ({"name": "pixels", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": ["x" * 50_000]}, "characters)"),
    ({"name": "n" * 200_000, "shape": [1], "datatype": "BYTES", "data": ["eA=="]}, "message cut at 2,000"),
]


@pytest.mark.live
def test_hostile_tensors_are_400_over_rest_and_invalid_argument_over_grpc(served, clf):
    """Out-of-range values and absurd shapes: a 400 with a clear message on REST (JSON and binary) and
    INVALID_ARGUMENT on gRPC, counted in the gRPC metrics; never a 500 / UNKNOWN leaking the exception."""
    import grpc

    from food_classifier.serving.oip import split_bytes
    from food_classifier.v1 import load_oip_stubs

    _, http, _, port = served
    for tensor, words in HOSTILE_TENSORS:
        r = http.post("/v2/models/colour/infer", json={"inputs": [tensor]})
        assert r.status_code == 400 and words in r.json()["error"], (tensor["shape"][:3], r.text[:300])
        assert len(r.text) < 2500  # echoed input is cut (was the whole 200 kB input name)
    header = json.dumps({"inputs": [{"name": "pixels", "shape": [4294967296, 4294967296], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 0}}]}).encode()
    r = http.post("/v2/models/colour/infer", content=header, headers={"Inference-Header-Content-Length":
                                                                       str(len(header))})
    assert r.status_code == 400 and "more than" in r.json()["error"], r.text
    pb2, pb2_grpc = load_oip_stubs()
    tensor = pb2.ModelInferRequest.InferInputTensor
    calls = [  # (request, words): values through `contents`, then a shape through raw_input_contents
        (pb2.ModelInferRequest(model_name="colour", inputs=[tensor(
            name="pixels", datatype="UINT8", shape=[1], contents=pb2.InferTensorContents(uint_contents=[300]))]),
         "out of range for UINT8"),
        (pb2.ModelInferRequest(model_name="colour", inputs=[tensor(
            name="pixels", datatype="INT8", shape=[1], contents=pb2.InferTensorContents(int_contents=[-200]))]),
         "out of range for INT8"),
        (pb2.ModelInferRequest(model_name="colour", inputs=[tensor(name="pixels", datatype="FP32",
                                                                   shape=[4294967296, 4294967296])],
                               raw_input_contents=[b""]), "more than"),
    ]
    series = 'food_classifier_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"} '

    def invalid() -> float:
        line = next((x for x in http.get("/metrics").text.splitlines() if x.startswith(series)), series + "0")
        return float(line.rsplit(" ", 1)[1])

    before = invalid()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb2_grpc.GRPCInferenceServiceStub(channel)
        for request, words in calls:
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(request, metadata=[("x-api-key", KEY)], timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details(), e.value
            assert "Unexpected" not in e.value.details()
        crop = clf.preprocess(jpg("red", seed=5))  # typed contents (read through the field's buffer) still work
        typed = stub.ModelInfer(pb2.ModelInferRequest(model_name="colour", inputs=[tensor(
            name="pixels", datatype="FP32", shape=[1, *crop.shape],
            contents=pb2.InferTensorContents(fp32_contents=crop.reshape(-1).tolist()))]),
            metadata=[("x-api-key", KEY)], timeout=10)
        assert split_bytes(typed.raw_output_contents[0], "label") == [b"red"]
    assert invalid() == before + 3  # counted (an UNKNOWN escaped the metrics)
    assert 'status="500"' not in http.get("/metrics").text
