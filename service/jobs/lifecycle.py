"""Wire batch jobs into the app's lifespan: ``await start_jobs(app)`` after the runtime and scheduler
are up, ``await stop_jobs(app)`` before they go down."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from service.jobs.results import AtomicWriter
from service.jobs.runner import JobRunner, Pipeline
from service.jobs.store import JobStore

log = logging.getLogger("mgstream.jobs")


class _CountingScheduler:
    """Passes windows to the server's scheduler and counts them as they come back (job progress)."""

    def __init__(self, scheduler, on_window: Callable[[], None]) -> None:
        self._scheduler = scheduler
        self._on_window = on_window

    async def submit(self, key: str, inputs: dict) -> dict:
        out = await self._scheduler.submit(key, inputs)
        self._on_window()
        return out


def pipeline_from_app(app) -> Pipeline:
    """The server's own model card, scheduler-backed streaming detector and image featurizer."""
    from service.detection.events import StreamDetector
    from service.detection.offline import detect_steps
    from service.features.factory import create_featurizer

    state = app.state
    settings = state.settings
    card = state.runtime.card
    serving = getattr(state, "serving", None)  # the hop the live sessions use
    hop = serving.hop_steps if serving else StreamDetector(card, hop_steps=settings.hop_steps).hop_steps

    step_scheduler = getattr(state, "step_scheduler", None)

    async def detect(steps, fps, score_threshold, on_window):
        if step_scheduler is not None:  # step mode: the same step model as live streams, chunk by chunk
            from service.detection.step_events import detect_steps_step

            return await detect_steps_step(
                steps,
                card=card,
                layout=step_scheduler.runtime.layout,
                scheduler=step_scheduler,
                key=f"job-{uuid.uuid4().hex[:12]}",
                on_decision=on_window,
                hop_steps=hop,
                score_threshold=score_threshold,
                fps=fps,
            )
        # Every keyword spelled out: the same hop and batch share as live streams, a key of its own.
        return await detect_steps(
            steps,
            card=card,
            scheduler=_CountingScheduler(state.scheduler, on_window),
            settings=settings,
            key=f"job-{uuid.uuid4().hex[:12]}",
            hop_steps=hop,
            score_threshold=score_threshold,
            fps=fps,
        )

    def make_featurizer():
        # Video frames take the live image path (decoded BGR frames go to push_frame).
        return create_featurizer("jpeg", card, settings, clip_batcher=getattr(state, "clip_batcher", None))

    return Pipeline(card=card, detect=detect, hop_steps=hop, make_featurizer=make_featurizer)


async def start_jobs(app, pipeline: Pipeline | None = None, writer: AtomicWriter | None = None) -> JobRunner:
    settings = app.state.settings
    store = JobStore(settings.data_dir)
    runner = JobRunner(store, settings, pipeline or pipeline_from_app(app), writer)
    await runner.start()
    app.state.jobs = runner
    log.info(
        "batch jobs: data in %s, %d at a time, %d queued at most",
        settings.data_dir,
        settings.max_concurrent_jobs,
        settings.max_queued_jobs,
    )
    return runner


async def stop_jobs(app) -> None:
    runner: JobRunner | None = getattr(app.state, "jobs", None)
    if runner is None:
        return
    await runner.stop()
    runner.store.close()
    app.state.jobs = None
