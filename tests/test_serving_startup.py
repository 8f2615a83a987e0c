"""Which bundle version a server loads, and what it does when none loads (issue 15, items 1-2).

A `train` killed during publish leaves `.tmp-<version>/`; a version can be corrupt (unparsable
bundle.json, missing file, wrong sha256). The server skips them with a warning and a metric and
serves the newest valid version; with no valid version the real server exits non-zero.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_colour_bundle
from helpers import JPEG, jpg, ready_client, update_meta

from food_classifier.bundle import file_sha256
from food_classifier.serving.settings import ServeSettings
from food_classifier.testing import ServerProcess


def published(model: Path, version: str, month: int, sha: bool = True) -> Path:
    b = make_colour_bundle(model / version, version=version, created_at=f"2026-{month:02d}-01T00:00:00+00:00")
    if sha:
        update_meta(b, {"variants": {"fp32": {"file": "model.onnx", "sha256": file_sha256(b / "model.onnx")}}})
    return b


def half_published(model: Path, version: str) -> Path:
    """What a kill between write_files and the rename leaves: a complete-looking, newer bundle."""
    b = make_colour_bundle(model.parent / "scratch" / version, version=version,
                           created_at="2027-01-01T00:00:00+00:00")
    tmp = model / f".tmp-{version}-k1ll3d"
    shutil.move(b, tmp)
    return tmp


def corrupt(model: Path) -> None:
    """v4: unparsable bundle.json; v3: a model file missing; v2: a model file changed after publish."""
    (published(model, "v4", 4) / "bundle.json").write_text('{"format": "food_classifier.bundle/2", "na')
    (published(model, "v3", 3) / "model.onnx").unlink()
    with open(published(model, "v2", 2) / "model.onnx", "ab") as f:
        f.write(b"\0")


def test_broken_and_temporary_versions_are_skipped_and_counted(tmp_path):
    model = tmp_path / "models" / "colour"
    published(model, "v1", 1)
    corrupt(model)
    half_published(model, "v9")
    c = ready_client(ServeSettings(bundles=[model], admin_key="admin-key"))
    c.headers["X-API-Key"] = "admin-key"  # reload needs the admin key
    try:
        assert c.get("/readyz").json()["models"] == {"colour": "v1"}
        assert c.post("/predict", content=jpg("red"), headers={"content-type": JPEG}).json()["model_version"] == "v1"
        assert f'food_classifier_model_versions_skipped_total{{source="{model}"}} 3.0' in c.get("/metrics").text
        # an older broken version no longer blocks reloads; a newer valid one is picked up
        published(model, "v5", 5)
        r = c.post("/v1/models/colour/reload")
        assert r.status_code == 200 and r.json()["version"] == "v5"
        # a broken newest version: reload says so (409) and keeps serving
        (published(model, "v6", 6) / "bundle.json").write_text("{")
        r = c.post("/v1/models/colour/reload")
        assert r.status_code == 409 and "v6" in r.json()["detail"] and "still serving version v5" in r.json()["detail"]
    finally:
        c.__exit__(None, None, None)


@pytest.mark.live
def test_real_server_serves_the_newest_valid_version(tmp_path):
    model = tmp_path / "models" / "colour"
    published(model, "v1", 1)
    corrupt(model)
    half_published(model, "v9")
    log = tmp_path / "server.log"
    with ServerProcess([tmp_path / "models"], args=["--ort-threads", "1"], log_path=log) as srv:
        import httpx

        assert httpx.get(srv.url + "/readyz").json()["models"] == {"colour": "v1"}
    text = log.read_text()
    assert "skipping broken bundle version" in text and "v4/bundle.json is not valid JSON" in text
    assert "v2/model.onnx: sha256 does not match" in text and ".tmp-v9" not in text


@pytest.mark.live
def test_real_server_exits_non_zero_when_no_version_is_valid(tmp_path):
    model = tmp_path / "models" / "colour"
    corrupt(model)
    half_published(model, "v9")  # a temporary is no fallback
    log = tmp_path / "server.log"
    srv = ServerProcess([model], args=["--ort-threads", "1"], log_path=log, ready_timeout=60)
    with pytest.raises(RuntimeError, match="server exited with 3"):
        srv.start()
    text = log.read_text()
    assert "cannot serve, shutting down with exit status 3" in text
    assert f"no loadable version under {model}: v4: " in text and "v3: " in text and "v2: " in text
    assert json.loads((model / "v3" / "bundle.json").read_text())["name"] == "colour"  # nothing was deleted


def test_serve_without_a_bundle_names_the_train_extra_when_torch_is_missing(tmp_path):
    """The built-in model is built by a torch subprocess: without torch, one clear error up front."""
    import os
    import subprocess
    import sys

    hide_torch = ("import runpy, sys; sys.modules['torch'] = None; sys.argv[0] = 'food-classifier'; "  # find_spec
                  "runpy.run_module('food_classifier.cli', run_name='__main__')")  # -> None
    out = subprocess.run([sys.executable, "-c", hide_torch, "serve", "--port", "1"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "FOOD_CLASSIFIER_CACHE": str(tmp_path)})
    assert out.returncode == 2, out.stderr
    assert "no bundle given and no built-in model available" in out.stderr
    assert "missing: torch" in out.stderr and "pip install 'food-classifier[train]'" in out.stderr
    assert list(tmp_path.iterdir()) == []  # no build was started
