"""Fetch a dataset archive: resumable HTTP download, optional sha256 check, safe extraction.

Stdlib only (urllib, zipfile, tarfile). Layout under `dest/`:
    <name>.zip.part   partial download, kept so a rerun resumes with an HTTP Range request
    <name>.zip        the complete archive
    <name>/           the extracted archive; it appears (by rename) only when extraction finished
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from food_classifier.training.data import find_image_root
from food_classifier.training.progress import progress_bar
from food_classifier.training.sources import SOURCES, DataError

CHUNK = 1 << 16
TIMEOUT = 30  # seconds without data before a download counts as failed
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")


def fetch(source: str, dest: str | Path, sha256: str | None = None, progress: bool = True) -> Path:
    """Download and extract a SOURCES name or URL into dest/, skipping steps already done.

    Returns the folder holding the class subfolders (see find_image_root).
    """
    if source in SOURCES:
        url, sha256 = SOURCES[source]["url"], sha256 or SOURCES[source]["sha256"]
    elif "://" in source:
        url = source
    else:
        raise DataError(f"Unknown data source '{source}'; use a URL or one of: {', '.join(SOURCES)}.")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = posixpath.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path)) or "download.zip"
    archive = dest / name
    stem = next((name[: -len(s)] for s in ARCHIVE_SUFFIXES if name.lower().endswith(s)), name + ".d")
    out = dest / stem
    if out.is_dir():
        return find_image_root(out)
    if not archive.is_file():
        _download(url, archive, progress)
    if sha256:
        _check_sha256(archive, sha256, url)
    _extract(archive, out)
    return find_image_root(out)


def _check_sha256(archive: Path, expected: str, url: str) -> None:
    h = hashlib.sha256()
    with open(archive, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != expected.lower():
        archive.unlink()
        raise DataError(f"Download of {url} has sha256 {h.hexdigest()}, expected {expected}; the file was removed.")


def _download(url: str, archive: Path, progress: bool) -> None:
    """Stream url into <archive>.part, resuming from its current size; rename when complete."""
    part = archive.with_name(archive.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "food-classifier"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # our .part is no prefix of what the server has now: start over
            part.unlink()
            return _download(url, archive, progress)
        raise DataError(f"Could not download {url}: HTTP {e.code} {e.reason}.") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"Could not reach {url}: {reason}.") from None
    with resp:
        status = getattr(resp, "status", 200)
        if status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise DataError(f"Server for {url} answered the resume request with a wrong range; "
                                f"delete {part} and try again.")
            total = int(m.group(2)) if m.group(2) != "*" else None
        else:  # 200 (range ignored) or a plain first request: start from scratch
            have = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        mode = "ab" if have else "wb"
        with open(part, mode) as f, progress_bar(total=total, initial=have, unit="B", unit_scale=True,
                                         desc=archive.name, disable=not progress) as bar:
            try:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except OSError as e:  # includes timeouts and http.client.IncompleteRead
                raise DataError(f"Download of {url} stopped after {f.tell()} bytes ({e.__class__.__name__}); "
                                "run the same command again to resume.") from None
            got = f.tell()
    if total is not None and got != total:
        raise DataError(f"Download of {url} stopped after {got} of {total} bytes; "
                        "run the same command again to resume.")
    part.replace(archive)


# ----------------------------------------------------------------------------- safe extraction

def _safe_member(name: str, archive: Path) -> str:
    """Reject member names that could land outside the target folder."""
    n = name.replace("\\", "/")
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n) or ".." in n.split("/"):
        raise DataError(f"Archive {archive.name} contains an unsafe path '{name}' and was not extracted.")
    return n


def _safe_link(name: str, target: str, archive: Path) -> None:
    """A symlink must point inside the archive: relative, and not climbing above the root."""
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target.replace("\\", "/")))
    if target.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", target) or resolved.split("/")[0] == "..":
        raise DataError(f"Archive {archive.name} contains a link '{name}' -> '{target}' pointing outside it "
                        "and was not extracted.")


def _extract(archive: Path, out: Path) -> None:
    """Check every member first, extract into a temp folder, rename it to `out` when done."""
    tmp = out.with_name(f".{out.name}.extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, tmp)
        else:
            raise DataError(f"{archive} is not a zip or tar archive; delete it and check the URL.")
        tmp.replace(out)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"Could not extract {archive} ({e}); delete it and run again.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_zip(archive: Path, tmp: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = [(info, _safe_member(info.filename, archive)) for info in zf.infolist()]
        links = [info for info, _ in members if stat.S_ISLNK(info.external_attr >> 16)]
        for info in links:
            _safe_link(info.filename, zf.read(info).decode("utf-8", "replace"), archive)
        tmp.mkdir(parents=True)
        for info, name in members:
            if info in links:  # zipfile would write a link as a text file; an inside link adds nothing
                continue
            target = tmp / name
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)


def _extract_tar(archive: Path, tmp: Path) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for m in members:
            _safe_member(m.name, archive)
            if m.issym():
                _safe_link(m.name, m.linkname, archive)
            elif m.islnk():
                _safe_member(m.linkname, archive)
        keep = [m for m in members if m.isfile() or m.isdir() or m.issym() or m.islnk()]  # no devices/fifos
        tmp.mkdir(parents=True)
        tf.extractall(tmp, members=keep, filter="data")  # the stdlib filter re-checks all of the above
