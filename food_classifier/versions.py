"""Model versions on disk: list, promote, remove, garbage-collect. The `models` commands call these.

A models dir holds model dirs, each holding versions: `<models_dir>/<name>/<version>/` (bundle.py).
What a server loads from a model dir is its promoted version when one is promoted, else its newest
version that loads (`bundle.load_newest`); every loader walks the same way, so "the served version"
below is that one. A server started earlier keeps the version it loaded in memory until it is
reloaded or restarted, even if the files are removed; `gc` cannot see which version such a process
holds, so it keeps the promoted and the newest valid version plus the `keep` newest, and a running
server's next reload takes one of those.

A training run (`runs/<time>-<arch>/`, ~70 MB: checkpoints, logits, report) records the bundle it
published in `bundle_path.txt`; `gc` removes a run once that bundle is gone. Runs that never published
(interrupted, or still training) are left alone.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from food_classifier.bundle import (
    TMP_PREFIX,
    BundleError,
    BundleMeta,
    load_bundle,
    load_newest,
    promoted_version,
    published_versions,
    remove_stale_temporaries,
    set_promoted,
)

__all__ = ["GcResult", "VersionInfo", "gc", "list_versions", "model_dirs", "promote", "remove", "size_bytes",
           "unpromote"]


@dataclass
class VersionInfo:
    model: str  # the model dir's name (what `serve` calls the model)
    version: str
    path: Path
    size_bytes: int
    promoted: bool = False
    served: bool = False  # what `serve`, reload and `Classifier(model_dir)` load now
    meta: BundleMeta | None = None
    error: str | None = None  # why it cannot be loaded (None: it loads)

    @property
    def test_accuracy(self) -> float | None:
        tier = self.meta.metrics.get("test") if self.meta else None
        return tier.accuracy if tier else None


@dataclass
class GcResult:
    removed_versions: list[Path] = field(default_factory=list)
    removed_runs: list[Path] = field(default_factory=list)
    freed_bytes: int = 0
    kept: dict[str, list[str]] = field(default_factory=dict)  # model -> kept versions


def size_bytes(path: Path) -> int:
    """Bytes of the files under `path` (what removing it frees)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def model_dirs(models_dir: str | Path) -> list[Path]:
    """Model dirs under `models_dir` (each with at least one published version), by name."""
    root = Path(models_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: no such models directory")
    return [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
            and (published_versions(d) or promoted_version(d))]


def model_dir(models_dir: str | Path, name: str) -> Path:
    d = Path(models_dir) / name
    if name.startswith(".") or "/" in name or not d.is_dir():
        known = ", ".join(m.name for m in model_dirs(models_dir)) or "none"
        raise BundleError(f"no model named {name!r} in {models_dir} (models: {known})")
    return d


def served_version(model: Path) -> str | None:
    """The version a server loading `model` takes now, checked the way a server opens it (the bundle,
    then an ONNX Runtime session); None when no version loads."""
    from food_classifier.inference import Classifier  # onnxruntime: only for commands that need it

    try:
        return load_newest(model, lambda p: Classifier(p, threads=1)).bundle.path.name
    except BundleError:
        return None


def list_versions(model: Path) -> list[VersionInfo]:
    """Every published version of one model dir, newest first, each loaded and checked."""
    promoted, served = promoted_version(model), served_version(model)
    out = []
    for p in published_versions(model):
        info = VersionInfo(model.name, p.name, p, size_bytes(p), promoted=p.name == promoted, served=p.name == served)
        try:
            info.meta = load_bundle(p).meta
        except BundleError as e:
            info.error = str(e)
        out.append(info)
    return out


def promote(models_dir: str | Path, name: str, version: str) -> Path:
    """Pin `version` of model `name`: what every loader takes from now on (a running server on reload)."""
    from food_classifier.inference import Classifier

    d = model_dir(models_dir, name)
    if (d / version).is_dir() and not version.startswith("."):
        Classifier(d / version, threads=1)  # never pin what ONNX Runtime cannot load
    set_promoted(d, version)
    return d / version


def unpromote(models_dir: str | Path, name: str) -> str | None:
    """Clear the pin (the newest valid version is served again); returns the version that was pinned."""
    d = model_dir(models_dir, name)
    was = promoted_version(d)
    set_promoted(d, None)
    return was


def _delete(path: Path) -> int:
    """Rename to a hidden temporary first (atomic: no loader sees half a version), then delete."""
    freed = size_bytes(path)
    hidden = path.with_name(f"{TMP_PREFIX}rm-{path.name}-{os.getpid()}")
    os.rename(path, hidden)
    shutil.rmtree(hidden)
    return freed


def remove(models_dir: str | Path, name: str, version: str) -> int:
    """Delete one version (never the promoted one); returns the bytes freed."""
    d = model_dir(models_dir, name)
    target = d / version
    if version.startswith(".") or "/" in version or not target.is_dir():
        raise BundleError(f"{target}: no such version (versions: "
                          f"{', '.join(p.name for p in published_versions(d)) or 'none'})")
    if promoted_version(d) == version:
        raise BundleError(f"{name} {version} is promoted; promote another version or "
                          f"`food-classifier models unpromote {name}` first")
    return _delete(target)


def _published_bundle(run: Path) -> Path | None:
    try:
        return Path((run / "bundle_path.txt").read_text().strip()).resolve()
    except OSError:
        return None


def gc(models_dir: str | Path, keep: int, runs_dir: str | Path | None = None, dry_run: bool = False) -> GcResult:
    """Per model, keep the `keep` newest versions, the promoted one and the served one; delete the
    rest, crashed publishes' temporaries and the runs whose published bundle no longer exists."""
    if keep < 0:
        raise ValueError("keep must be >= 0")
    result = GcResult()
    for model in model_dirs(models_dir):
        published = published_versions(model)
        kept = {p.name for p in published[:keep]} | {promoted_version(model), served_version(model)}
        result.kept[model.name] = [p.name for p in published if p.name in kept]
        for p in published:
            if p.name not in kept:
                result.removed_versions.append(p)
                result.freed_bytes += size_bytes(p) if dry_run else _delete(p)
        if not dry_run:
            remove_stale_temporaries(model)
    gone = {p.resolve() for p in result.removed_versions}
    runs = Path(runs_dir) if runs_dir else None
    for run in sorted(runs.iterdir()) if runs and runs.is_dir() else []:
        bundle = _published_bundle(run) if (run / "config.json").is_file() else None
        if bundle is None or not (bundle in gone or not bundle.exists()):
            continue
        result.removed_runs.append(run)
        result.freed_bytes += size_bytes(run)
        if not dry_run:
            shutil.rmtree(run)
    return result
