"""The model bundle: the one artefact shared by the training side (writer) and serving (reader).

A bundle is a directory:

    bundle.json        `BundleMeta` below (format food_classifier.bundle/2; /1 still loads)
    model.onnx         fp32 graph: input "image" [N,3,H,W] float32 -> output "logits" [N,C]
    model.int8.onnx    optional quantized variant, listed under "variants"
    labels.txt         one label per line (for humans and other tools)

Bundles are versioned: `<models_dir>/<name>/<version>/`. They are written into a hidden `.tmp-*`
directory beside the target and renamed into place, so a reader never sees half a bundle; hidden
directories are never versions. Loading checks what would otherwise fail at request time (schema,
preprocessing numbers, files and their sha256), and a model dir serves its newest version that loads,
unless a version is promoted: a `PROMOTED` file in the model dir (one line, the version's dir name,
replaced atomically) pins what every loader (`serve`, reload, `Classifier`) takes, so a new training
run does not replace what is served until it is promoted. A promoted version is taken strictly: if it
is gone or broken, loading fails with that error instead of falling back to some other version.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from food_classifier.bundle_schema import CASCADE, FORMAT, READABLE_FORMATS, BundleMeta, Variant
from food_classifier.preprocessing import PreprocessSpec

__all__ = ["CASCADE", "FORMAT", "META_FILE", "PROMOTED_FILE", "Bundle", "BundleError", "BundleMeta", "Variant",
           "file_sha256", "load_bundle", "load_newest", "model_sources", "newest_bundle", "promoted_version",
           "published_versions", "read_meta", "set_promoted", "write_bundle"]

META_FILE = "bundle.json"
PROMOTED_FILE = "PROMOTED"
TMP_PREFIX = ".tmp-"
# A `.tmp-*` dir beside a target untouched this long is a crashed publish: writing one takes seconds.
# Age, not "is its writer alive": the models dir may be shared by hosts or containers whose pids we cannot see.
STALE_TMP_SECONDS = 3600
T = TypeVar("T")
log = logging.getLogger("food_classifier.bundle")


class BundleError(ValueError):
    """A path that is not a loadable bundle."""


def _readable(fn: Callable[..., T]) -> Callable[..., T]:
    """A loader entry point whose PermissionError becomes a `BundleError` naming the folder and the UID.
    The error's own file may not exist: stat('/models/bundle.json') fails that way when /models is closed."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except PermissionError as e:
            target = Path(e.filename or ".")
            blocked = next((p for p in reversed(target.parents) if not os.access(p, os.R_OK | os.X_OK)), target)
            uid, gid = os.geteuid(), os.getegid()
            raise BundleError(f"cannot read {blocked} as UID {uid} (GID {gid}): permission denied. The models "
                              f"folder and everything in it must be readable by UID {uid} (on the host: "
                              f"`chown -R {uid}:{gid} FOLDER` or `chmod -R a+rX FOLDER`)") from None
    return wrapper


@dataclass
class Bundle:
    path: Path
    meta: BundleMeta = field(repr=False)

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def version(self) -> str:
        return self.meta.version

    @property
    def labels(self) -> list[str]:
        return self.meta.labels

    @property
    def preprocessing(self) -> PreprocessSpec:
        return self.meta.spec

    @property
    def variants(self) -> dict[str, Variant]:
        return self.meta.variants

    @property
    def temperature(self) -> float:
        return self.meta.temperature

    @property
    def abstain_threshold(self) -> float | None:
        return self.meta.abstain_threshold

    def model_file(self, variant: str = "fp32") -> Path:
        if variant == CASCADE and self.meta.cascade is not None:
            return self.path / self.meta.cascade.stages[0].file
        if variant not in self.variants:
            raise BundleError(f"bundle {self.name}:{self.version} has no '{variant}' variant "
                              f"(has: {', '.join(sorted(self.variants))})")
        return self.path / self.variants[variant].file

    def with_variants(self, variants: dict[str, Variant | dict[str, Any]], path: Path | None = None) -> Bundle:
        """A copy listing other variant files (e.g. an int8 graph being measured before it is stored)."""
        meta = BundleMeta.model_validate({**self.meta.to_json_dict(), "variants": variants})
        return Bundle(path or self.path, meta)


