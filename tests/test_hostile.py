"""The permanent hostile-input suite, against the real server (uvicorn over HTTP).

Every kind of bad file (tests/hostile_corpus.py: truncated, lying headers, bombs, formats that are not
on the allow-list, polyglots) and every odd-but-valid image (CMYK, 16-bit, alpha, palette, 1000-frame
GIF...) goes through each transport: multipart, raw body, batch, JSON base64 and the seed's path GET.
Then bad requests (content types, multipart abuse, JSON abuse, paths, parameters). Every answer must
be a JSON 4xx with the expected code (or a 200 with the right label), and after each one the server
must still classify a good image.
"""

from __future__ import annotations

import base64
import time

import httpx
import numpy as np
import pytest
import rawhttp
from conftest import colour_image, image_bytes, make_colour_bundle
from hostile_corpus import GREY, MAX_PIXELS, corpus
from PIL import Image

from food_classifier.testing import ServerProcess

CORPUS = corpus()
GOOD = image_bytes(colour_image("green", seed=3))
OCTET = {"content-type": "application/octet-stream"}
TRANSPORTS = ["multipart", "raw", "batch", "json", "path"]
MAX_BODY = 2_000_000


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    make_colour_bundle(root / "models" / "colour" / "v1", version="v1")
    files = root / "files"
    files.mkdir()
    for name, (data, _, _) in CORPUS.items():
        (files / f"{name}.bin").write_bytes(data)
    (root / "outside.jpg").write_bytes(GOOD)
    (files / "link_out.jpg").symlink_to(root / "outside.jpg")
    srv = ServerProcess([root / "models" / "colour"], log_path=root / "server.log",
                        args=["--allow-path-root", str(files), "--max-pixels", str(MAX_PIXELS),
                              "--max-body-bytes", str(MAX_BODY), "--max-batch-images", "8", "--ort-threads", "1"])
    with srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        yield client, srv
    log = (root / "server.log").read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def assert_alive(client: httpx.Client) -> None:
    r = client.post("/predict", content=GOOD, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["label"] == "green", r.text


def assert_error(r: httpx.Response, status: int, code: str | None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json", r.headers
    body = r.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    if code:
        assert body["error"] == code, body
    return body


def send(client: httpx.Client, transport: str, name: str, data: bytes) -> httpx.Response:
    if transport == "multipart":
        return client.post("/predict", files={"file": (f"{name}.bin", data, "application/octet-stream")})
    if transport == "raw":
        return client.post("/v1/models/colour/predict", content=data, headers=OCTET)
    if transport == "json":
        return client.post("/predict", json={"image": base64.b64encode(data).decode()})
    if transport == "batch":
        files = [("files", (f"{name}.bin", data, "application/octet-stream")),
                 ("files", ("good.jpg", GOOD, "image/jpeg"))]
        return client.post("/predict-batch", files=files)
    return client.get("/predict", params={"image_path": f"{name}.bin"})


@pytest.mark.live
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", list(CORPUS))
def test_file_through_every_transport(live, name, transport):
    client, _ = live
    data, status, expected = CORPUS[name]
    r = send(client, transport, name, data)
    if transport == "batch":  # a bad image is an entry of a 200 answer; its neighbour is still classified
        assert r.status_code == 200, r.text
        entry, neighbour = r.json()["results"]
        assert neighbour["label"] == "green"
        if status == 200:
            assert "error" not in entry and (name in GREY or entry["label"] == expected), entry
        else:
            assert (entry["status"], entry["error"]) == (status, expected) and entry["detail"], entry
    elif status == 200:
        assert r.status_code == 200, r.text
        assert name in GREY or r.json()["label"] == expected, r.json()
    else:
        body = assert_error(r, status, expected)
        if status == 413:
            assert f"{MAX_PIXELS:,}" in body["detail"]  # the configured limit, never Pillow's own
    assert_alive(client)


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "hostileboundary") -> bytes:
    out = b""
    for field, filename, data in parts:
        disp = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MULTIPART = {"content-type": "multipart/form-data; boundary=hostileboundary"}
JSON = {"content-type": "application/json"}

# name -> (method, url, request kwargs, status, code)
REQUESTS = {
    "content_type_semicolons": ("POST", "/predict", {"content": GOOD, "headers": {"content-type": ";;;"}},
                                415, "unsupported_media_type"),
    "content_type_no_subtype": ("POST", "/predict", {"content": GOOD, "headers": {"content-type": "image"}},
                                415, "unsupported_media_type"),
    "content_type_text": ("POST", "/predict", {"content": GOOD, "headers": {"content-type": "text/plain"}},
                          415, "unsupported_media_type"),
    "content_type_xml": ("POST", "/predict-batch", {"content": b"<a/>", "headers": {"content-type": "text/xml"}},
                         415, "unsupported_media_type"),
    "content_type_empty": ("POST", "/predict", {"content": GOOD, "headers": {"content-type": ""}},
                           415, "unsupported_media_type"),
    "empty_raw_body": ("POST", "/predict", {"content": b"", "headers": OCTET}, 422, "missing_image"),
    "empty_multipart_file": ("POST", "/predict", {"files": {"file": ("e.jpg", b"", "image/jpeg")}},
                             422, "missing_image"),
    "multipart_no_boundary": ("POST", "/predict", {"content": b"--x\r\n", "headers": {
        "content-type": "multipart/form-data"}}, 422, "invalid_multipart"),
    "multipart_garbage": ("POST", "/predict", {"content": b"\x00\xff" * 500, "headers": MULTIPART},
                          422, None),
    "multipart_huge_text_field": ("POST", "/predict", {"content": _multipart(
        [("note", None, b"a" * 1_500_000), ("file", "a.jpg", GOOD)]), "headers": MULTIPART},
        422, "invalid_multipart"),
    "multipart_300_fields": ("POST", "/predict", {"content": _multipart(
        [(f"f{i}", None, b"x") for i in range(300)] + [("file", "a.jpg", GOOD)]), "headers": MULTIPART},
        422, "invalid_multipart"),
    "multipart_17_files_single": ("POST", "/predict", {"files": [("file", (f"{i}.jpg", GOOD, "image/jpeg"))
                                                                 for i in range(17)]}, 413, "too_many_images"),
    "batch_9_files": ("POST", "/predict-batch", {"files": [("files", (f"{i}.jpg", GOOD, "image/jpeg"))
                                                           for i in range(9)]}, 413, "too_many_images"),
    "multipart_text_only": ("POST", "/predict", {"files": {"note": (None, "no file")}}, 422, "missing_image"),
    "urlencoded_form": ("POST", "/predict", {"data": {"image": "x"}}, 422, "missing_image"),
    "body_over_limit": ("POST", "/predict", {"content": b"\xff" * (MAX_BODY + 1), "headers": OCTET},
                        413, "body_too_large"),
    "nested_json_list": ("POST", "/predict", {"content": b"[" * 100_000 + b"]" * 100_000, "headers": JSON},
                         422, "invalid_json"),
    "nested_json_object": ("POST", "/predict-batch", {"content": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                                                      "headers": JSON}, 422, "invalid_json"),
    "json_huge_integer": ("POST", "/predict", {"content": b'{"image": ' + b"9" * 10_000 + b"}", "headers": JSON},
                          422, "invalid_json"),
    "json_invalid_utf8": ("POST", "/predict", {"content": b'{"image": "\xff\xfe"}', "headers": JSON},
                          422, "invalid_json"),
    "json_not_object": ("POST", "/predict", {"json": ["a", "b"]}, 422, "invalid_json"),
    "json_image_number": ("POST", "/predict", {"json": {"image": 12345}}, 422, "invalid_base64"),
    "json_image_list": ("POST", "/predict", {"json": {"image": [1, 2]}}, 422, "invalid_base64"),
    "json_bad_base64": ("POST", "/predict", {"json": {"image": "%%% not base64 %%%"}}, 422, "invalid_base64"),
    "json_empty_image": ("POST", "/predict", {"json": {"image": ""}}, 422, "missing_image"),
    "json_no_image_field": ("POST", "/predict", {"json": {"picture": "aGk="}}, 422, "missing_image"),
    "json_batch_bad_entry": ("POST", "/predict-batch", {"json": {"images": ["aGk=", None]}}, 422, "invalid_base64"),
    "path_nul": ("GET", "/predict", {"params": {"image_path": "a\x00b.jpg"}}, 422, None),
    "path_traversal": ("GET", "/predict", {"params": {"image_path": "../../../../etc/passwd"}}, 403, "path_forbidden"),
    "path_encoded_traversal": ("GET", "/predict?image_path=%2e%2e%2f%2e%2e%2fetc%2fpasswd", {}, 403,
                               "path_forbidden"),
    "path_absolute": ("GET", "/predict", {"params": {"image_path": "/etc/passwd"}}, 403, "path_forbidden"),
    "path_symlink_out": ("GET", "/predict", {"params": {"image_path": "link_out.jpg"}}, 403, "path_forbidden"),
    "path_directory": ("GET", "/predict", {"params": {"image_path": "."}}, 404, "not_found"),
    "path_too_long": ("GET", "/predict", {"params": {"image_path": "a" * 5000}}, 404, "not_found"),
    "path_empty": ("GET", "/predict", {"params": {"image_path": ""}}, 422, "invalid_request"),
    "top_k_negative": ("POST", "/predict?top_k=-1", {"content": GOOD, "headers": OCTET}, 422, "invalid_request"),
    "top_k_huge": ("POST", "/predict?top_k=" + "9" * 40, {"content": GOOD, "headers": OCTET}, 422,
                   "invalid_request"),
    "threshold_nan": ("POST", "/predict?threshold=nan", {"content": GOOD, "headers": OCTET}, 422,
                      "invalid_request"),
    "unknown_model_unicode": ("POST", "/v1/models/%F0%9F%8D%95" + "x" * 300 + "/predict",
                              {"content": GOOD, "headers": OCTET}, 404, "unknown_model"),
    "method_delete": ("DELETE", "/predict", {}, 405, "method_not_allowed"),
    "method_options": ("OPTIONS", "/predict", {}, 405, "method_not_allowed"),
}


@pytest.mark.live
@pytest.mark.parametrize("name", list(REQUESTS))
def test_hostile_request(live, name):
    client, _ = live
    method, url, kwargs, status, code = REQUESTS[name]
    assert_error(client.request(method, url, **kwargs), status, code)
    assert_alive(client)


@pytest.mark.live
def test_405_lists_every_method_of_the_path(live):
    client, _ = live
    r = client.request("OPTIONS", "/predict")
    assert set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    assert client.put("/healthz").headers["allow"] == "GET, HEAD"


@pytest.mark.live
def test_nested_json_keeps_the_connection(live):
    """The 422 must not reset keep-alive: the next request goes over the same connection."""
    _, srv = live
    nested = b"[" * 20_000 + b"]" * 20_000
    with rawhttp.connect(srv.port) as sock:
        for body, ctype, status in ((nested, "application/json", 422), (GOOD, "image/jpeg", 200)):
            sock.sendall(rawhttp.request_head("POST", "/predict", {"Content-Type": ctype}, len(body)) + body)
            got, headers, _ = rawhttp.read_response(sock)
            assert got == status and headers.get("connection") != "close"


@pytest.mark.live
def test_head_health_probes(live):
    client, _ = live
    for path in ("/healthz", "/readyz"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"" and r.headers["content-type"] == "application/json"


def test_pixels_of_odd_modes_are_right():
    """16-bit grey is scaled to 8 bits (Pillow alone clips it to white), alpha composites on white."""
    from food_classifier.preprocessing import open_image

    grey = open_image(CORPUS["grey_16bit_png"][0])
    assert 185 < np.asarray(grey).mean() < 205  # ~50,000/257
    rgb48 = np.asarray(open_image(CORPUS["rgb_48bit_png"][0]))[0, 0]
    assert list(rgb48) == [8000 // 256, 9000 // 256, 60000 // 256]
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert open_image(image_bytes(half, "PNG")).getpixel((0, 0)) == (127, 127, 127)


def _metric(client: httpx.Client, series: str) -> float | None:
    line = next((x for x in client.get("/metrics").text.splitlines() if x.startswith(series + " ")), None)
    return None if line is None else float(line.rsplit(" ", 1)[1])


@pytest.mark.live
def test_feedback_cannot_be_rigged(live):
    """Issue 22 #13: 60 cache-hit requests for one photo + a wrong-label feedback on each moved
    live_accuracy from 1.0 to 0.032, and 100 posts on one request id counted 100. Now one vote per
    image per model version; repeats change nothing and say so (`vote`)."""
    client, _ = live
    feedback = "/v1/models/colour/feedback"
    honest = client.post("/predict", content=image_bytes(colour_image("red", seed=901)), headers=OCTET).json()
    assert client.post(feedback, json={"request_id": honest["request_id"], "label": "red"}).json()["vote"] == "new"
    photo = image_bytes(colour_image("blue", seed=902))
    ids = [client.post("/predict", content=photo, headers=OCTET).json()["request_id"] for _ in range(60)]
    votes = [client.post(feedback, json={"request_id": rid, "label": "green"}).json() for rid in ids]
    assert [v["vote"] for v in votes] == ["new"] + ["unchanged"] * 59 and not votes[0]["correct"]
    for _ in range(100):  # the same request id again and again
        assert client.post(feedback, json={"request_id": ids[0], "label": "green"}).json()["vote"] == "unchanged"
    assert _metric(client, 'food_classifier_live_accuracy{model="colour"}') == 0.5  # 2 images, 1 right
    assert _metric(client, 'food_classifier_feedback_window{model="colour"}') == 2
    assert _metric(client, 'food_classifier_feedback_total{model="colour",outcome="wrong"}') == 1
    fixed = client.post(feedback, json={"request_id": ids[-1], "label": "blue"}).json()  # a correction: replaces
    assert (fixed["vote"], fixed["correct"]) == ("replaced", True)
    assert _metric(client, 'food_classifier_live_accuracy{model="colour"}') == 1.0
    long_label = client.post(feedback, json={"request_id": ids[0], "label": "x" * 1_900_000})  # limit: 2 MB
    body = assert_error(long_label, 422, "unknown_label")  # the label is not echoed back whole
    assert len(long_label.content) < 2000 and "1,900,000 characters" in body["detail"]


@pytest.mark.live
@pytest.mark.broker
def test_small_ones_head_probes_admin_key_on_grpc_and_a_full_redis(tmp_path):
    """Issue 22 #17: HEAD on the OIP health probes was a 405; the admin key, which SERVING.md says passes
    wherever the API key does, was refused on gRPC; /readyz said the cache was "ok" while an out-of-memory
    Redis refused every write."""
    import grpc
    import redis
    from services import RedisServer

    from food_classifier.client import GrpcClient
    from food_classifier.testing import free_port

    if RedisServer.binary() is None:
        pytest.skip("redis-server not installed (apt)")
    make_colour_bundle(tmp_path / "colour" / "v1", version="v1")
    grpc_port = free_port()
    env = {"FOOD_CLASSIFIER_API_KEY": "api-key", "FOOD_CLASSIFIER_ADMIN_KEY": "admin-key",
           "FOOD_CLASSIFIER_CACHE_BREAKER_S": "0.2"}
    with RedisServer() as store:
        full = redis.Redis.from_url(store.url)
        full.set("ballast", b"x" * 3_000_000)
        full.config_set("maxmemory-policy", "noeviction")
        full.config_set("maxmemory", "2mb")  # below what is used: every write is refused (OOM), reads work
        srv = ServerProcess([tmp_path / "colour"], env=env, args=["--grpc-port", str(grpc_port), "--cache-url",
                                                                   store.url, "--ort-threads", "1"])
        with srv, httpx.Client(base_url=srv.url, headers={"X-API-Key": "api-key"}, timeout=30) as client:
            for path in ("/v2/health/live", "/v2/health/ready"):
                r = httpx.head(srv.url + path)
                assert r.status_code == 200 and r.content == b"", (path, r.status_code)
            with GrpcClient(f"127.0.0.1:{grpc_port}", api_key="admin-key") as g:
                assert g.predict(GOOD)["label"] == "green"  # the admin key passes on gRPC as on HTTP
            with GrpcClient(f"127.0.0.1:{grpc_port}", api_key="wrong") as g, pytest.raises(Exception) as e:
                g.predict(GOOD)
            assert getattr(e.value, "grpc_code", None) == grpc.StatusCode.UNAUTHENTICATED, e.value
            fresh = image_bytes(colour_image("blue", seed=78))
            assert client.post("/predict", content=fresh, headers=OCTET).json()["cache"] == "miss"  # write refused
            time.sleep(0.5)  # past the breaker: a ping succeeds again
            cache = client.get("/readyz").json()["cache"]
            assert cache["state"] == "degraded" and cache["redis"]["state"] == "read_only", cache
            assert "OutOfMemoryError" in cache["redis"]["error"]
            full.delete("ballast")
            assert client.post("/predict", content=image_bytes(colour_image("red", seed=77)),
                               headers=OCTET).json()["label"] == "red"  # a write succeeds: healthy again
            assert client.get("/readyz").json()["cache"]["state"] == "ok"
        full.close()
