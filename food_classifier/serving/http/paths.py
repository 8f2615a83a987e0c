"""Safe file access for the seed-compatible `GET /predict?image_path=...`.

The only place the server reads a client-named path. A path is allowed only if its *fully resolved*
form (symlinks followed, `..` collapsed) lies inside one of the configured roots, so `..`, absolute
paths elsewhere, symlinks pointing out and percent-encoded variants (decoded once by the framework,
never again here) all end up outside and are refused before the file is even looked at.
"""

from __future__ import annotations

import os
from pathlib import Path

from food_classifier.serving.errors import BodyTooLarge, Forbidden, InvalidInput, NotFound


class PathGuard:
    def __init__(self, roots: list[Path]):
        self.roots = [Path(os.path.realpath(r)) for r in roots]

    @property
    def enabled(self) -> bool:
        return bool(self.roots)

    def resolve(self, image_path: str) -> Path:
        """The real path of an allowed file; 403 outside the roots (existing or not), 404 inside."""
        if not self.enabled:
            raise Forbidden("reading server-side paths is disabled; start the server with --allow-path-root",
                            code="path_access_disabled")
        if not image_path or "\x00" in image_path:
            raise InvalidInput("image_path must be a non-empty path")
        candidates = [Path(image_path)] if os.path.isabs(image_path) else [r / image_path for r in self.roots]
        for cand in candidates:
            real = Path(os.path.realpath(cand))
            if not any(real == r or real.is_relative_to(r) for r in self.roots):
                continue
            try:
                if real.is_file():
                    return real
            except OSError:  # e.g. a name longer than the file system allows: no such file
                continue
        if any(self._inside(c) for c in candidates):
            raise NotFound(f"no such image file under the allowed roots: {image_path}")
        raise Forbidden("image_path is outside the allowed roots", code="path_forbidden")

    def _inside(self, cand: Path) -> bool:
        real = Path(os.path.realpath(cand))
        return any(real.is_relative_to(r) for r in self.roots)

    def read(self, path: Path, limit: int) -> bytes:
        """Read a resolved file, refusing anything bigger than the body limit (blocking).

        The opened descriptor is checked again, so swapping a symlink in between does not escape.
        """
        with open(path, "rb") as fh:
            fd_link = f"/proc/self/fd/{fh.fileno()}"
            if os.path.exists(fd_link) and not self._inside(Path(os.readlink(fd_link))):
                raise Forbidden("image_path is outside the allowed roots", code="path_forbidden")
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise BodyTooLarge(f"file is {size} bytes, limit is {limit}")
            return fh.read(limit + 1)