def file_sha256(path: str | Path) -> str:
    """Streamed sha256 of a file: model files and weights are recorded and checked by it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- reading and validating --------------------------------------------------------------------------

def _check_format(fmt: object, where: Path) -> None:
    if fmt in READABLE_FORMATS:
        return
    m = re.fullmatch(r"food_classifier\.bundle/(\d+)", str(fmt))
    if m and int(m.group(1)) > int(FORMAT.rsplit("/", 1)[1]):
        raise BundleError(f"{where}: bundle format version {m.group(1)} ({fmt!r}) is newer than this "
                          f"food-classifier reads ({', '.join(READABLE_FORMATS)}): upgrade food-classifier")
    raise BundleError(f"{where}: unknown bundle format {fmt!r}, expected {FORMAT!r}")


def _validate(data: dict[str, Any], where: Path) -> BundleMeta:
    try:
        return BundleMeta.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'bundle'}: "
                             f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())
        raise BundleError(f"{where}: invalid bundle metadata: {problems}") from None


def read_meta(path: str | Path) -> BundleMeta:
    """The validated `bundle.json` of a bundle dir (schema and numbers only, files not checked)."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise BundleError(f"{path} is not a model bundle (no {META_FILE})")
    try:
        data = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{meta_path} is not a JSON object")
    _check_format(data.get("format"), meta_path)
    return _validate(data, meta_path)


def verify_files(path: Path, meta: BundleMeta) -> None:
    """Every listed model file exists in the bundle dir and matches its recorded sha256 (when recorded)."""
    listed = list(meta.variants.values()) + (meta.cascade.files() if meta.cascade else [])
    for v in listed:
        f = path / v.file
        if not f.is_file():
            raise BundleError(f"{f}: listed in {path / META_FILE} but the file is missing")
        if v.sha256 and file_sha256(f) != v.sha256.lower():
            raise BundleError(f"{f}: sha256 does not match {path / META_FILE} (file changed or corrupt)")


@_readable
def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """A bundle dir, validated: metadata, and (with `verify`) every model file and its hash."""
    path = Path(path)
    meta = read_meta(path)
    if verify:
        verify_files(path, meta)
    return Bundle(path=path, meta=meta)


# --- the one walk: sources, versions, newest ---------------------------------------------------------

def _is_version(p: Path) -> bool:
    """A published version dir: visible (never `.tmp-*` or another dot dir) and holding a bundle.json."""
    return not p.name.startswith(".") and p.is_dir() and (p / META_FILE).is_file()


def _created_at(p: Path) -> str:
    """Sort key: created_at from bundle.json; for an unreadable one its mtime, so a fresh broken
    version is still tried (and reported) first."""
    try:
        return str(json.loads((p / META_FILE).read_text()).get("created_at") or "")
    except (OSError, ValueError, AttributeError):
        return datetime.fromtimestamp((p / META_FILE).stat().st_mtime, UTC).isoformat()


def published_versions(path: str | Path) -> list[Path]:
    """Every published version dir of a model dir, newest first (valid or not)."""
    path = Path(path)
    found = [p for p in path.iterdir() if _is_version(p)] if path.is_dir() else []
    return sorted(found, key=lambda p: (_created_at(p), p.name), reverse=True)


