"""Issue 16, the first hour of a new user: readable help, honest exit codes, UTF-8 JSON, the offline hint,
the demo's example prediction, and the recommended variant served by default."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from conftest import colour_image, make_colour_bundle
from helpers import ready_client, update_meta
from PIL import Image
from typer.testing import CliRunner

from food_classifier.cli import app
from food_classifier.inference import Classifier
from food_classifier.serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "food_classifier.cli"]


def run(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=120, env={**os.environ, **(env or {})}, **kw)


def command_paths() -> list[list[str]]:
    """Every command and group of the real CLI, `serve` (added on demand) included."""
    paths, todo = [], [([], typer.main.get_command(app))]
    while todo:
        path, cmd = todo.pop()
        paths.append(path)
        if hasattr(cmd, "list_commands"):  # a group (typer vendors its own click)
            ctx = cmd.context_class(cmd)
            todo += [([*path, name], cmd.get_command(ctx, name)) for name in cmd.list_commands(ctx)]
    return paths


def test_every_help_is_readable_at_80_columns():
    runner, group = CliRunner(), typer.main.get_command(app)
    paths = command_paths()
    assert ["models", "gc"] in paths and ["serve"] in paths and ["data", "prepare"] in paths
    for path in paths:
        out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert out.exit_code == 0, (path, out.output)
        text = out.output
        assert all(len(line) <= 80 for line in text.splitlines()), path
        commands = text.partition("Commands:")[2].splitlines()
        assert "…" not in text and not any(line.endswith("...") for line in commands), text  # nothing elided
        flat = " ".join(text.split())  # word by word, as read: a word cut in two would not match
        cmd = group
        for name in path:
            cmd = cmd.get_command(cmd.context_class(cmd), name)
        for param in cmd.params:
            if getattr(param, "help", None):
                assert " ".join(param.help.split()) in flat, (path, param.name)
            default = getattr(param, "default", None)
            if getattr(param, "show_default", False) and isinstance(default, str | Path) and str(default):
                assert f"default: {default}" in flat, (path, param.name)


def test_predict_exits_1_on_an_unreadable_image_and_still_answers_the_rest(colour_bundle, tmp_path):
    colour_image("red").save(tmp_path / "red.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    out = run("predict", "--model", str(colour_bundle), str(tmp_path / "red.png"), str(tmp_path / "bad.jpg"),
              str(tmp_path / "missing.jpg"), text=True)
    assert out.returncode == 1
    assert "red.png: red" in out.stdout
    assert "bad.jpg: error" in out.stderr and "missing.jpg: error" in out.stderr
    assert "2 of 3 image(s) could not be read" in out.stderr and "Traceback" not in out.stderr
    ok = run("predict", "--model", str(colour_bundle), str(tmp_path / "red.png"), text=True)
    assert ok.returncode == 0


def test_predict_json_is_utf8_not_escaped(tmp_path):
    bundle = make_colour_bundle(tmp_path / "models" / "dishes" / "v1", name="dishes")
    update_meta(bundle, {"labels": ["crème brûlée", "pâté", "smørrebrød"]})
    photo = tmp_path / "crêpe rouge.png"
    colour_image("red").save(photo)
    # an ASCII terminal encoding changes nothing: the JSON lines are written as UTF-8 bytes
    out = run("predict", "--json", "--model", str(bundle), str(photo), env={"PYTHONIOENCODING": "ascii"})
    assert out.returncode == 0, out.stderr
    assert b"\\u00" not in out.stdout and "crème brûlée".encode() in out.stdout
    answer = json.loads(out.stdout.decode("utf-8"))
    assert (answer["label"], answer["image"]) == ("crème brûlée", str(photo))


def test_offline_data_prepare_says_how_to_use_a_local_folder(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: the download cannot connect
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "FOOD_CLASSIFIER_DATA"}
    out = subprocess.run([*CLI, "data", "prepare", "--manifest", str(tmp_path / "m.csv"), "--source",
                          f"http://127.0.0.1:{port}/photos.zip"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "Could not reach" in out.stderr
    assert "make demo DATA=~/my_photos" in out.stderr and "FOOD_CLASSIFIER_DATA=~/my_photos" in out.stderr


def test_data_prepare_expands_a_tilde_in_food_classifier_data(tmp_path):
    from conftest import make_imagefolder

    make_imagefolder(tmp_path / "home" / "my photos", per_class=6)
    out = run("data", "prepare", "--manifest", str(tmp_path / "m.csv"),
              env={"HOME": str(tmp_path / "home"), "FOOD_CLASSIFIER_DATA": "~/my photos"}, text=True)
    assert out.returncode == 0, out.stderr
    assert "18 images" in out.stdout


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_example_quotes_paths_with_spaces_and_fails_when_predict_fails(colour_bundle, tmp_path):
    folder = tmp_path / "my photos, 2026"
    folder.mkdir()
    colour_image("blue").save(folder / "blue dish.png")
    (folder / "broken dish.jpg").write_bytes(b"not a photo")
    bin_dir = Path(sys.executable).parent
    for photo, code in (("blue dish.png", 0), ("broken dish.jpg", 2)):
        manifest = tmp_path / f"manifest {code}.csv"
        manifest.write_text(f'path,label,tier,sha256\n"{folder / "x.png"}",blue,train,0\n'
                            f'"{folder / photo}",blue,test,0\n')
        out = make("example", f"BIN={bin_dir}", f"MANIFEST={manifest}", f"MODEL={colour_bundle}")
        assert out.returncode == code, out.stdout + out.stderr
        if code == 0:
            assert f"{folder / photo}: blue" in out.stdout
        else:
            assert "broken dish.jpg: error" in out.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_data_sets_the_local_dataset():
    out = make("--eval", "show-data: ; @echo \"[$$FOOD_CLASSIFIER_DATA]\"", "show-data", "DATA=/home/me/my photos")
    assert out.returncode == 0 and out.stdout.strip() == "[/home/me/my photos]", out.stderr


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory) -> Path:
    """A model dir whose bundle ships an 'int8' file that answers differently (another scale) from fp32."""
    tmp = tmp_path_factory.mktemp("int8")
    bundle = make_colour_bundle(tmp / "colour" / "v1")
    other = make_colour_bundle(tmp / "other" / "v1", scale=1.0)
    shutil.copy(other / "model.onnx", bundle / "model.int8.onnx")
    update_meta(bundle, {"variants": {"fp32": {"file": "model.onnx"},
                                      "int8": {"file": "model.int8.onnx", "recommended": True}}})
    return tmp / "colour"


@pytest.mark.parametrize("flags, served", [({}, "int8"), ({"variant": ["fp32"]}, "fp32"),
                                           ({"variant": ["colour=fp32"]}, "fp32")])
def test_serve_defaults_to_the_recommended_variant(int8_model, flags, served):
    from conftest import image_bytes

    assert ServeSettings(**flags).variant_for("colour") == ("auto" if not flags else "fp32")
    expected = Classifier(int8_model, variant=served).predict(colour_image("green")).confidence
    other = Classifier(int8_model, variant="fp32" if served == "int8" else "int8").predict(colour_image("green"))
    assert abs(expected - other.confidence) > 0.01  # the two files really answer differently
    client = ready_client(ServeSettings(bundles=[int8_model], **flags))
    try:
        (info,) = client.get("/v1/models").json()["models"]
        assert (info["variant"], info["variants"]) == (served, ["fp32", "int8"])
        r = client.post("/predict", content=image_bytes(colour_image("green")), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["label"] == "green"
        assert r.json()["confidence"] == pytest.approx(expected, abs=0.02)  # JPEG vs in-memory image
    finally:
        client.__exit__(None, None, None)


def test_predict_takes_the_recommended_variant_too(int8_model, tmp_path):
    colour_image("green").save(tmp_path / "g.png")
    auto = json.loads(run("predict", "--json", "--model", str(int8_model), str(tmp_path / "g.png")).stdout)
    fp32 = json.loads(run("predict", "--json", "--variant", "fp32", "--model", str(int8_model),
                          str(tmp_path / "g.png")).stdout)
    assert auto["confidence"] == pytest.approx(Classifier(int8_model, variant="int8").predict(
        tmp_path / "g.png").confidence, abs=1e-6)
    assert abs(auto["confidence"] - fp32["confidence"]) > 0.01


def blocks(seed: int, size: tuple[int, int] = (180, 160)) -> Image.Image:
    """A photo with coarse structure, so a resized copy is a near-duplicate (dHash) and others are not."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 9, 3)).astype(np.uint8)).resize(size, Image.NEAREST)


