"""The FastAPI app factory and its lifespan.

Startup: load the model runtime once (CUDA first, CPU fallback, the active provider logged),
check its card against the featurizers and settings, start the scheduler, warm every batch
bucket on the inference thread, start the session registry, and only then report ready.
Shutdown: stop admitting, close every stream with 1001, drain the scheduler, release everything.

Shared objects live on ``app.state``, one place for every router (batch jobs included):
``settings``, ``metrics``, ``runtime``, ``scheduler``, ``step_runtime`` and ``step_scheduler`` (step
mode, when the window model has a ``.step.onnx`` beside it), ``registry``, ``featurizer_pool``,
``clip_batcher``, ``serving`` (window, hop, input kinds), ``ready``, ``shutting_down``,
``runtime_dead``, ``jobs`` (set by the batch-jobs wiring) and ``request_exit`` (how a dead runtime
ends the process; the CLI points it at uvicorn, the default sends SIGTERM to this process).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from service import __version__
from service.api import batch, ops, ws
from service.api.deps import ServingInfo
from service.batching.scheduler import Scheduler
from service.config import Settings
from service.contract.model_card import ModelCard, ModelCardError
from service.detection.events import DEFAULT_HOP_STEPS
from service.features.base import UnsupportedInput
from service.features.factory import INPUT_KINDS, create_featurizer
from service.features.pool import FeaturizerPool
from service.jobs.lifecycle import start_jobs, stop_jobs
from service.loop_lag import watch_loop_lag
from service.metrics import Metrics
from service.runtime.base import ModelRuntime
from service.streams.registry import SessionRegistry

log = logging.getLogger("mgstream.app")

RuntimeFactory = Callable[[Settings], ModelRuntime]


def _default_exit() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _load_runtime(settings: Settings) -> ModelRuntime:
    from service.runtime.onnx import load_runtime

    return load_runtime(settings)


def load_step_runtime_for(runtime: ModelRuntime, settings: Settings) -> ModelRuntime | None:
    """The step model beside the window model (``x.onnx`` -> ``x.step.onnx``) per ``settings.mode``:
    never for ``window``, required for ``step``, used when present for ``auto``. Its card must equal the
    window model's apart from ``step_model`` (models/export_step.py copies it), so a step file left
    over from an earlier export is never served with a newer window model."""
    from service.runtime.step_runtime import load_step_runtime

    path = getattr(runtime, "path", None)
    if settings.mode == "window" or (path is None and settings.mode == "auto"):
        return None
    step = load_step_runtime(settings, path)
    if step is None:
        return None
    if dataclasses.replace(step.card, step_model=None) != runtime.card:
        step.close()
        problem = f"step model {step.path} was not exported with the window model beside it (cards differ)"
        if settings.mode == "step":
            raise ModelCardError(problem + "; re-export it with models/export_step.py")
        log.warning("%s; serving in window mode", problem)
        return None
    log.info(
        "step model loaded: chunk %d steps, %d floats of state per stream",
        step.layout.chunk_steps,
        step.layout.state_size,
    )
    return step


def resolve_serving(
    card: ModelCard, settings: Settings, input_kinds: tuple[str, ...], step_chunk: int | None = None
) -> ServingInfo:
    """Window and hop from settings or the card; a window model's window is fixed by its export.
    ``step_chunk``: the chunk of the loaded step model (step mode), whose multiple the hop must be."""
    if settings.window_steps is not None and settings.window_steps != card.window_steps:
        raise ModelCardError(
            f"window_steps={settings.window_steps} but the model was exported with a fixed window of "
            f"{card.window_steps} steps"
        )
    if settings.mode == "step" and step_chunk is None:
        raise ModelCardError("mode=step needs a step-model export (<model>.step.onnx) beside the window model")
    hop = settings.hop_steps or int(card.architecture.get("hop_steps") or DEFAULT_HOP_STEPS)
    if hop > card.window_steps:
        raise ModelCardError(f"hop_steps={hop} exceeds the window of {card.window_steps} steps")
    if step_chunk is not None:
        if hop % step_chunk:
            raise ModelCardError(f"hop_steps={hop} must be a multiple of the step model's chunk of {step_chunk}")
        return ServingInfo(card.window_steps, hop, input_kinds, mode="step")
    return ServingInfo(window_steps=card.window_steps, hop_steps=hop, input_kinds=input_kinds)


def supported_inputs(card: ModelCard, settings: Settings, clip_batcher=None) -> tuple[str, ...]:  # noqa: ANN001
    """Input kinds this server can featurize for ``card``; builds (and closes) one featurizer per kind,
    which also loads MediaPipe once before the first stream needs it."""
    kinds = []
    for kind in INPUT_KINDS:
        try:
            featurizer = create_featurizer(kind, card, settings, clip_batcher=clip_batcher)
        except UnsupportedInput as exc:
            log.info("input %s not available: %s", kind, exc)
            continue
        featurizer.close()
        kinds.append(kind)
    if not kinds:
        raise ModelCardError(f"no featurizer can produce the features model {card.name} expects")
    return tuple(kinds)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    settings: Settings = state.settings
    loop = asyncio.get_running_loop()
    state.runtime = await loop.run_in_executor(None, state.runtime_factory, settings)
    card = state.runtime.card
    if card.feature.input_kind == "features":
        from service.features.clip import create_clip_batcher

        state.clip_batcher = await loop.run_in_executor(None, create_clip_batcher, settings, card.feature.feature_dim)
    kinds = await loop.run_in_executor(None, supported_inputs, card, settings, state.clip_batcher)
    state.step_runtime = await loop.run_in_executor(None, load_step_runtime_for, state.runtime, settings)
    step_chunk = state.step_runtime.layout.chunk_steps if state.step_runtime else None
    state.serving = resolve_serving(card, settings, kinds, step_chunk)
    state.scheduler = _start_scheduler(app, state.runtime)
    timings = await state.scheduler.run_blocking(state.runtime.warm_up, state.scheduler.buckets)
    if state.step_runtime is not None:  # step mode: live streams go through their own scheduler
        state.step_scheduler = _start_scheduler(app, state.step_runtime)
        await state.step_scheduler.run_blocking(state.step_runtime.warm_up, state.step_scheduler.buckets)
    state.featurizer_pool = FeaturizerPool(settings.pose_workers, on_coalesced=state.metrics.coalesced.observe)
    state.registry = SessionRegistry(
        max_sessions=settings.max_sessions,
        metrics=state.metrics,
        session_defaults={
            "inbound_frames": settings.inbound_queue_frames,
            "outbound_messages": settings.outbound_queue_messages,
            "idle_timeout_s": settings.idle_timeout_s,
            "max_session_s": settings.max_session_s,
        },
    )
    state.registry.start_reaper(min(1.0, settings.idle_timeout_s / 4))
    state.metrics.runtime_up.set(1)
    state.metrics.sessions_active.set(0)
    await start_jobs(app)  # batch jobs: recover interrupted ones, then run through the same scheduler
    lag_watch = loop.create_task(watch_loop_lag(state.metrics.loop_lag.observe), name="loop-lag")
    state.ready = True
    log.info(
        "ready: model %s v%s on %s, %s mode, window %d, hop %d steps, inputs %s, batch buckets %s warmed in %.0f ms",
        card.name,
        card.version,
        state.runtime.provider,
        state.serving.mode,
        state.serving.window_steps,
        state.serving.hop_steps,
        ",".join(kinds),
        state.scheduler.buckets,
        1000 * sum(timings.values()),
    )
    try:
        yield
    finally:
        lag_watch.cancel()
        await drain_streams(app)
        await stop_jobs(app)  # running jobs go back to queued and resume on the next start
        await state.registry.stop()
        await state.scheduler.stop()
        if state.step_scheduler is not None:
            await state.step_scheduler.stop()
            state.step_runtime.close()
        state.featurizer_pool.shutdown(wait=False)
        if state.clip_batcher is not None:
            state.clip_batcher.close()
        state.runtime.close()
        log.info("stopped")


async def drain_streams(app: FastAPI, timeout: float = 5.0) -> None:
    """Stop admitting and close every stream with 1001 (the CLI calls this before uvicorn drops sockets)."""
    state = app.state
    state.ready = False
    state.shutting_down = True
    if state.registry is not None and (len(state.registry) or state.registry.admitting):
        await state.registry.close_all(timeout=timeout)


def _start_scheduler(app: FastAPI, runtime: ModelRuntime) -> Scheduler:
    """One running scheduler per model runtime, with the app's limits, metrics and dead-runtime hook."""
    settings = app.state.settings
    scheduler = Scheduler(
        runtime,
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        buckets=list(settings.batch_buckets),
        metrics=app.state.metrics,
        on_dead=lambda reason: _on_dead(app, reason),
        max_batches_in_flight=settings.max_batches_in_flight,
    )
    scheduler.start()
    return scheduler


