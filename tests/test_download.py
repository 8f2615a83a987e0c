"""fetch() against a real local HTTP server that supports Range requests and can drop connections."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from food_classifier.training import sources
from food_classifier.training.download import fetch
from food_classifier.training.sources import DEFAULT_SOURCE, SOURCES, DataError


class FileServer:
    """Serves `files` by path; logs (path, Range header); `cut[path] = n` drops the next response after n bytes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}
        self.honour_range = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.log.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                start = int(m.group(1)) if m and server.honour_range else 0
                if start >= len(body) and start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                n = server.cut.pop(self.path, None)
                self.wfile.write(body[start:] if n is None else body[start:start + n])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def add(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.url(path)


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, "JPEG")
    return buf.getvalue()


TREE = {  # an ImageFolder inside two wrapper folders, with macOS junk beside it
    "pack/food/pizza/p1.jpg": jpeg((200, 40, 40)),
    "pack/food/pizza/p2.jpg": jpeg((210, 60, 40)),
    "pack/food/sushi/s1.jpg": jpeg((240, 240, 230)),
    "pack/food/sushi/s2.jpg": jpeg((230, 230, 240)),
    "pack/food/.DS_Store": b"\0junk",
    "__MACOSX/pack/food/pizza/._p1.jpg": b"\0\5\26\7",
}


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return buf.getvalue()


def make_tgz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


def test_sources_table():
    assert DEFAULT_SOURCE in SOURCES
    assert all(s["url"].startswith(("http://", "https://")) and "sha256" in s for s in SOURCES.values())


def test_fetch_zip_returns_class_root_and_skips_when_done(server, tmp_path):
    url = server.add("/files/food.zip", make_zip(TREE))
    root = fetch(url, tmp_path / "dest", progress=False)
    assert root == tmp_path / "dest" / "food" / "pack" / "food"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["pizza", "sushi"]
    assert (root / "pizza" / "p1.jpg").read_bytes() == TREE["pack/food/pizza/p1.jpg"]
    assert not (tmp_path / "dest" / "food.zip.part").exists()
    requests = len(server.log)
    assert fetch(url, tmp_path / "dest", progress=False) == root
    assert len(server.log) == requests  # neither downloaded nor extracted again


def test_fetch_tar_gz(server, tmp_path):
    url = server.add("/food.tar.gz", make_tgz(TREE))
    root = fetch(url, tmp_path / "dest", progress=False)
    assert root == tmp_path / "dest" / "food" / "pack" / "food"
    assert (root / "sushi" / "s2.jpg").read_bytes() == TREE["pack/food/sushi/s2.jpg"]


def test_sha256_match_and_named_source(server, tmp_path, monkeypatch):
    body = make_zip(TREE)
    url = server.add("/named.zip", body)
    monkeypatch.setitem(sources.SOURCES, "local", {"url": url, "sha256": hashlib.sha256(body).hexdigest()})
    root = fetch("local", tmp_path / "dest", progress=False)
    assert root.name == "food" and (root / "pizza").is_dir()


def test_sha256_mismatch_removes_the_file(server, tmp_path):
    url = server.add("/food.zip", make_zip(TREE))
    with pytest.raises(DataError, match=r"sha256 [0-9a-f]{64}, expected 0{64}"):
        fetch(url, tmp_path / "dest", sha256="0" * 64, progress=False)
    assert list((tmp_path / "dest").iterdir()) == []


@pytest.mark.parametrize("bad_name", ["pack/../../evil.txt", "../evil.txt", "ABSOLUTE"])
def test_unsafe_zip_members_are_refused(server, tmp_path, bad_name):
    outside = tmp_path / "evil.txt"
    name = str(outside) if bad_name == "ABSOLUTE" else bad_name
    url = server.add("/evil.zip", make_zip({**TREE, name: b"pwned"}))
    dest = tmp_path / "a" / "dest"
    with pytest.raises(DataError, match="unsafe path"):
        fetch(url, dest, progress=False)
    assert files_under(tmp_path) == {dest / "evil.zip"}  # nothing extracted, inside or outside dest


