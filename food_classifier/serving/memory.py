"""Hand freed native memory back to the OS, so RSS tracks what the server actually holds.

ONNX Runtime sessions, decoded images and float arrays are allocated by C code through glibc's
malloc. Freed blocks stay in per-thread arenas, so each model reload grew the RSS by ~15-25 MB
even though the old session was gone (measured: 190 -> 322 MB over 8 reloads). Two arenas and a
`malloc_trim` after loading or swapping a model keep it flat (156 MB over 6 reloads). No-ops off glibc.

Large images: Pillow allocates a decoded image in 16 MB blocks. glibc's dynamic mmap threshold rises to
the size of the first block freed, so later images came from the heap and stayed in the RSS (a
6000x6000 PNG: 266 -> 483 MB, never given back). A fixed threshold keeps every block mmap-ed, so it
returns to the OS the moment the image is freed (bench/bench_pixels.py).
"""

from __future__ import annotations

import ctypes
import gc

M_ARENA_MAX = -8  # mallopt parameter numbers in glibc's malloc.h
M_MMAP_THRESHOLD = -3


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both must exist (glibc)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def limit_arenas(n: int = 2) -> bool:
    """Cap glibc malloc arenas (call before worker threads start allocating)."""
    return bool(_LIBC and _LIBC.mallopt(M_ARENA_MAX, n))


def mmap_large_blocks(threshold: int = 4 * 1024 * 1024) -> bool:
    """Allocations of at least `threshold` bytes get their own mapping, unmapped on free (call at start)."""
    return bool(_LIBC and _LIBC.mallopt(M_MMAP_THRESHOLD, threshold))


def trim() -> bool:
    """Return free heap pages to the OS (no garbage collection: cheap enough after every large decode)."""
    return bool(_LIBC and _LIBC.malloc_trim(0))


def release() -> bool:
    """Collect garbage, then return free heap pages to the OS."""
    gc.collect()
    return bool(_LIBC and _LIBC.malloc_trim(0))
