"""One asyncio scheduler per model: gather requests into batches, run them on one inference thread.

Requests are generic: named arrays without the batch axis (today one window ``features`` (W, D);
with a step model, a chunk of new steps plus the stream's cached state). The scheduler stacks
them, pads to a warmed batch bucket, runs the runtime on its single-thread executor and hands
each request its slice of every output.

Rules:
- a batch is cut at the first request's submit time + ``max_wait``, or at ``max_batch`` requests;
  the wait is an event with a timeout, never a sleep-poll;
- at most one request in flight per key (a stream), so the queue never outgrows the sessions;
- up to ``max_batches_in_flight`` batches are handed to the inference thread at once: it runs them
  one after another, and starts the next as soon as one ends instead of waiting for the busy event
  loop to take the results and stack a new batch;
- cancelled requests (their stream went away) are skipped before the run;
- a failed batch fails every request in it; ``max_runtime_failures`` failed batches in a row mark
  the runtime dead, fail everything pending and call ``on_dead`` (the app then exits).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.metrics import Metrics
from service.runtime.base import InferenceFailed, ModelRuntime, RuntimeDead

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class SchedulerClosed(RuntimeError):
    """The server is shutting down; no new work is taken."""


class DuplicateRequest(ValueError):
    """The key already has a request in flight."""


@dataclass
class InferenceRequest:
    key: str
    inputs: Arrays
    future: asyncio.Future
    submitted: float = field(default_factory=time.monotonic)


def _pick_bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    return n


class Scheduler:
    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        buckets: list[int] | None = None,
        metrics: Metrics | None = None,
        on_dead: Callable[[str], None] | None = None,
        max_batches_in_flight: int = 2,
    ) -> None:
        if max_batches_in_flight < 1:
            raise ValueError("max_batches_in_flight must be >= 1")
        self.runtime = runtime
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.buckets = sorted({b for b in (buckets or []) if 0 < b < max_batch} | {max_batch})
        self.metrics = metrics
        self.on_dead = on_dead
        # The only thread that ever calls the runtime: ONNX sessions and GPU contexts stay single-owner.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._pending: deque[InferenceRequest] = deque()
        self._in_flight: set[str] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._slots = asyncio.Semaphore(max_batches_in_flight)
        self._runs: set[asyncio.Task] = set()  # batches handed to the inference thread, not yet back
        self._closed = False
        self.batches = 0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler")

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the inference thread (warm-up, diagnostics): never concurrently with a batch."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Refuse new work, let queued requests finish for up to ``drain_timeout`` s, then fail the rest."""
        self._closed = True
        deadline = time.monotonic() + drain_timeout
        while (self._pending or self._runs) and time.monotonic() < deadline and self._task:
            await asyncio.sleep(0.01)  # shutdown only: bounded wait for the last batches
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for run in list(self._runs):
            run.cancel()
        await asyncio.gather(*self._runs, return_exceptions=True)
        self._fail_pending(SchedulerClosed("server shutting down"))
        self._executor.shutdown(wait=True)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def in_flight(self, key: str) -> bool:
        return key in self._in_flight

    # ------------------------------------------------------------ submit

    async def submit(self, key: str, inputs: Arrays) -> Arrays:
        """Score one request; returns its outputs (no batch axis).

        Raises ValueError (bad shapes), DuplicateRequest, SchedulerClosed, RuntimeDead or InferenceFailed.
        """
        if self._closed:
            raise SchedulerClosed("server shutting down")
        if not self.runtime.health.alive:
            raise RuntimeDead(self.runtime.health.dead_reason or "runtime dead")
        self.runtime.check_request(inputs)
        if key in self._in_flight:
            raise DuplicateRequest(f"{key} already has a request in flight")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._in_flight.add(key)
        future.add_done_callback(lambda _f: self._in_flight.discard(key))
        self._pending.append(InferenceRequest(key, inputs, future))
        self._set_depth()
        self._wakeup.set()
        return await future  # cancelling the caller cancels the future; the batch then skips it

    # ------------------------------------------------------------ loop

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()  # a batch is cut only when the inference thread can take it
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._pending[0].submitted + self.max_wait
            while len(self._pending) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch: list[InferenceRequest] = []
            while self._pending and len(batch) < self.max_batch:
                request = self._pending.popleft()
                if not request.future.done():  # cancelled: its stream is gone
                    batch.append(request)
            self._set_depth()
            if not batch:
                self._slots.release()
                continue
            run = asyncio.get_running_loop().create_task(self._run(batch), name="batch")
            self._runs.add(run)
            run.add_done_callback(self._batch_done)

    def _batch_done(self, run: asyncio.Task) -> None:
        self._runs.discard(run)
        self._slots.release()

    async def _run(self, batch: list[InferenceRequest]) -> None:
        started = time.monotonic()
        if self.metrics:
            for r in batch:
                self.metrics.queue_wait.observe(started - r.submitted)
            self.metrics.batch_size.observe(len(batch))
        try:
            # Stacking and splitting stay on the event loop: the inference thread then needs the GIL
            # only around the native run, instead of trading it with the loop for every array copy.
            n, feed = self._stack([r.inputs for r in batch])
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self.runtime.run, feed)
            outputs = self._split(out, n, len(next(iter(feed.values()))))
        except asyncio.CancelledError:  # shutdown after the drain timeout
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(SchedulerClosed("server shutting down"))
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is fanned out to the batch's requests
            self._on_failure(batch, exc)
            return
        self.batches += 1
        self.runtime.health.record_success()
        if self.metrics:
            self.metrics.inference.observe(time.monotonic() - started)
        for request, result in zip(batch, outputs, strict=True):
            if not request.future.done():
                request.future.set_result(result)

    def _stack(self, inputs: list[Arrays]) -> tuple[int, Arrays]:
        """Stack the requests' arrays and pad the batch to a warmed bucket."""
        n = len(inputs)
        size = _pick_bucket(n, self.buckets)
        feed = {}
        for name in inputs[0]:
            stacked = np.zeros((size, *inputs[0][name].shape), dtype=np.float32)
            np.stack([item[name] for item in inputs], out=stacked[:n])
            feed[name] = stacked
        return n, feed

    @staticmethod
    def _split(out: Arrays, n: int, size: int) -> list[Arrays]:
        """Each request's slice of every output (copies: a stream keeps its rows, not the whole batch)."""
        for name, value in out.items():
            if value.shape[0] != size:
                raise InferenceFailed(f"output {name} has batch {value.shape[0]}, expected {size}")
        return [{name: value[i].copy() for name, value in out.items()} for i in range(n)]

    def _on_failure(self, batch: list[InferenceRequest], exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        log.error("batch of %d failed: %s", len(batch), reason)
        if self.metrics:
            self.metrics.errors.labels(kind="inference").inc()
        error = InferenceFailed(reason)
        for request in batch:
            if not request.future.done():
                request.future.set_exception(error)
        if self.runtime.health.record_failure(reason):
            dead = self.runtime.health.dead_reason or reason
            log.critical("model runtime is dead: %s", dead)
            if self.metrics:
                self.metrics.runtime_up.set(0)
            self._fail_pending(RuntimeDead(dead))
            if self.on_dead:
                self.on_dead(dead)

    def _fail_pending(self, exc: Exception) -> None:
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(exc)
        self._set_depth()

    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._pending))
