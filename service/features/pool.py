"""A bounded thread pool that runs blocking featurizer calls off the event loop.

MediaPipe graphs and per-stream clip buffers are stateful and not thread-safe, and a stream's
frames must be processed in order, so every featurizer gets its own FIFO ``asyncio.Lock``: calls
for one featurizer run one at a time, in submission order, on whichever worker is free. CPU-bound
featurizers share ``max_workers`` threads (``Settings.pose_workers``); ``batched`` featurizers
(clip backbones) spend their time waiting on the shared batcher, so they run on a separate, wider
lane that lets many streams' clips meet in one batch.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from service.features.base import Featurizer
from service.features.coalesce import TransformCoalescer

T = TypeVar("T")


class FeaturizerPool:
    def __init__(
        self, max_workers: int, *, batched_workers: int = 32, on_coalesced: Callable[[int], None] | None = None
    ) -> None:
        if max_workers < 1 or batched_workers < 1:
            raise ValueError("worker counts must be >= 1")
        self.max_workers = max_workers
        self._cpu = ThreadPoolExecutor(max_workers, thread_name_prefix="featurize")
        self._batched = ThreadPoolExecutor(batched_workers, thread_name_prefix="featurize-batched")
        self._locks: weakref.WeakKeyDictionary[Featurizer, asyncio.Lock] = weakref.WeakKeyDictionary()
        self._in_flight = 0
        self._closed = False
        self._coalescers: dict[Hashable, TransformCoalescer] = {}
        self._on_coalesced = on_coalesced  # streams per coalesced transform call, for metrics

    @property
    def in_flight(self) -> int:
        """Calls submitted and not yet finished (queued or running), for metrics."""
        return self._in_flight

    async def run(self, featurizer: Featurizer, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (a method of ``featurizer``) on a worker; exceptions propagate to the caller."""
        if self._closed:
            raise RuntimeError("featurizer pool is shut down")
        lock = self._locks.get(featurizer)
        if lock is None:
            lock = self._locks[featurizer] = asyncio.Lock()
        executor = self._batched if featurizer.batched else self._cpu
        self._in_flight += 1
        try:
            async with lock:
                return await asyncio.get_running_loop().run_in_executor(executor, lambda: fn(*args))
        finally:
            self._in_flight -= 1

    async def push(self, featurizer: Featurizer, payload: bytes | memoryview, frames: int = 1) -> list:
        """``featurizer.push_payload`` on a worker when it blocks, inline when it is cheap, and for a
        coalescable featurizer inline with its transform shared with the other streams of this turn."""
        if featurizer.coalescable:
            rows = featurizer.gather_payload(payload, frames)
            if len(rows) == 0:
                return []
            return list(await self._coalescer(featurizer).submit(rows))
        if not featurizer.blocking:
            return featurizer.push_payload(payload, frames)
        return await self.run(featurizer, featurizer.push_payload, payload, frames)

    def _coalescer(self, featurizer: Featurizer) -> TransformCoalescer:
        key, transform = featurizer.shared_transform()
        coalescer = self._coalescers.get(key)
        if coalescer is None:
            coalescer = self._coalescers[key] = TransformCoalescer(transform, self._on_coalesced)
        return coalescer

    @property
    def coalescing(self) -> tuple[int, int]:
        """(transform calls, stream submissions) over every coalescer, for metrics."""
        return (sum(c.calls for c in self._coalescers.values()), sum(c.submitted for c in self._coalescers.values()))

    async def finish(self, featurizer: Featurizer) -> list:
        """End of stream: flush pending steps, then release the featurizer; returns the flushed steps."""
        try:
            if featurizer.blocking:
                return await self.run(featurizer, featurizer.flush)
            return featurizer.flush()
        finally:
            await self.release(featurizer)

    async def release(self, featurizer: Featurizer) -> None:
        """Close a featurizer (e.g. on disconnect) once its queued calls are done. Idempotent."""
        if featurizer.blocking and not self._closed:
            await self.run(featurizer, featurizer.close)
        else:
            featurizer.close()
        self._locks.pop(featurizer, None)

    def shutdown(self, wait: bool = True) -> None:
        self._closed = True
        self._cpu.shutdown(wait=wait, cancel_futures=not wait)
        self._batched.shutdown(wait=wait, cancel_futures=not wait)
