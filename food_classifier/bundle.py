"""The model bundle: the one artefact shared by the training side (writer) and serving (reader).

A bundle is a directory:

    bundle.json        metadata (format, name, version, labels, preprocessing, metrics, ...)
    model.onnx         fp32 graph: input "image" [N,3,H,W] float32 -> output "logits" [N,C]
    model.int8.onnx    optional quantized variant, listed under "variants"
    labels.txt         one label per line (for humans and other tools)

Bundles are versioned: `<models_dir>/<name>/<version>/`. They are written into a hidden temp
directory beside the target and renamed into place, so a reader never sees half a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from food_classifier.preprocessing import PreprocessSpec

FORMAT = "food_classifier.bundle/1"
META_FILE = "bundle.json"


class BundleError(ValueError):
    """A path that is not a loadable bundle."""


@dataclass
class Bundle:
    path: Path
    name: str
    version: str
    labels: list[str]
    preprocessing: PreprocessSpec
    variants: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(repr=False)

    @property
    def temperature(self) -> float:
        return float(self.meta.get("calibration", {}).get("temperature", 1.0))

    @property
    def abstain_threshold(self) -> float | None:
        t = self.meta.get("abstention", {}).get("threshold")
        return None if t is None else float(t)

    def model_file(self, variant: str = "fp32") -> Path:
        if variant not in self.variants:
            raise BundleError(f"bundle {self.name}:{self.version} has no '{variant}' variant "
                              f"(has: {', '.join(sorted(self.variants))})")
        return self.path / self.variants[variant]["file"]


def file_sha256(path: str | Path) -> str:
    """Streamed sha256 of a file: model files and weights are recorded and checked by it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise BundleError(f"{path} is not a model bundle (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{meta_path} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise BundleError(f"{path}: unknown bundle format {meta.get('format')!r}, expected {FORMAT!r}")
    variants = meta.get("variants") or {"fp32": {"file": "model.onnx"}}
    for v in variants.values():
        if not (path / v["file"]).is_file():
            raise BundleError(f"{path}: bundle lists {v['file']} but the file is missing")
    return Bundle(path=path, name=meta["name"], version=meta["version"], labels=list(meta["labels"]),
                  preprocessing=PreprocessSpec.from_dict(meta["preprocessing"]), variants=variants,
                  meta=meta)


def find_bundles(path: str | Path) -> list[Path]:
    """All bundle dirs at `path`: the dir itself, its versions, or models/<name>/<version>."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return [path]
    if not path.is_dir():
        return []
    found: list[Path] = []
    for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (child / META_FILE).is_file():
            found.append(child)
        else:
            found.extend(c for c in sorted(child.iterdir()) if (c / META_FILE).is_file())
    return found


def newest_bundle(path: str | Path) -> Path:
    """A bundle dir is itself; a model dir gives its newest version (by created_at, then name)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    versions = [p for p in path.iterdir() if (p / META_FILE).is_file()] if path.is_dir() else []
    if not versions:
        raise BundleError(f"no model bundle found under {path}")
    return max(versions, key=lambda p: (json.loads((p / META_FILE).read_text()).get("created_at", ""), p.name))


def write_bundle(target: str | Path, meta: dict[str, Any], write_files: Callable[[Path], None]) -> Path:
    """Write a bundle atomically: `write_files(tmp_dir)` fills it, then one rename publishes it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise BundleError(f"{target} already exists; bundles are immutable, pick a new version")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a server running as another user must read it
    try:
        write_files(tmp)
        meta = {"format": FORMAT, **meta}
        meta.setdefault("variants", {"fp32": {"file": "model.onnx"}})
        (tmp / "labels.txt").write_text("\n".join(meta["labels"]) + "\n")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def update_meta(path: str | Path, updates: dict[str, Any]) -> None:
    """Atomically merge keys into bundle.json (used to add metrics or variants after export)."""
    meta_path = Path(path) / META_FILE
    meta = json.loads(meta_path.read_text())
    meta.update(updates)
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
