"""Serving pieces alone: the micro-batcher, import hygiene (no torch), the CLI's failure messages."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import ROOT, invoke_serve

from food_classifier.answer import Options
from food_classifier.serving.batching import MicroBatcher


class SlowModel:
    """Doubles its input; records batch sizes; takes `delay` seconds per call."""

    def __init__(self, delay: float = 0.02, fail: bool = False):
        self.delay, self.fail, self.sizes = delay, fail, []
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.sizes.append(len(batch))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("model exploded")
        return batch * 2


async def ready(value: float, delay: float = 0.0) -> np.ndarray:
    if delay:
        await asyncio.sleep(delay)
    return np.full((3,), value, dtype=np.float32)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as ex:
        yield ex


def test_concurrent_requests_share_batches_and_get_their_own_rows(pool):
    model = SlowModel()

    async def main():
        b = MicroBatcher(model, pool, max_size=4, max_wait_ms=5)
        return await asyncio.gather(*(b.predict(ready(i)) for i in range(10)))

    results = asyncio.run(main())
    assert [float(r.output[0]) for r in results] == [2.0 * i for i in range(10)]
    assert sum(model.sizes) == 10 and max(model.sizes) <= 4 and len(model.sizes) <= 4
    assert all(r.batch_size == model.sizes[0] for r in results[:model.sizes[0]])


def test_lone_request_does_not_wait(pool):
    model = SlowModel(delay=0)

    async def main():
        b = MicroBatcher(model, pool, max_size=8, max_wait_ms=500)
        t = time.perf_counter()
        r = await b.predict(ready(1))
        return r, time.perf_counter() - t

    r, took = asyncio.run(main())
    assert r.batch_size == 1 and took < 0.2


def test_waits_for_requests_still_decoding_but_only_max_wait(pool):
    async def run(wait_ms: float, second_delay: float):
        model = SlowModel(delay=0)
        b = MicroBatcher(model, pool, max_size=8, max_wait_ms=wait_ms)
        t = time.perf_counter()
        first = asyncio.ensure_future(b.predict(ready(1)))
        second = asyncio.ensure_future(b.predict(ready(2, delay=second_delay)))
        r1 = await first
        t1 = time.perf_counter() - t
        await second
        return r1, t1, model.sizes

    r1, _, sizes = asyncio.run(run(wait_ms=200, second_delay=0.02))
    assert r1.batch_size == 2 and sizes == [2]  # waited for the decoding neighbour
    r1, _, sizes = asyncio.run(run(wait_ms=0, second_delay=0.02))
    assert r1.batch_size == 1 and sizes == [1, 1]  # never waits
    r1, t1, sizes = asyncio.run(run(wait_ms=30, second_delay=0.5))
    assert r1.batch_size == 1 and t1 < 0.3 and sizes == [1, 1]  # the wait is bounded


def test_failed_decode_does_not_stall_the_batch(pool):
    async def failing():
        await asyncio.sleep(0.01)
        raise ValueError("bad image")

    async def main():
        b = MicroBatcher(SlowModel(delay=0), pool, max_size=8, max_wait_ms=1000)
        t = time.perf_counter()
        ok, bad = await asyncio.gather(b.predict(ready(1)), b.predict(failing()), return_exceptions=True)
        return ok, bad, time.perf_counter() - t

    ok, bad, took = asyncio.run(main())
    assert isinstance(bad, ValueError) and ok.batch_size == 1 and took < 0.5


def test_model_error_reaches_every_request_and_batcher_recovers(pool):
    model = SlowModel(fail=True)

    async def main():
        b = MicroBatcher(model, pool, max_size=4, max_wait_ms=1)
        res = await asyncio.gather(*(b.predict(ready(i)) for i in range(3)), return_exceptions=True)
        model.fail = False
        return res, await b.predict(ready(5))

    res, after = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in res) and float(after.output[0]) == 10.0


def test_cancelled_request_is_skipped(pool):
    model = SlowModel(delay=0.05)

    async def main():
        b = MicroBatcher(model, pool, max_size=1, max_wait_ms=0)
        first = asyncio.ensure_future(b.predict(ready(1)))
        doomed = asyncio.ensure_future(b.predict(ready(2)))
        last = asyncio.ensure_future(b.predict(ready(3)))
        await asyncio.sleep(0.01)
        doomed.cancel()
        return await first, await last

    r1, r3 = asyncio.run(main())
    assert float(r1.output[0]) == 2.0 and float(r3.output[0]) == 6.0 and model.sizes == [1, 1]


# --- import hygiene --------------------------------------------------------------------------------

FORBIDDEN = "('torch', 'timm', 'torchvision', 'flask')"

SERVE_AND_PREDICT = f"""
import sys
import uvicorn

