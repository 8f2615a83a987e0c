"""Helpers several test modules share, so no test module imports another (importing one runs its module-level
skips and marks in the importer, and ties the two files' edits together).

Fixtures live in conftest.py; plain functions and constants live here.
"""

from __future__ import annotations

import json
import struct
import sys
import time
import zlib
from pathlib import Path

from conftest import COLOURS, colour_image, image_bytes

ROOT = Path(__file__).resolve().parents[1]  # the repository: cwd for CLI subprocesses
JPEG = "image/jpeg"


# --- the HTTP service in-process (TestClient: no socket) --------------------------------------------

def ready_client(settings):
    """A TestClient on `create_app(settings)`, lifespan entered, returned once /readyz answers 200."""
    from fastapi.testclient import TestClient

    from food_classifier.serving.http.app import create_app

    client = TestClient(create_app(settings))
    client.__enter__()
    deadline = time.monotonic() + 20
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.02)
    return client


def jpg(colour: str, **kw) -> bytes:
    return image_bytes(colour_image(colour, **kw))


def assert_error(r, status: int, code: str | None = None) -> dict:
    """The service's one error shape: `{"error": code, "detail": ...}` with `status`."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    if code:
        assert body["error"] == code, body
    return body


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's calling card)."""
    raw = image_bytes(colour_image("red", size=(8, 8)), "PNG")
    ihdr_at = raw.index(b"IHDR")
    body = bytearray(raw[ihdr_at:ihdr_at + 17])
    body[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(body)) & 0xFFFFFFFF)
    return raw[:ihdr_at] + bytes(body) + crc + raw[ihdr_at + 21:]


# --- batch scoring (predict-dir) ---------------------------------------------------------------------

def make_photos(root: Path, per_class: int = 4) -> Path:
    """Class folders of colour photos (JPEG and PNG), one nested a level deeper, plus files to ignore."""
    for c, name in enumerate(COLOURS):
        for i in range(per_class):
            sub = root / name / ("nested" if i == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            colour_image(name, seed=10 * c + i).save(sub / f"{name}{i}.{'png' if i % 2 else 'jpg'}")
    (root / "red" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    colour_image("red").save(root / ".hidden" / "x.jpg")
    return root


def read_rows(out: Path) -> list[dict]:
    """The rows predict-dir wrote, from JSON lines or Parquet."""
    if out.suffix == ".jsonl":
        return [json.loads(line) for line in out.read_text().splitlines()]
    import pyarrow.parquet as pq

    return pq.read_table(out).to_pylist()


# --- the `serve` command in-process -------------------------------------------------------------------

def invoke_serve(monkeypatch, builtin, *args: str):
    """Run `serve` in-process with a stand-in `food_classifier.builtin` and uvicorn.run captured."""
    import types

    import typer
    import uvicorn
    from typer.testing import CliRunner

    from food_classifier.cli.serve import serve

    if builtin is None:
        monkeypatch.setitem(sys.modules, "food_classifier.builtin", None)  # import fails
    else:
        mod = types.ModuleType("food_classifier.builtin")
        mod.builtin_bundle_path = builtin
        monkeypatch.setitem(sys.modules, "food_classifier.builtin", mod)
    monkeypatch.delenv("FOOD_CLASSIFIER_BUNDLES", raising=False)
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    cli = typer.Typer()
    cli.command()(serve)
    return CliRunner().invoke(cli, list(args)), started


# --- bundles ------------------------------------------------------------------------------------------

def update_meta(path, updates: dict) -> None:
    """Merge sections into a test bundle's bundle.json, validated through the schema (tests edit bundles that
    training would have written; the product writes a bundle once, at publish)."""
    import os

    from food_classifier.bundle import META_FILE, _for_writing

    meta_path = Path(path) / META_FILE
    data = json.loads(meta_path.read_text())
    meta = _for_writing({**data, **updates}, meta_path)
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta.to_json_dict(), indent=2))
    os.replace(tmp, meta_path)