def test_zip_symlink_pointing_out_is_refused(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, body in TREE.items():
            zf.writestr(name, body)
        link = zipfile.ZipInfo("pack/food/pizza/p3.jpg")
        link.external_attr = 0o120777 << 16  # a symlink, as `zip --symlinks` stores it
        zf.writestr(link, "../../../../../etc/passwd")
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="pointing outside"):
        fetch(server.add("/link.zip", buf.getvalue()), dest, progress=False)
    assert files_under(tmp_path) == {dest / "link.zip"}


def test_unsafe_tar_members_are_refused(server, tmp_path):
    dest = tmp_path / "a" / "dest"
    url = server.add("/dotdot.tar.gz", make_tgz({**TREE, "../evil.txt": b"pwned"}))
    with pytest.raises(DataError, match="unsafe path '../evil.txt'"):
        fetch(url, dest, progress=False)
    url = server.add("/abs.tar.gz", make_tgz({**TREE, str(tmp_path / "evil.txt"): b"pwned"}))
    with pytest.raises(DataError, match="unsafe path"):
        fetch(url, dest, progress=False)
    url = server.add("/link.tar.gz", make_tgz(TREE, links={"pack/food/out": "../../../../secrets"}))
    with pytest.raises(DataError, match="link 'pack/food/out' -> '../../../../secrets' pointing outside"):
        fetch(url, dest, progress=False)
    assert files_under(tmp_path) == {dest / n for n in ("dotdot.tar.gz", "abs.tar.gz", "link.tar.gz")}
    assert not list(tmp_path.rglob("out"))


def test_tar_symlink_inside_the_archive_is_fine(server, tmp_path):
    url = server.add("/ok.tar.gz", make_tgz(TREE, links={"pack/food/sushi/s3.jpg": "s1.jpg"}))
    root = fetch(url, tmp_path / "dest", progress=False)
    assert (root / "sushi" / "s3.jpg").read_bytes() == TREE["pack/food/sushi/s1.jpg"]


def test_interrupted_download_resumes_with_range(server, tmp_path):
    body = make_zip(TREE)
    url = server.add("/big.zip", body)
    server.cut["/big.zip"] = 1000
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="stopped after 1000 of .* bytes.*resume"):
        fetch(url, dest, progress=False)
    part = dest / "big.zip.part"
    assert part.read_bytes() == body[:1000]
    root = fetch(url, dest, sha256=hashlib.sha256(body).hexdigest(), progress=False)
    assert server.log == [("/big.zip", None), ("/big.zip", "bytes=1000-")]
    assert (dest / "big.zip").read_bytes() == body
    assert not part.exists()
    assert (root / "pizza" / "p2.jpg").is_file()


def test_resume_restarts_when_server_ignores_range(server, tmp_path):
    body = make_zip(TREE)
    url = server.add("/food.zip", body)
    server.honour_range = False
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "food.zip.part").write_bytes(b"stale bytes from another file")
    fetch(url, dest, progress=False)
    assert server.log == [("/food.zip", "bytes=29-")]
    assert (dest / "food.zip").read_bytes() == body


def test_404_is_a_data_error_naming_the_url(server, tmp_path):
    url = server.url("/missing.zip")
    with pytest.raises(DataError, match=re.escape(url) + ".*404"):
        fetch(url, tmp_path / "dest", progress=False)


def test_unreachable_host_and_unknown_source(server, tmp_path):
    url = server.url("/x.zip")
    server.httpd.shutdown()
    server.httpd.server_close()
    with pytest.raises(DataError, match=re.escape(url)):
        fetch(url, tmp_path / "dest", progress=False)
    with pytest.raises(DataError, match="Unknown data source 'nope'.*pizza_steak_sushi"):
        fetch("nope", tmp_path / "dest", progress=False)


def test_not_an_archive(server, tmp_path):
    url = server.add("/page.zip", b"<html>not found</html>")
    with pytest.raises(DataError, match="not a zip or tar archive"):
        fetch(url, tmp_path / "dest", progress=False)