def promoted_version(model_dir: str | Path) -> str | None:
    """The version named by `model_dir/PROMOTED`, or None when nothing is promoted."""
    try:
        name = (Path(model_dir) / PROMOTED_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return name or None


def set_promoted(model_dir: str | Path, version: str | None) -> None:
    """Promote `version` of `model_dir` (checked to load first), or clear the promotion with None.
    Written to a temporary file and renamed, so a loader reads the old or the new name, never half."""
    model_dir = Path(model_dir)
    marker = model_dir / PROMOTED_FILE
    if version is None:
        marker.unlink(missing_ok=True)
        return
    target = model_dir / version
    if version.startswith(".") or "/" in version or not _is_version(target):
        raise BundleError(f"{target} is not a published version of {model_dir}")
    load_bundle(target)  # never promote what cannot be served
    tmp = model_dir / f"{TMP_PREFIX}{PROMOTED_FILE}-{os.getpid()}"
    tmp.write_text(version + "\n")
    os.replace(tmp, marker)


def versions(path: str | Path) -> list[Path]:
    """Candidates in the order loaders try them: a bundle dir is itself; a model dir gives its promoted
    version alone when one is promoted, else its published versions, newest first."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return [path]
    promoted = promoted_version(path) if path.is_dir() else None
    return [path / promoted] if promoted else published_versions(path)


@_readable
def model_sources(paths: list[Path]) -> list[Path]:
    """Expand user paths (bundle dir, model dir, dir of model dirs) into sources for `load_newest`."""
    sources: list[Path] = []
    for path in map(Path, paths):
        if (path / META_FILE).is_file():
            sources.append(path)
            continue
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle or model directory")
        if versions(path):
            sources.append(path)  # a model dir: its children are versions
            continue
        found = [c for c in sorted(path.iterdir()) if not c.name.startswith(".") and c.is_dir() and versions(c)]
        if not found:
            raise BundleError(f"no model bundle found under {path}")
        sources.extend(found)
    return sources


@_readable
def load_newest(path: str | Path, build: Callable[[Path], T] = load_bundle,
                on_skip: Callable[[Path, BundleError], None] | None = None) -> T:
    """`build(version)` for the newest version of `path` that builds; broken versions (a `BundleError`)
    are skipped with a warning and reported to `on_skip`. No valid version: a `BundleError` naming all."""
    candidates = versions(path)
    if not candidates:
        raise BundleError(f"no model bundle found under {path}")
    promoted = promoted_version(path) if (Path(path) / PROMOTED_FILE).is_file() else None
    if promoted:  # strict: never silently serve another version than the one the user pinned
        try:
            return build(candidates[0])
        except BundleError as e:
            raise BundleError(f"promoted version {promoted} of {path} (named in {PROMOTED_FILE}) cannot be "
                              f"loaded: {e}; promote another (`food-classifier models promote NAME VERSION`) "
                              "or clear it (`food-classifier models unpromote NAME`)") from None
    errors: list[str] = []
    for p in candidates:
        try:
            return build(p)
        except BundleError as e:
            if len(candidates) == 1:
                raise
            log.warning("skipping broken bundle version %s: %s", p, e)
            errors.append(f"{p.name}: {e}")
            if on_skip:
                on_skip(p, e)
    raise BundleError(f"no loadable version under {path}: " + "; ".join(errors))


def newest_bundle(path: str | Path) -> Path:
    """A bundle dir is itself; a model dir gives its newest version that loads."""
    return load_newest(path).path


# --- writing ---------------------------------------------------------------------------------------

def _for_writing(meta: BundleMeta | dict[str, Any], where: Path) -> BundleMeta:
    data = meta.to_json_dict() if isinstance(meta, BundleMeta) else dict(meta)
    return _validate({**data, "format": FORMAT}, where)


def remove_stale_temporaries(parent: Path, max_age: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete `.tmp-*` dirs in `parent` left by crashed publishes (untouched for `max_age` seconds)."""
    removed = []
    now = time.time()
    for p in parent.iterdir() if parent.is_dir() else []:
        if not (p.name.startswith(TMP_PREFIX) and p.is_dir()):
            continue
        try:
            newest = max([p.stat().st_mtime] + [f.stat().st_mtime for f in p.iterdir()])
        except FileNotFoundError:  # another publish finished or removed it meanwhile
            continue
        if now - newest > max_age:
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed stale temporary %s", p)
            removed.append(p)
    return removed


def write_bundle(target: str | Path, meta: BundleMeta | dict[str, Any],
                 write_files: Callable[[Path], None]) -> Path:
    """Write a bundle atomically: validate `meta`, `write_files(tmp_dir)` fills a hidden temp dir beside
    `target`, the files are checked against `meta`, then one rename publishes it. Stale temp dirs of
    crashed earlier publishes are removed first."""
    target = Path(target)
    meta = _for_writing(meta, target / META_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise BundleError(f"{target} already exists; bundles are immutable, pick a new version")
    remove_stale_temporaries(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a server running as another user must read it
    try:
        write_files(tmp)
        (tmp / "labels.txt").write_text("\n".join(meta.labels) + "\n")
        (tmp / META_FILE).write_text(json.dumps(meta.to_json_dict(), indent=2))
        verify_files(tmp, meta)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
