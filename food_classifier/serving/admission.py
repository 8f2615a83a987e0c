"""Admission control for decodes: one memory budget shared by every image being decoded.

A decoded image costs about 4 bytes a pixel whatever its file size: a 105 KB PNG of 6000x6000 is
144 MB once decoded. Unbounded, 24 of them at once pushed the RSS from 266 to 851 MB and a normal
photo waited 14 s behind them. So an image is decoded in two steps:

1. `decode_small`, in the decode pool: read the header (`preprocessing.peek`: allowed format, pixel
   limit, the JPEG draft) and estimate the memory (`preprocessing.decode_bytes`). A small image
   (at most 1/16 of the budget: every JPEG photo, which decodes at 1/2-1/8 scale, and anything up
   to ~4 MP) is decoded in the same call and never waits.
2. A large one raises `LargeImage`; the service waits on the `DecodeBudget` (first come, first served)
   until its bytes fit and a slot is free (at most `decode_threads - 1` large decodes at once, at least
   one), so a decode thread stays free for the small images, then `decode_large` decodes it and
   gives the memory back to the OS at once (memory.trim).

Decodes in flight then hold at most the budget (or one image alone, when it needs more than the whole
budget) plus one small image per decode thread.

Tensor requests in JSON (the Open Inference Protocol's `pixels` or `image` `data`) are decodes too: their
numbers become Python objects, ~9x the body at worst. `routes_oip` takes a grant of `tensor_body_cost`
(bytes, no decode slot) before it reads such a body and holds it until the answer is sent; the body
must then arrive within --body-timeout in all, so a slow sender cannot sit on the budget. 48 connections
of 8 JSON crops wait their turn instead of holding ~0.9 GB at once; a small one (<= budget/16) never waits.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import numpy as np
from PIL import Image

from food_classifier.preprocessing import decode_bytes, peek
from food_classifier.serving import memory

SMALL_SHARE = 16  # an image needing at most budget/16 bytes skips the queue
# A tensor in JSON (the Open Inference Protocol's `data`) is parsed into Python numbers: 32 bytes each (a
# float object + its list slot), then 4 as float32, from as little as 4 bytes of text ("0.5,"). So a
# JSON body may need 9x its size on top of itself while it is parsed and answered (tracemalloc: 4.9x for
# 3-decimal values, 1.7x for full float32 reprs).
JSON_TENSOR_FACTOR = 10


class LargeImage(Exception):  # noqa: N818 - a signal between the two steps, not an error
    """The first step's answer for an image that must wait for the budget (header read, pixels not)."""

    def __init__(self, image: Image.Image, cost: int, peek_ms: float):
        super().__init__(f"{cost} bytes to decode")
        self.image, self.cost, self.peek_ms = image, cost, peek_ms


def decode_small(classifier: Any, data: bytes, small: int) -> tuple[np.ndarray, float]:
    """Peek, then decode and preprocess at once if the image is small (blocking: a decode thread)."""
    start = time.perf_counter()
    img = peek(data, classifier.spec, classifier.max_pixels)
    cost = decode_bytes(img)
    if cost > small:
        raise LargeImage(img, cost, (time.perf_counter() - start) * 1000)
    return classifier.preprocess(img), (time.perf_counter() - start) * 1000


def decode_large(classifier: Any, img: Image.Image) -> tuple[np.ndarray, float]:
    """Decode and preprocess a peeked large image, then free its pixels and return them to the OS."""
    start = time.perf_counter()
    try:
        return classifier.preprocess(img), (time.perf_counter() - start) * 1000
    finally:
        img.close()  # the decoded pixels live in the image object: drop them now, not at the next GC
        memory.trim()


def tensor_body_cost(content_length: str | None, header_length: str | None, encoded: bool, limit: int) -> int:
    """The most memory a tensor request's body may take, known before a byte of it is read: its JSON part
    times JSON_TENSOR_FACTOR plus its binary part (an unknown or compressed length counts as `limit`)."""
    try:
        size = min(int(content_length or ""), limit) if not encoded else limit
    except ValueError:
        size = limit
    try:
        json_part = min(int(header_length), size) if header_length is not None else size
    except ValueError:
        json_part = size
    return max(0, json_part) * JSON_TENSOR_FACTOR + max(0, size - json_part)


class Grant:
    """Bytes held in a `DecodeBudget`; `release` is idempotent (call it on the event loop)."""

    def __init__(self, budget: DecodeBudget, cost: int, slot: bool = True):
        self._budget: DecodeBudget | None = budget
        self.cost, self.slot = cost, slot

    def release(self) -> None:
        if self._budget is not None:
            budget, self._budget = self._budget, None
            budget._give(self.cost, self.slot)


class DecodeBudget:
    """A byte budget with a cap on concurrent holders, granted strictly first come, first served
    (so a big image is never starved by a stream of others). A holder needing more than the whole
    budget is admitted alone. Event-loop only (no locks)."""

    def __init__(self, capacity: int, slots: int):
        self.capacity = capacity
        self.slots = max(1, slots)
        self.small = capacity // SMALL_SHARE
        self.used = 0
        self.running = 0
        self._waiters: deque[tuple[int, bool, asyncio.Future]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, cost: int, slot: bool) -> bool:
        if slot and self.running >= self.slots:
            return False
        return self.used == 0 or self.used + cost <= self.capacity

    def _take(self, cost: int, slot: bool) -> None:
        self.used += cost
        self.running += slot

    def _give(self, cost: int, slot: bool) -> None:
        self.used -= cost
        self.running -= slot
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0], self._waiters[0][1]):
            cost, slot, future = self._waiters.popleft()
            if not future.done():  # skip waiters that were cancelled
                self._take(cost, slot)
                future.set_result(None)

    async def acquire(self, cost: int, slot: bool = True) -> Grant:
        """Wait until `cost` bytes fit (and, with `slot`, a large-decode slot is free: a holder that
        does not occupy a decode thread, such as a JSON tensor, takes none)."""
        if not self._waiters and self._fits(cost, slot):
            self._take(cost, slot)
            return Grant(self, cost, slot)
        entry = (cost, slot, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[2]
        except asyncio.CancelledError:
            if entry[2].done() and not entry[2].cancelled():  # granted just before the cancel arrived
                self._give(cost, slot)
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
                self._wake()  # it may have been the head that blocked the others
            raise
        return Grant(self, cost, slot)
