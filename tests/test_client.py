"""`food_classifier.client` against the real server process."""

from __future__ import annotations

import asyncio

import pytest
from conftest import ADMIN_KEY, colour_image, image_bytes

from food_classifier import client as fc_client
from food_classifier.client import AsyncClient, Client, PredictionError


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    paths = {}
    for c, fmt in (("red", "JPEG"), ("green", "PNG"), ("blue", "WEBP")):
        paths[c] = d / f"{c}.{fmt.lower()}"
        paths[c].write_bytes(image_bytes(colour_image(c), fmt))
    return paths


@pytest.mark.live
def test_predict_paths_and_bytes(server, photos):
    with Client(server.url) as c:
        c.wait_ready(10)
        for colour, path in photos.items():
            assert c.predict(path)["label"] == colour
            assert c.predict(str(path), raw=True)["label"] == colour
        r = c.predict(photos["red"].read_bytes(), model="colour", top_k=1, threshold=0.99999)
        assert r["abstained"] and len(r["top_k"]) == 1
        assert [m["name"] for m in c.models()] == ["colour"]


@pytest.mark.live
def test_predict_batch_mixed_inputs_in_order(server, photos):
    with Client(server.url, model="colour") as c:
        res = c.predict_batch([photos["blue"], b"not an image", photos["red"].read_bytes(), str(photos["green"])])
    assert [r.get("label") for r in res] == ["blue", None, "red", "green"]
    assert res[1]["error"] == "invalid_image" and res[1]["status"] == 415


@pytest.mark.live
def test_errors_raise_prediction_error(server, photos):
    with Client(server.url) as c:
        with pytest.raises(PredictionError) as e:
            c.predict(photos["red"], model="nope")
        assert (e.value.status, e.value.error) == (404, "unknown_model")
    with Client(server.url, api_key=ADMIN_KEY) as c, pytest.raises(PredictionError) as e:
        c.reload("nope")
    assert e.value.status == 404


@pytest.mark.live
def test_module_level_helpers(server, photos):
    assert fc_client.predict(photos["green"], url=server.url)["label"] == "green"
    res = fc_client.predict_batch([photos["red"], photos["blue"]], url=server.url, top_k=2)
    assert [r["label"] for r in res] == ["red", "blue"] and len(res[0]["top_k"]) == 2


@pytest.mark.live
def test_async_client(server, photos):
    async def main():
        async with AsyncClient(server.url) as c:
            singles = await asyncio.gather(*(c.predict(photos[col]) for col in ("red", "green", "blue") * 4))
            batch = await c.predict_batch([photos["green"], photos["red"]])
            return singles, batch

    singles, batch = asyncio.run(main())
    assert [s["label"] for s in singles] == ["red", "green", "blue"] * 4
    assert [b["label"] for b in batch] == ["green", "red"]


def test_not_ready_when_nothing_listens():
    from food_classifier.testing import free_port

    c = Client(f"http://127.0.0.1:{free_port()}")
    assert not c.ready()
    with pytest.raises(TimeoutError):
        c.wait_ready(0.2)
    c.close()
