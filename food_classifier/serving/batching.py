"""Adaptive micro-batching: concurrent single-image requests share one model call.

A model call on a batch of N images costs less than N calls of one image, but waiting for company
costs latency. The batcher is adaptive: it never waits when nothing else is on the way (so a lone
request runs at once), and while other requests are still decoding it waits for them at most
`max_wait_ms`. Whatever queues up while a batch runs goes into the next batch. With batching off
(`max_size` 1) a caller runs its image in its own thread (`run_one`): no hop to the model pool.

Works on any `run(batch [N,...]) -> [N,...]` function, e.g. `Classifier.infer`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchResult:
    output: np.ndarray  # this item's row of the batch output
    batch_size: int
    queue_ms: float  # from enqueue to the start of its batch
    inference_ms: float  # the whole batch's model call


@dataclass
class _Item:
    array: np.ndarray
    future: asyncio.Future
    enqueued: float


class MicroBatcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], executor: Executor, max_size: int = 16,
                 max_wait_ms: float = 2.0, max_concurrent: int = 1,
                 on_batch: Callable[[int, float], None] | None = None):
        """`executor` runs the model calls; `max_concurrent` batches of this model may run at once."""
        self._run = run
        self._executor = executor
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_concurrent = max_concurrent
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._incoming = 0  # requests still preparing their array
        self._workers = 0
        self._changed: asyncio.Event | None = None

    async def predict(self, prepare: Awaitable[np.ndarray]) -> BatchResult:
        """Await `prepare` (the decode step), then run its array in the next batch."""
        self._incoming += 1
        try:
            array = await prepare
            future = self._enqueue(array)
        finally:
            self._incoming -= 1
            self._notify()
        return await future

    async def predict_array(self, array: np.ndarray) -> BatchResult:
        return await self._enqueue(array)

    def run_one(self, array: np.ndarray) -> BatchResult:
        """A batch of one in the caller's thread (a decode thread): with batching off there is no company to
        wait for, and the hop to the model pool and back cost ~10 % of the throughput at concurrency 8. The
        callers' pool bounds these calls (`decode_threads`), not `max_concurrent`."""
        start = time.perf_counter()
        out = self._run(array[None])
        took = time.perf_counter() - start
        if self._on_batch is not None:
            self._on_batch(1, took)
        return BatchResult(out[0], 1, 0.0, took * 1000)

    def _enqueue(self, array: np.ndarray) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append(_Item(array, future, time.perf_counter()))
        if self._workers < self.max_concurrent:
            self._workers += 1
            loop.create_task(self._work())
        self._notify()
        return future

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _fill(self) -> None:
        """Wait (bounded) for requests that are still decoding, if the batch is not full yet."""
        if self.max_wait <= 0:
            return
        deadline = self._queue[0].enqueued + self.max_wait
        while self._queue and len(self._queue) < self.max_size and self._incoming > 0:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            if self._changed is None:
                self._changed = asyncio.Event()
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                await self._fill()
                n = min(self.max_size, len(self._queue))
                batch = [self._queue.popleft() for _ in range(n)]
                batch = [it for it in batch if not it.future.done()]  # drop cancelled requests
                if not batch:
                    continue
                start = time.perf_counter()
                arrays = [it.array for it in batch]
                try:
                    out = await loop.run_in_executor(self._executor, self._call, arrays)
                except Exception as exc:  # the model failed: every request in the batch gets the error
                    for it in batch:
                        if not it.future.done():
                            it.future.set_exception(exc)
                    continue
                took = time.perf_counter() - start
                if self._on_batch is not None:
                    self._on_batch(len(batch), took)
                for i, it in enumerate(batch):
                    if not it.future.done():
                        it.future.set_result(BatchResult(out[i], len(batch), (start - it.enqueued) * 1000,
                                                         took * 1000))
        finally:
            self._workers -= 1

    def _call(self, arrays: list[np.ndarray]) -> np.ndarray:
        return self._run(np.stack(arrays))
