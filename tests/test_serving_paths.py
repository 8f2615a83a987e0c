"""The seed-compatible `GET /predict?model_type=&image_path=`: reads only under the allowed roots.

Every escape (`..`, absolute paths, symlinks leading out, URL-encoded tricks) is a 403.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import assert_error, jpg, ready_client

from food_classifier.serving.settings import ServeSettings

# --- seed-compatible GET /predict ----------------------------------------------------------------

@pytest.fixture(scope="module")
def path_setup(colour_bundle, tmp_path_factory):
    base = tmp_path_factory.mktemp("paths")
    root, outside = base / "root", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "green.jpg").write_bytes(jpg("green"))
    (root / "weird%2e%2e").mkdir()
    (outside / "secret.jpg").write_bytes(jpg("red"))
    os.symlink(outside / "secret.jpg", root / "link.jpg")
    os.symlink(outside, root / "linkdir")
    c = ready_client(ServeSettings(bundles=[colour_bundle], allow_path_root=[root]))
    yield c, root, outside
    c.__exit__(None, None, None)


def test_seed_get_predict_disabled_by_default(colour_bundle):
    client = ready_client(ServeSettings(bundles=[colour_bundle]))
    try:
        assert_error(client.get("/predict", params={"image_path": "x.jpg"}), 403, "path_access_disabled")
    finally:
        client.__exit__(None, None, None)


def test_seed_get_predict_reads_under_root(path_setup):
    c, root, _ = path_setup
    for p in ("sub/green.jpg", str(root / "sub" / "green.jpg"), "sub/../sub/green.jpg"):
        r = c.get("/predict", params={"model_type": "colour", "image_path": p})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"label", "label_idx", "confidence"} and body["label"] == "green"
    assert c.get("/predict", params={"image_path": "sub/green.jpg"}).json()["label"] == "green"  # default model
    assert_error(c.get("/predict", params={"model_type": "nope", "image_path": "sub/green.jpg"}), 404)


@pytest.mark.parametrize("raw_query", [
    "image_path=../outside/secret.jpg",
    "image_path=sub/../../outside/secret.jpg",
    "image_path=%2e%2e%2foutside%2fsecret.jpg",
    "image_path=%2E%2E/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
    "image_path=/etc/passwd",
    "image_path=%2Fetc%2Fpasswd",
    "image_path=//etc/passwd",
    "image_path=link.jpg",
    "image_path=linkdir/secret.jpg",
    "image_path=../outside/no-such-file.jpg",
])
def test_seed_get_predict_refuses_escapes(path_setup, raw_query):
    c, _, outside = path_setup
    assert_error(c.get(f"/predict?{raw_query}"), 403, "path_forbidden")
    r = c.get("/predict", params={"image_path": str(outside / "secret.jpg")})
    assert_error(r, 403, "path_forbidden")


@pytest.mark.parametrize("raw_query,status", [
    ("image_path=%252e%252e%252foutside%252fsecret.jpg", 404),  # decoded once: a literal '%2e%2e' name
    ("image_path=weird%252e%252e", 404),  # a directory, not a file
    ("image_path=sub/missing.jpg", 404),
    ("image_path=sub%00/green.jpg", 422),
    ("image_path=", 422),
])
def test_seed_get_predict_odd_paths(path_setup, raw_query, status):
    c, _, _ = path_setup
    assert_error(c.get(f"/predict?{raw_query}"), status)


def test_path_guard_unit(tmp_path):
    from food_classifier.serving.errors import Forbidden
    from food_classifier.serving.http.paths import PathGuard

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "a.jpg").write_bytes(b"x")
    guard = PathGuard([tmp_path / "r"])
    assert guard.resolve("a.jpg") == Path(os.path.realpath(tmp_path / "r" / "a.jpg"))
    with pytest.raises(Forbidden):
        guard.resolve(str(tmp_path / "r" / ".." / "r2" / "a.jpg"))
    assert not PathGuard([]).enabled
