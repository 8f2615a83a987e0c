"""Writing bundles: the training side's only caller of `bundle.write_bundle`.

    publish(meta, {"model.onnx": run / "model.onnx", ...}, models_dir / name / version)

A train run publishes once, atomically, at the end. A published version is immutable; the one
directory that is replaced as a whole is a bundle dir the caller owns, such as a run's own
`<run>/bundle` (`replace=True`): the new bundle is written beside it, then swapped in, and the old
one is restored if writing fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from food_classifier.bundle import Bundle, BundleMeta, write_bundle


def variant_files(bundle: Bundle) -> dict[str, Path]:
    """File name in the bundle -> where that file is now, for every variant of `bundle`."""
    return {v.file: bundle.path / v.file for v in bundle.meta.variants.values()}


def publish(meta: BundleMeta, files: dict[str, Path], target: str | Path, move: bool = True,
            replace: bool = False) -> Path:
    """Write the bundle dir `target` holding `files` (name -> source) and `meta` (validated, sha256
    checked, one rename). `move` takes sources out of a work dir; sources inside a replaced `target`
    are always copied, so the old bundle stays whole until the new one is in place."""
    target = Path(target)
    old = None
    if replace and target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.rename(target, old)
    sources = {name: (old / src.relative_to(target), False) if old and src.is_relative_to(target) else (src, move)
               for name, src in files.items()}

    def fill(d: Path) -> None:
        for name, (src, mv) in sources.items():
            (shutil.move if mv else shutil.copy2)(str(src), d / name)

    try:
        write_bundle(target, meta, fill)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def republish(bundle: Bundle, meta: BundleMeta, extra: dict[str, Path] | None = None) -> Bundle:
    """Replace a bundle dir the caller owns by one with `meta` (its files: the bundle's own plus
    `extra`, as `meta.variants` lists them). For tools that add to a finished bundle (`calibrate_run`,
    `add_int8_variant`); a train run never does this."""
    have = variant_files(bundle) | dict(extra or {})
    publish(meta, {v.file: have[v.file] for v in meta.variants.values()}, bundle.path, replace=True)
    return Bundle(bundle.path, meta)
