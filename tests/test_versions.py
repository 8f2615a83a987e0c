"""Versions (issue 16 item 6): promotion pins what every loader takes; rm and gc never drop it or what is served."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from conftest import ADMIN_KEY, colour_image, make_colour_bundle

from food_classifier.bundle import PROMOTED_FILE, BundleError, load_newest, newest_bundle, promoted_version
from food_classifier.inference import Classifier
from food_classifier.testing import ServerProcess
from food_classifier.versions import gc, list_versions, promote, remove, size_bytes, unpromote

CLI = [sys.executable, "-m", "food_classifier.cli"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80"})


def publish(models, *versions: str, name: str = "colour") -> None:
    """Versions v1, v2, ... created one day apart, in the order given."""
    for day, v in enumerate(versions, start=1):
        make_colour_bundle(models / name / v, version=v, name=name, created_at=f"2026-01-{day:02d}T00:00:00+00:00")


def test_a_promoted_version_is_what_every_loader_takes(tmp_path):
    models = tmp_path / "models"
    publish(models, "v1", "v2")
    model = models / "colour"
    assert Classifier(model).version == "v2" and promoted_version(model) is None  # newest by default
    promote(models, "colour", "v1")
    assert (model / PROMOTED_FILE).read_text() == "v1\n"
    assert Classifier(model).version == "v1" and newest_bundle(model).name == "v1"
    make_colour_bundle(model / "v3", version="v3", created_at="2026-02-01T00:00:00+00:00")  # a new experiment
    assert load_newest(model).version == "v1"  # ...does not replace what is served
    assert unpromote(models, "colour") == "v1" and not (model / PROMOTED_FILE).exists()
    assert Classifier(model).version == "v3"


def test_a_broken_promoted_version_fails_loudly_instead_of_serving_another(tmp_path):
    models = tmp_path / "models"
    publish(models, "v1", "v2")
    promote(models, "colour", "v1")
    (models / "colour" / "v1" / "model.onnx").unlink()
    with pytest.raises(BundleError, match="promoted version v1 .* cannot be loaded.*model.onnx"):
        load_newest(models / "colour")
    with pytest.raises(BundleError, match="not a published version"):
        promote(models, "colour", "v9")
    (models / "colour" / "v2" / "model.onnx").write_bytes(b"broken")
    with pytest.raises(BundleError, match="sha256|ONNX|model"):  # never promote what cannot be loaded
        promote(models, "colour", "v2")


@pytest.mark.live
def test_serve_and_reload_take_the_promoted_version(tmp_path):
    models = tmp_path / "models"
    publish(models, "v1", "v2")
    with ServerProcess([models / "colour"], args=["--ort-threads", "1"],
                       env={"FOOD_CLASSIFIER_ADMIN_KEY": ADMIN_KEY}) as srv:
        assert httpx.get(srv.url + "/readyz").json()["models"] == {"colour": "v2"}
        out = cli("models", "promote", "colour", "v1", "--models-dir", str(models))
        assert out.returncode == 0 and "promoted colour v1" in out.stdout, out.stderr
        r = httpx.post(srv.url + "/v1/models/colour/reload", headers={"X-API-Key": ADMIN_KEY}, timeout=30)
        assert r.status_code == 200 and (r.json()["previous_version"], r.json()["version"]) == ("v2", "v1")
    with ServerProcess([models / "colour"], args=["--ort-threads", "1"]) as srv:  # a fresh start too
        assert httpx.get(srv.url + "/v1/models/colour").json()["version"] == "v1"


def test_rm_refuses_the_promoted_version_and_frees_the_others(tmp_path):
    models = tmp_path / "models"
    publish(models, "v1", "v2")
    promote(models, "colour", "v2")
    with pytest.raises(BundleError, match="v2 is promoted"):
        remove(models, "colour", "v2")
    size = size_bytes(models / "colour" / "v1")
    assert remove(models, "colour", "v1") == size > 0
    assert [i.version for i in list_versions(models / "colour")] == ["v2"]
    out = cli("models", "rm", "colour", "v7", "--models-dir", str(models))
    assert out.returncode == 1 and "no such version (versions: v2)" in out.stderr and "Traceback" not in out.stderr
    out = cli("models", "rm", "pizza", "v1", "--models-dir", str(models))
    assert out.returncode == 1 and "no model named 'pizza'" in out.stderr


def make_run(runs, name: str, bundle=None) -> None:
    run = runs / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {}, "manifest": "m.csv"}))
    (run / "best.pt").write_bytes(b"\0" * 5000)
    if bundle is not None:
        (run / "bundle_path.txt").write_text(f"{bundle.resolve()}\n")


def test_gc_keeps_newest_promoted_and_served_and_removes_old_runs(tmp_path):
    models, runs = tmp_path / "models", tmp_path / "runs"
    publish(models, "v1", "v2", "v3", "v4", "v5")
    publish(models, "w1", "w2", name="other")
    model = models / "colour"
    promote(models, "colour", "v1")
    for v in ("v2", "v4"):
        make_run(runs, f"run-{v}", model / v)
    make_run(runs, "run-unpublished")  # interrupted or still training: left alone
    crashed = model / ".tmp-v6-abc"
    crashed.mkdir()
    os.utime(crashed, (0, 0))

    preview = gc(models, keep=2, runs_dir=runs, dry_run=True)
    assert sorted(p.name for p in preview.removed_versions) == ["v2", "v3"]
    assert all(p.exists() for p in preview.removed_versions) and (runs / "run-v2").exists()

    expected = size_bytes(model / "v2") + size_bytes(model / "v3") + size_bytes(runs / "run-v2")
    result = gc(models, keep=2, runs_dir=runs)
    assert result.kept == {"colour": ["v5", "v4", "v1"], "other": ["w2", "w1"]}
    assert sorted(p.name for p in model.iterdir()) == [PROMOTED_FILE, "v1", "v4", "v5"]  # crashed tmp gone too
    assert sorted(p.name for p in runs.iterdir()) == ["run-unpublished", "run-v4"]
    assert result.freed_bytes == expected
    assert load_newest(model).version == "v1"


def test_gc_never_removes_the_served_version_behind_broken_newer_ones(tmp_path):
    models = tmp_path / "models"
    publish(models, "v1", "v2", "v3")
    for v in ("v2", "v3"):
        (models / "colour" / v / "model.onnx").write_bytes(b"truncated")
    assert load_newest(models / "colour", Classifier).version == "v1"  # what a server loads now
    result = gc(models, keep=1)
    assert result.kept == {"colour": ["v3", "v1"]} and [p.name for p in result.removed_versions] == ["v2"]


def test_models_list_and_gc_commands(tmp_path):
    models = tmp_path / "models"
    publish(models, "v1", "v2", "v3")
    (models / "colour" / "v2" / "model.onnx").unlink(missing_ok=True)
    assert cli("models", "promote", "colour", "v1", "--models-dir", str(models)).returncode == 0
    out = cli("models", "list", "--models-dir", str(models))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("colour  (") and "3 version(s)" in lines[0] and "no version loads" not in lines[0]
    assert "  v3" in lines and "  v1  [served, promoted]" in lines
    assert any(line.strip().startswith("broken:") and "model.onnx" in line for line in lines)
    assert any("test 1.000" in line and "variants fp32 (serves fp32)" in line for line in lines)
    out = cli("models", "gc", "--keep", "1", "--models-dir", str(models), "--runs-dir", str(tmp_path / "runs"))
    assert out.returncode == 0, out.stderr
    assert f"removed {models / 'colour' / 'v2'}" in out.stdout and "colour: kept v3, v1" in out.stdout
    assert "removed 1 version(s) and 0 run(s)" in out.stdout

    # predict --model on the model dir takes the promoted version as well
    colour_image("red").save(tmp_path / "red.png")
    out = cli("predict", "--json", "--model", str(models / "colour"), str(tmp_path / "red.png"))
    assert out.returncode == 0 and json.loads(out.stdout)["label"] == "red"
