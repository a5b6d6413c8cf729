"""Step-mode event path: per-position outputs of the step model in, ``gesture_start``/``gesture_end`` out.

A :class:`StepStream` owns one stream's cached model state (fixed size, see
service/contract/step_layout.py) and the final per-position outputs of its last ``window_steps``
steps. Each model call adds the positions that became final in the chunk; nothing is recomputed.
At every decision point (every ``hop_steps``, a multiple of the chunk) the cached outputs of the
last ``window_steps`` steps are decoded with the card's post-processing and fed to the same
:class:`EventTracker` as window mode. Positions are stream-aligned (the step model equals the full
causal forward), so when window mode's windows are aligned with the pyramid (hop a multiple of
the largest stride) and hold the whole past, both modes see identical outputs and emit identical
events (tests/test_step_serving.py). The batch path (:func:`detect_steps_step_sync`) runs the same
model chunk by chunk over a whole file, so batch and live share one computation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from service.contract.model_card import ModelCard
from service.contract.step_layout import (
    FEATURES_INPUT,
    OFFSETS_OUTPUT,
    PHASE_INPUT,
    PHASE_OUTPUT,
    SCORES_OUTPUT,
    STATE_INPUT,
    STATE_OUTPUT,
    VALID_OUTPUT,
    StepLayout,
)
from service.detection.decode import Detection, decode
from service.detection.events import EventTracker, StreamEvent, TrackerParams
from service.runtime.base import ModelRuntime

Arrays = dict[str, np.ndarray]
StepFn = Callable[[Arrays], Arrays]  # batch-first arrays in, batch-first arrays out


class _LevelRing:
    """The last ``cap`` final outputs of one pyramid level. Every row is written twice (at i and
    i + cap), so any run of up to ``cap`` consecutive positions is one contiguous slice: reading the
    window at every decision costs no index arithmetic or gather."""

    def __init__(self, cap: int, classes: int) -> None:
        self.scores = np.zeros((2 * cap, classes), np.float32)
        self.offsets = np.zeros((2 * cap, 2), np.float32)
        self.cap, self.count = cap, 0  # count: positions ever written (= next position index)

    def push(self, scores: np.ndarray, offsets: np.ndarray) -> None:
        i = self.count % self.cap
        self.scores[i] = self.scores[i + self.cap] = scores
        self.offsets[i] = self.offsets[i + self.cap] = offsets
        self.count += 1

    def span(self, end: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions end-k .. end-1 (k <= cap, none of them overwritten yet)."""
        stop = end % self.cap + self.cap
        return self.scores[stop - k : stop], self.offsets[stop - k : stop]


