"""Runs batch jobs: bounded concurrency, a bounded queue, progress, cancellation, recovery, retention.

A job is: featurize the whole input in a worker thread (every frame, no drops), then run the same
causal detector decode as live streams over the steps, then write the results. The detector comes
from a :class:`Pipeline`, so the server hands in its own runtime and scheduler and the batch path
shares the live path's computation.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.config import Settings
from service.contract.model_card import ModelCard
from service.detection.events import window_ends
from service.jobs import inputs
from service.jobs.results import RESULT_FILES, AtomicWriter, BatchDetection, write_results
from service.jobs.store import InputKind, Job, JobNotFound, JobState, JobStore

log = logging.getLogger("mgstream.jobs")

MAX_ATTEMPTS = 2  # a job interrupted by this many restarts is failed rather than resumed again
PROGRESS_EVERY_S = 0.5  # how often progress reaches the database
RETENTION_SWEEP_MAX_S = 3600.0

# (steps, fps, score_threshold, on_window) -> events, decoded exactly as a live stream would;
# on_window() is called once per scored window (progress).
DetectFn = Callable[[np.ndarray, float, "float | None", Callable[[], None]], Awaitable[list[Any]]]


@dataclass
class Pipeline:
    """What jobs need from the server: the model card, the detector, and a featurizer for video."""

    card: ModelCard
    detect: DetectFn
    hop_steps: int  # the live streams' hop: one detector window per hop
    make_featurizer: Callable[[], object] | None = None


class QueueFull(Exception):
    def __init__(self, retry_after_s: int, active: int) -> None:
        super().__init__(f"{active} jobs are queued or running, the limit; retry in about {retry_after_s} s")
        self.retry_after_s = retry_after_s


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass
class _Running:
    task: asyncio.Task
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_requested: bool = False


class JobRunner:
    def __init__(
        self, store: JobStore, settings: Settings, pipeline: Pipeline, writer: AtomicWriter | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.pipeline = pipeline
        self.writer = writer or AtomicWriter()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._running: dict[str, _Running] = {}
        self._finished: dict[str, asyncio.Event] = {}
        self._reserved = 0
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    # ---- lifecycle ----

    async def start(self) -> None:
        swept = self.store.sweep_orphans()
        resumed, failed = self.store.recover(MAX_ATTEMPTS)
        for job in failed:
            log.warning("job %s failed on start-up: %s", job.id, job.error)
        for job in self.store.by_state(JobState.QUEUED):  # resumed ones are queued again, oldest first
            self._enqueue(job.id)
        if swept or resumed or failed:
            log.info(
                "jobs on start-up: %d resumed, %d failed, %d orphan files swept",
                len(resumed),
                len(failed),
                swept,
            )
        self._expire()
        self._tasks = [
            asyncio.create_task(self._worker(i), name=f"job-worker-{i}")
            for i in range(self.settings.max_concurrent_jobs)
        ]
        self._tasks.append(asyncio.create_task(self._retention_loop(), name="job-retention"))

    async def stop(self) -> None:
        """Stop workers. Running jobs go back to ``queued`` (resumed on the next start), not failed."""
        self._stopping = True
        for run in self._running.values():
            run.cancel.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # ---- admission and submission ----

    @property
    def capacity(self) -> int:
        return self.settings.max_concurrent_jobs + self.settings.max_queued_jobs

    @contextlib.contextmanager
    def reserve(self):
        """Hold a queue slot while an upload streams in, so concurrent uploads cannot overshoot the limit."""
        active = self.store.count_active() + self._reserved
        if self._stopping or active >= self.capacity:
            raise QueueFull(self.retry_after(), active)
        self._reserved += 1
        try:
            yield
        finally:
            self._reserved -= 1

    def retry_after(self) -> int:
        """Seconds until a slot probably frees: the smallest ETA of a running job, else a short default."""
        etas = [j.eta_s for j in self.store.by_state(JobState.RUNNING) if j.eta_s is not None]
        guess = min(etas) if etas else 5.0
        return int(min(max(math.ceil(guess), 1), 600))

    def submit(self, job: Job) -> Job:
        """Insert a queued job whose input already sits complete in its job directory."""
        job.state = JobState.QUEUED
        self.store.insert(job)
        self._enqueue(job.id)
        return job

    def _enqueue(self, job_id: str) -> None:
        self._finished.setdefault(job_id, asyncio.Event())
        self._queue.put_nowait(job_id)

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        event = self._finished.get(job_id)
        if event is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        return self.store.get(job_id)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; a finished job is returned unchanged."""
        job = self.store.get(job_id)
        run = self._running.get(job_id)
        if run is not None:
            run.cancel_requested = True
            run.cancel.set()
            run.task.cancel()
        elif job.state == JobState.QUEUED and self.store.transition(
            job_id, (JobState.QUEUED,), state=JobState.CANCELLED, finished_at=time.time(), error="cancelled"
        ):
            self._done(job_id)  # the worker skips it when it comes off the queue
        return self.store.get(job_id)

    def remove(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job.state in JobState.ACTIVE:
            raise ValueError(f"job {job_id} is {job.state}; cancel it first")
        self.store.delete(job_id)
        self._finished.pop(job_id, None)

    def _done(self, job_id: str) -> None:
        event = self._finished.pop(job_id, None)
        if event is not None:
            event.set()

    # ---- workers ----

    async def _worker(self, index: int) -> None:
        while True:
            job_id = await self._queue.get()
            try:
                job = self.store.get(job_id)
            except JobNotFound:
                continue
            if job.state != JobState.QUEUED:
                continue
            task = asyncio.create_task(self._execute(job), name=f"job-{job_id}")
            self._running[job_id] = _Running(task)
            try:
                # wait() rather than await: a cancelled job must not cancel its worker.
                await asyncio.wait({task})
            except asyncio.CancelledError:  # server stopping
                task.cancel()
                await asyncio.wait({task})
                raise
            finally:
                self._running.pop(job_id, None)

    async def _execute(self, job: Job) -> None:
        store = self.store
        run_started = time.time()
        if not store.transition(
            job.id,
            (JobState.QUEUED,),
            state=JobState.RUNNING,
            started_at=run_started,
            attempts=job.attempts + 1,
            phase="featurizing",
            frames_done=0,
            error=None,
        ):
            return
        run = self._running[job.id]
        log.info("job %s started: %s %s, %d frames", job.id, job.input_kind, job.filename, job.frames_total)
        try:
            dets = await self._process(job, run, run_started)
            store.update(job.id, phase="writing", eta_s=0.0)
            paths = await asyncio.to_thread(self._write, job, dets)
            results = {fmt: store.relative(p) for fmt, p in paths.items()}
            store.transition(
                job.id,
                (JobState.RUNNING,),
                state=JobState.DONE,
                finished_at=time.time(),
                frames_done=job.frames_total,
                eta_s=0.0,
                phase="",
                results=results,
                detections=len(dets),
            )
            log.info("job %s done: %d detections in %.1f s", job.id, len(dets), time.time() - run_started)
        except (asyncio.CancelledError, inputs.Cancelled):
            if run.cancel_requested:
                self._finish(job.id, JobState.CANCELLED, "cancelled")
            elif self._stopping:  # resumed on the next start, as after a crash, without counting an attempt
                store.transition(
                    job.id,
                    (JobState.RUNNING,),
                    state=JobState.QUEUED,
                    attempts=job.attempts,
                    phase="",
                    eta_s=None,
                    frames_done=0,
                    note="server stopped; requeued",
                )
                raise
            else:
                self._finish(job.id, JobState.FAILED, "interrupted")
        except inputs.InputError as exc:
            self._finish(job.id, JobState.FAILED, f"bad input: {exc}")
        except OSError as exc:
            reason = "disk full" if disk_full(exc) else "I/O error"
            log.error("job %s failed: %s: %s", job.id, reason, exc)
            for name in RESULT_FILES.values():  # no partial result set next to a failed job
                with contextlib.suppress(OSError):
                    (store.job_dir(job.id) / name).unlink(missing_ok=True)
            self._finish(job.id, JobState.FAILED, f"{reason}: {exc}")
        except Exception as exc:  # the job fails, the server keeps serving
            log.exception("job %s failed", job.id)
            self._finish(job.id, JobState.FAILED, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._done(job.id)

    def _finish(self, job_id: str, state: str, error: str) -> None:
        try:
            self.store.transition(
                job_id,
                JobState.ACTIVE,
                state=state,
                error=error,
                finished_at=time.time(),
                eta_s=None,
                phase="",
            )
        except Exception:  # e.g. the database itself cannot be written (disk full): log, keep serving
            log.exception("could not record job %s as %s (%s)", job_id, state, error)

    async def _process(self, job: Job, run: _Running, started: float) -> list[BatchDetection]:
        info = inputs.InputInfo(kind=job.input_kind, frames=job.frames_total, fps=job.fps)
        last_write = [0.0]

        def report(force: bool = False, **counters: int) -> None:
            """Progress to the database, at most every PROGRESS_EVERY_S (thread-safe, best effort)."""
            for k, v in counters.items():
                setattr(job, k, v)
            now = time.time()
            if not force and now - last_write[0] < PROGRESS_EVERY_S:
                return
            last_write[0] = now
            frac = job.fraction
            eta = (now - started) * (1 - frac) / frac if frac > 0.01 else None
            with contextlib.suppress(Exception):
                self.store.update(job.id, eta_s=eta, **{k: getattr(job, k) for k in counters})

        total = job.frames_total  # 0 when the container did not say
        steps = await asyncio.to_thread(
            inputs.featurize,
            self.store.path(job.input_path),
            info,
            self.pipeline.card,
            max_frames=int(self.settings.max_video_s * job.fps) + 1,
            make_featurizer=self.pipeline.make_featurizer,
            cancel=run.cancel,
            progress=lambda done: report(frames_done=min(done, total) if total else done),
        )
        if job.input_kind == InputKind.VIDEO and job.frames_done != total:
            # Containers estimate their frame count; the decoded count is the truth for results.
            job.frames_total, job.duration_s = job.frames_done, job.frames_done / job.fps
            self.store.update(job.id, frames_total=job.frames_total, duration_s=job.duration_s)
        windows_total = len(window_ends(len(steps), self.pipeline.hop_steps))
        self.store.update(job.id, phase="detecting")
        report(force=True, frames_done=job.frames_total, windows_total=windows_total, windows_done=0)

        def on_window() -> None:
            report(windows_done=job.windows_done + 1)

        events = await self.pipeline.detect(steps, job.fps, job.options.get("score_threshold"), on_window)
        report(force=True, windows_done=windows_total)
        return [BatchDetection.from_event(e) for e in events if getattr(e, "type", "gesture_end") == "gesture_end"]

    def _write(self, job: Job, dets: list[BatchDetection]) -> dict[str, Path]:
        card = self.pipeline.card
        meta = {
            "job_id": job.id,
            "filename": job.filename,
            "video_id": job.video_id,
            "input_kind": job.input_kind,
            "fps": job.fps,
            "frames": job.frames_total,
            "duration_s": job.duration_s,
            "model": {"name": card.name, "version": card.version},
            "feature": {"name": card.feature.name, "version": card.feature.version},
        }
        return write_results(
            self.store.job_dir(job.id),
            dets,
            meta,
            duration_s=job.duration_s,
            classes=card.classes,
            writer=self.writer,
        )

    # ---- retention ----

    def _expire(self) -> None:
        expired = self.store.expire(self.settings.job_retention_h * 3600.0)
        if expired:
            log.info("retention: removed %d jobs older than %.1f h", len(expired), self.settings.job_retention_h)

    async def _retention_loop(self) -> None:
        period = min(RETENTION_SWEEP_MAX_S, self.settings.job_retention_h * 3600.0 / 10)
        while True:
            await asyncio.sleep(period)
            try:
                await asyncio.to_thread(self._expire)
            except Exception:
                log.exception("retention sweep failed")