def test_split_prints_rejected_files_duplicate_groups_and_moved_photos(tmp_path):
    root = tmp_path / "my photos"
    for tier, n in (("train", 8), ("test", 3)):
        for c, name in enumerate(("red", "green", "blue")):
            (root / tier / name).mkdir(parents=True)
            for i in range(n):
                blocks(1000 * c + (500 if tier == "test" else 0) + i).save(root / tier / name / f"{name}_{i}.jpg",
                                                                         quality=95)
    blocks(500).resize((120, 107)).save(root / "train" / "red" / "red_copy.jpg", quality=80)  # of test/red/red_0
    shutil.copy(root / "train" / "blue" / "blue_1.jpg", root / "train" / "blue" / "blue_1 (1).jpg")
    for i in range(12):
        (root / "train" / "green" / f"broken_{i:02d}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = run("data", "split", str(root), "--manifest", str(tmp_path / "m.csv"), text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "rejected: 12 file(s), skipped" in text
    shown = re.findall(r"^  train/green/broken_(\d\d)\.jpg: (.+)$", text, re.M)
    assert [n for n, _ in shown] == [f"{i:02d}" for i in range(10)] and all("corrupt" in why or "readable" in why
                                                                          for _, why in shown)
    assert "  ... and 2 more" in text
    assert "duplicate groups: 2 (4 photos, each group kept in one tier)" in text
    assert re.search(r"^  train/blue/blue_1 \(1\)\.jpg = train/blue/blue_1\.jpg \(exact copies\)$", text, re.M)
    assert "moved to a stricter tier with their near-copies: 1" in text
    assert "  train/red/red_copy.jpg: train -> test, a near-copy of test/red/red_0.jpg" in text
    assert "12 rejected, 2 duplicate groups, 1 moved" in text
    tiers = {str(Path(r["path"]).relative_to(root)): r["tier"] for r in csv.DictReader(open(tmp_path / "m.csv"))}
    assert tiers["train/red/red_copy.jpg"] == tiers["test/red/red_0.jpg"] == "test"