class StepStream:
    """One stream in step mode: model state, cached outputs, decision schedule and tracker."""

    def __init__(
        self,
        card: ModelCard,
        layout: StepLayout,
        *,
        window_steps: int | None = None,
        hop_steps: int | None = None,
        score_threshold: float | None = None,
        classes: list[int] | None = None,
        fps: float | None = None,
        params: TrackerParams | None = None,
    ) -> None:
        self.card, self.layout = card, layout
        self.chunk = layout.chunk_steps
        self.window_steps = int(window_steps or card.window_steps)
        self.hop_steps = int(hop_steps or self.chunk)
        if self.hop_steps % self.chunk:
            raise ValueError(f"step-mode hop {self.hop_steps} must be a multiple of the chunk {self.chunk}")
        self.score_threshold = card.postprocess.score_threshold if score_threshold is None else score_threshold
        self.classes = set(classes) if classes else None
        self.state = layout.initial_state()
        self.steps_in = 0  # steps fed to the model (zero padding of a final partial chunk included)
        self.strides = np.asarray(layout.strides)
        self.rings = [_LevelRing(self.window_steps // s + 1, card.num_classes) for s in layout.strides]
        # Positions with a score at or above the threshold, per level: decode sees nothing else, so a
        # decision whose window holds the same such positions as the last one reuses its detections.
        self._hot: list[deque[int]] = [deque() for _ in layout.strides]
        self._last: tuple[tuple, list[Detection]] | None = None
        self._slot_levels = layout.slot_levels()
        self._slot_offsets = layout.slot_anchor_offsets().astype(np.int64)
        self.tracker = EventTracker(
            card,
            frames_per_step=card.feature.frames_per_step,
            fps=fps or card.feature.fps,
            window_steps=self.window_steps,
            params=params,
        )
        self.last_decided = 0

    def next_chunk(self, ring) -> tuple[np.ndarray, int]:  # noqa: ANN001 - service.streams.ringbuffer.FeatureRing
        """The oldest chunk of steps not fed yet, from the stream's feature ring, and its real length
        (< H only for the zero-padded end of the stream)."""
        behind = ring.total - self.steps_in
        if not 1 <= behind <= ring.capacity:
            raise ValueError(f"{behind} steps not fed yet; the ring holds {ring.capacity}")
        rows = ring.last(behind)[: self.chunk]
        if len(rows) == self.chunk:
            return rows, self.chunk
        chunk = np.zeros((self.chunk, rows.shape[1]), np.float32)
        chunk[: len(rows)] = rows
        return chunk, len(rows)

    def request(self, chunk: np.ndarray) -> Arrays:
        """The model inputs (no batch axis) for the next (H, D) chunk of steps."""
        return {FEATURES_INPUT: np.asarray(chunk, np.float32), **self.state}

    def consume(self, out: Arrays, real_steps: int | None = None) -> list[StreamEvent]:
        """Take one call's outputs (no batch axis): keep the new state and the final positions, and
        decide at every decision point inside the chunk. ``real_steps`` < H marks a zero-padded last
        chunk: positions past the real end are dropped."""
        start = self.steps_in
        real = self.chunk if real_steps is None else real_steps
        self.state = {PHASE_INPUT: out[PHASE_OUTPUT], STATE_INPUT: out[STATE_OUTPUT]}
        self.steps_in += self.chunk
        scores = out[SCORES_OUTPUT]
        hot = np.max(scores, axis=1) >= self.score_threshold
        for slot in np.flatnonzero(out[VALID_OUTPUT]):
            if self._slot_offsets[slot] < real:
                level = self._slot_levels[slot]
                ring = self.rings[level]
                if hot[slot]:
                    self._hot[level].append(ring.count)
                ring.push(scores[slot], out[OFFSETS_OUTPUT][slot])
        n = start + real
        if n > 0 and n % self.hop_steps == 0:
            return self.decide(n)
        return []

    def detections(self, n: int) -> list[Detection]:
        """Decode the final outputs whose anchors lie in the last ``window_steps`` steps before n
        (``n`` never decreases from one call to the next)."""
        spans = []
        for ring, hot, s in zip(self.rings, self._hot, self.strides, strict=True):
            done = min(ring.count, n // s)  # positions whose anchor (p+1)s-1 < n
            first = max(0, -(-(n - self.window_steps + 1) // s) - 1)  # anchor >= n - window
            while hot and hot[0] < first:
                hot.popleft()  # left every window from now on
            # Usually every hot position is final by n and the deque is the window's set as it is.
            inside = hot if not hot or hot[-1] < done else [p for p in hot if p < done]
            spans.append((done, first, len(inside), inside[0] if inside else -1, inside[-1] if inside else -1))
        # Hot positions only join at the end and leave at the start, so count and ends identify the set.
        signature = tuple(span[2:] for span in spans)
        if self._last is not None and self._last[0] == signature:
            return self._last[1]
        found = self._decode(n, spans)
        self._last = (signature, found)
        return found

    def _decode(self, n: int, spans: list[tuple[int, ...]]) -> list[Detection]:
        if not any(span[2] for span in spans):
            return []  # nothing at or above the threshold in the window: decode would find nothing
        scores, offsets, anchors = [], [], []
        for ring, s, (done, first, *_) in zip(self.rings, self.strides, spans, strict=True):
            k = max(0, done - first)
            if k == 0:
                continue
            sc, off = ring.span(done, k)
            scores.append(sc)
            offsets.append(off)
            anchors.append((np.arange(done - k, done) + 1) * s - 1)
        if not scores:
            return []
        found = decode(
            np.concatenate(scores),
            np.concatenate(offsets),
            np.concatenate(anchors).astype(np.float32),
            self.card.postprocess,
            score_threshold=self.score_threshold,
        )
        return [d for d in found if self.classes is None or d.class_id in self.classes]

    def decide(self, n: int) -> list[StreamEvent]:
        self.last_decided = n
        return self.tracker.update(n, self.detections(n))

    def finish(self, n: int) -> list[StreamEvent]:
        """End of stream at step n: a last decision if n was not one, then close every gesture."""
        events = self.decide(n) if n > self.last_decided else []
        return events + self.tracker.finish(n)


def _as_step_fn(model: ModelRuntime | StepFn) -> StepFn:
    return model.run if isinstance(model, ModelRuntime) else model


def detect_steps_step_sync(
    model: ModelRuntime | StepFn,
    steps: np.ndarray,
    card: ModelCard,
    layout: StepLayout,
    **stream_options,
) -> list[StreamEvent]:
    """Events of a whole (T, D) steps array through the step model, chunk by chunk, exactly as a live
    stream of those steps gets them (same state, same decisions)."""
    steps = np.asarray(steps, dtype=np.float32)
    if steps.ndim != 2 or steps.shape[1] != card.feature.feature_dim:
        raise ValueError(f"steps must have shape (T, {card.feature.feature_dim}), got {steps.shape}")
    run = _as_step_fn(model)
    stream = StepStream(card, layout, **stream_options)
    h, total = layout.chunk_steps, len(steps)
    events: list[StreamEvent] = []
    for start in range(0, total, h):
        chunk = np.zeros((h, steps.shape[1]), np.float32)
        real = min(h, total - start)
        chunk[:real] = steps[start : start + real]
        batch = {name: value[None] for name, value in stream.request(chunk).items()}
        out = {name: value[0] for name, value in run(batch).items()}
        events.extend(stream.consume(out, real))
    events.extend(stream.finish(total))
    return events


async def detect_steps_step(
    steps: np.ndarray,
    *,
    card: ModelCard,
    layout: StepLayout,
    scheduler,  # noqa: ANN001 - service.batching.scheduler.Scheduler of the step runtime (or a wrapper)
    key: str,
    on_decision: Callable[[], None] | None = None,
    **stream_options,
) -> list[StreamEvent]:
    """:func:`detect_steps_step_sync` through the server's step scheduler: the file is one
    more stream whose chunks share batches with the live streams. ``on_decision`` is called at every
    decision point (job progress)."""
    steps = np.asarray(steps, dtype=np.float32)
    if steps.ndim != 2 or steps.shape[1] != card.feature.feature_dim:
        raise ValueError(f"steps must have shape (T, {card.feature.feature_dim}), got {steps.shape}")
    stream = StepStream(card, layout, **stream_options)
    h, total = layout.chunk_steps, len(steps)
    events: list[StreamEvent] = []
    for start in range(0, total, h):
        chunk = np.zeros((h, steps.shape[1]), np.float32)
        real = min(h, total - start)
        chunk[:real] = steps[start : start + real]
        out = await scheduler.submit(key, stream.request(chunk))
        events.extend(stream.consume(out, real))
        if on_decision is not None and ((start + real) % stream.hop_steps == 0 or start + real == total):
            on_decision()
    events.extend(stream.finish(total))
    return events
