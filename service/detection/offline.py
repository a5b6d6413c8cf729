"""The streaming detector over a whole steps array, at full speed and without drops.

Same windows, same decision points, same tracker as a live stream (:class:`StreamDetector`), so a
file and a live stream of the same steps yield identical events. Windows do not depend on the
tracker, so they are scored in batches; only the tracker runs in order.

- :func:`detect_steps_sync`: direct, blocking; takes a :class:`ModelRuntime` or any function
  ``(B, W, D) -> (scores, offsets)`` (the trainer's causal-windowed evaluation passes one).
- :func:`detect_steps`: async, through the server's scheduler (batch jobs share the live batches).
- :func:`full_sequence_detections`: the whole-sequence decode (no tracker), the quality baseline.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from service.contract.model_card import OFFSETS_OUTPUT, SCORES_OUTPUT, WINDOW_INPUT, ModelCard, anchor_steps
from service.detection.decode import Detection, decode
from service.detection.events import StreamDetector, StreamEvent, TrackerParams, window_ends
from service.runtime.base import ModelRuntime

if TYPE_CHECKING:
    from service.batching.scheduler import Scheduler
    from service.config import Settings

WindowFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def window_at(steps: np.ndarray, end: int, window: int) -> np.ndarray:
    """The (window, D) input ending at step ``end``, left-padded with zeros (as the live ring does)."""
    out = np.zeros((window, steps.shape[1]), dtype=np.float32)
    chunk = steps[max(0, end - window) : end]
    out[window - len(chunk) :] = chunk
    return out


def _check_steps(steps: np.ndarray, card: ModelCard) -> np.ndarray:
    steps = np.asarray(steps, dtype=np.float32)
    if steps.ndim != 2 or steps.shape[1] != card.feature.feature_dim:
        raise ValueError(f"steps must have shape (T, {card.feature.feature_dim}), got {steps.shape}")
    if not np.isfinite(steps).all():
        raise ValueError("steps contain NaN or Inf")
    return steps


def _chunks(ends: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(ends), size):
        yield ends[i : i + size]


def _as_window_fn(model: ModelRuntime | WindowFn) -> WindowFn:
    if isinstance(model, ModelRuntime):

        def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            out = model.run({WINDOW_INPUT: batch})
            return out[SCORES_OUTPUT], out[OFFSETS_OUTPUT]

        return run
    return model


def detect_steps_sync(
    model: ModelRuntime | WindowFn,
    steps: np.ndarray,
    card: ModelCard,
    *,
    hop_steps: int | None = None,
    score_threshold: float | None = None,
    classes: list[int] | None = None,
    fps: float | None = None,
    params: TrackerParams | None = None,
    max_batch: int = 32,
) -> list[StreamEvent]:
    """Events of a whole (T, D) steps array, exactly as a live stream of those steps would get them."""
    steps = _check_steps(steps, card)
    detector = StreamDetector(
        card, hop_steps=hop_steps, score_threshold=score_threshold, classes=classes, fps=fps, params=params
    )
    run = _as_window_fn(model)
    events: list[StreamEvent] = []
    ends = window_ends(len(steps), detector.hop_steps)
    for chunk in _chunks(ends, max_batch):
        batch = np.stack([window_at(steps, n, detector.window_steps) for n in chunk])
        scores, offsets = run(batch)
        for i, n in enumerate(chunk):
            events.extend(detector.update(n, scores[i], offsets[i]))
    events.extend(detector.finish(len(steps)))
    return events


async def detect_steps(
    steps: np.ndarray,
    *,
    card: ModelCard,
    scheduler: Scheduler,
    settings: Settings | None = None,
    key: str | None = None,
    hop_steps: int | None = None,
    score_threshold: float | None = None,
    classes: list[int] | None = None,
    fps: float | None = None,
    params: TrackerParams | None = None,
    concurrency: int | None = None,
) -> list[StreamEvent]:
    """As :func:`detect_steps_sync`, with windows scored by the server's scheduler.

    ``settings`` supplies the hop (``hop_steps``) and the number of windows in flight
    (half of ``max_batch``) when not given. ``key`` names the job; window ``i`` is submitted as
    ``f"{key}#{i}"`` so the scheduler's one-request-per-stream rule holds while a job still
    fills several batch slots.
    """
    key = key or f"offline-{uuid.uuid4().hex[:12]}"
    if settings is not None:
        hop_steps = hop_steps or settings.hop_steps
        concurrency = concurrency or max(1, settings.max_batch // 2)  # leave room for live streams
    concurrency = max(1, concurrency or 8)
    steps = _check_steps(steps, card)
    detector = StreamDetector(
        card, hop_steps=hop_steps, score_threshold=score_threshold, classes=classes, fps=fps, params=params
    )
    events: list[StreamEvent] = []
    ends = window_ends(len(steps), detector.hop_steps)
    for chunk in _chunks(ends, concurrency):
        results = await asyncio.gather(
            *(
                scheduler.submit(f"{key}#{i}", {WINDOW_INPUT: window_at(steps, n, detector.window_steps)})
                for i, n in enumerate(chunk)
            ),
            return_exceptions=True,  # let every window settle before raising, so none is left orphaned
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        for n, out in zip(chunk, results, strict=True):
            events.extend(detector.update(n, out[SCORES_OUTPUT], out[OFFSETS_OUTPUT]))
    events.extend(detector.finish(len(steps)))
    return events


def gesture_ends(events: list[StreamEvent]) -> list[StreamEvent]:
    return [e for e in events if e.type == "gesture_end"]


def full_sequence_detections(
    model: ModelRuntime | WindowFn,
    steps: np.ndarray,
    card: ModelCard,
    *,
    score_threshold: float | None = None,
    max_batch: int = 32,
) -> list[Detection]:
    """Reference decode of a whole sequence at once (no tracker): every anchor's output is taken from a
    window that gives it half a window of past context, then one global decode with the card's NMS.

    For a causal model whose receptive field fits in half a window this equals a single forward over
    the whole sequence; it is the offline baseline that streamed events are measured against.
    """
    steps = _check_steps(steps, card)
    w, top = card.window_steps, max(card.strides)
    hop = max(top, (w // 2) // top * top)
    total = len(steps)
    if total == 0:
        return []
    padded = -(-total // hop) * hop  # right padding cannot change earlier outputs of a causal model
    seq = np.zeros((padded, steps.shape[1]), dtype=np.float32)
    seq[:total] = steps
    rel = anchor_steps(w, card.strides)
    ends = list(range(hop, padded + 1, hop))
    run = _as_window_fn(model)
    all_scores, all_offsets, all_anchors = [], [], []
    for chunk in _chunks(ends, max_batch):
        scores, offsets = run(np.stack([window_at(seq, e, w) for e in chunk]))
        for i, e in enumerate(chunk):
            absolute = rel + (e - w)
            keep = (absolute > e - hop - 1) & (absolute < total)
            all_scores.append(scores[i][keep])
            all_offsets.append(offsets[i][keep])
            all_anchors.append(absolute[keep])
    return decode(
        np.concatenate(all_scores),
        np.concatenate(all_offsets),
        np.concatenate(all_anchors),
        card.postprocess,
        score_threshold=score_threshold,
    )