def fake_run(app, **kw):
    import time
    from fastapi.testclient import TestClient
    from PIL import Image
    import io
    buf = io.BytesIO(); Image.new("RGB", (64, 64), (200, 20, 20)).save(buf, "JPEG")
    with TestClient(app) as c:
        while c.get("/readyz").status_code != 200:
            time.sleep(0.02)
        r = c.post("/predict", content=buf.getvalue(), headers={{"content-type": "image/jpeg"}})
        assert r.json()["label"] == "red", r.text
    bad = sorted(m for m in sys.modules
                 if m.split(".")[0] in {FORBIDDEN} or m.startswith("food_classifier.training"))
    print("FORBIDDEN", bad)

uvicorn.run = fake_run
from food_classifier.cli import app
app(["serve", sys.argv[1], "--port", "0"], standalone_mode=False)
"""


def test_server_never_imports_torch(colour_bundle):
    """The real entry point (`food-classifier serve`), with uvicorn's run swapped for a TestClient."""
    out = subprocess.run([sys.executable, "-c", SERVE_AND_PREDICT, str(colour_bundle)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FORBIDDEN []" in out.stdout, out.stdout


def test_cli_module_imports_cheaply():
    code = ("import sys, food_classifier.cli.serve; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'fastapi', 'uvicorn', 'onnxruntime', 'numpy', 'PIL', 'torch', 'pydantic', 'starlette'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- CLI failure messages ----------------------------------------------------------------------------

def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "food_classifier.cli", "serve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_cli_without_bundle_says_what_to_do(monkeypatch):
    def broken():
        raise FileNotFoundError("no built-in model in this install")

    for builtin in (None, broken):
        result, started = invoke_serve(monkeypatch, builtin)
        assert result.exit_code == 2 and not started
        assert "pass one, e.g. `food-classifier serve models/food`" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_cli_serves_the_builtin_bundle_when_none_given(monkeypatch, colour_bundle):
    result, started = invoke_serve(monkeypatch, lambda: colour_bundle, "--port", "9999", "--ort-threads", "1")
    assert result.exit_code == 0, result.output
    settings = started["app"].state.settings
    assert settings.bundles == [colour_bundle] and settings.ort_threads == 1
    assert (started["host"], started["port"]) == ("0.0.0.0", 9999)


def test_cli_bad_arguments_fail_in_one_line(tmp_path):
    out = run_cli(str(tmp_path / "missing"))
    assert out.returncode == 2 and "no such bundle or model directory" in out.stderr
    out = run_cli(str(tmp_path), "--port", "70000")
    assert out.returncode == 2 and "invalid setting port" in out.stderr


def test_decoded_images_waiting_for_the_model_are_bounded(colour_bundle):
    """Backpressure: a 40-image batch never has more than `pending_limit` arrays decoded ahead."""
    from conftest import colour_image, image_bytes

    from food_classifier.bundle import model_sources
    from food_classifier.serving.registry import ModelRegistry
    from food_classifier.serving.service import ImageUpload, PredictionService
    from food_classifier.serving.settings import ServeSettings

    settings = ServeSettings(bundles=[colour_bundle], decode_threads=2, inference_workers=1, batch_max_size=2)
    registry = ModelRegistry(model_sources(settings.bundles), settings)
    service = PredictionService(registry, settings)
    live, peak = 0, 0
    original = service._prepare

    async def counting_prepare(model, *args):
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        return await original(model, *args)

    service._prepare = counting_prepare

    async def main():
        await registry.load_all()

        async def done_hook(coro):
            nonlocal live
            try:
                return await coro
            finally:
                live -= 1

        images = [ImageUpload(image_bytes(colour_image("blue", seed=i))) for i in range(40)]
        return await asyncio.gather(*(done_hook(service._classify(registry.get(), im.data, Options()))
                                      for im in images))

    results = asyncio.run(main())
    service.close()
    registry.close()
    assert all(r.label == "blue" for r in results)
    assert service.pending_limit == 2 * (2 + 1 * 2) and peak <= service.pending_limit


def test_memory_release_on_glibc():
    from food_classifier.serving import memory

    if memory._LIBC is None:
        pytest.skip("not glibc")
    assert memory.release() in (True, False) and memory.limit_arenas(2)