def _on_dead(app: FastAPI, reason: str) -> None:
    """The runtime is dead: unhealthy at once, streams closed with 1011, then the process exits."""
    state = app.state
    state.runtime_dead = reason
    state.ready = False
    from service.api.protocol import CloseCode

    for session in state.registry.sessions() if state.registry else []:
        session.request_close(CloseCode.INTERNAL_ERROR, "model runtime failed; the server restarts")
    asyncio.get_running_loop().call_later(1.0, state.request_exit)


def create_app(settings: Settings | None = None, *, runtime_factory: RuntimeFactory | None = None) -> FastAPI:
    """A new app; nothing is loaded until its lifespan starts. ``runtime_factory`` swaps the runtime
    (a remote one, or a test double) without touching the rest."""
    settings = settings or Settings()
    app = FastAPI(title="mgstream", version=__version__, lifespan=lifespan)
    state = app.state
    state.settings = settings
    state.metrics = Metrics()
    state.runtime_factory = runtime_factory or _load_runtime
    state.runtime = None
    state.scheduler = None
    state.step_runtime = None
    state.step_scheduler = None
    state.registry = None
    state.featurizer_pool = None
    state.clip_batcher = None
    state.serving = None
    state.ready = False
    state.shutting_down = False
    state.runtime_dead = None
    state.jobs = None
    state.request_exit = _default_exit
    app.include_router(ops.router)
    app.include_router(ws.router)
    app.include_router(batch.router)
    # Optional areas, present when their modules are installed.
    if importlib.util.find_spec("service.api.web") is not None:
        from service.api import web

        app.include_router(web.router)
    return app


def factory() -> FastAPI:
    """For ``uvicorn --factory service.app:factory``: settings from the environment, logging configured."""
    from service.log_config import setup_logging

    settings = Settings()
    setup_logging(settings.log_level)
    return create_app(settings)
