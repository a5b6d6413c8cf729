"""Causal event logic: per-window detections in, ``gesture_start`` / ``gesture_end`` events out.

The stream is scored at decision points: every ``hop`` steps, on the last ``window`` steps
(left-padded with zeros while the stream is younger than a window), and once more at the end
when the last hop is partial. Each window is decoded with :func:`service.detection.decode.decode`
and the model card's post-processing, then a small tracker turns overlapping windows into events:

- a detection that matches no known gesture (same class and tIoU >= ``match_iou`` or
  containment >= ``match_containment``) opens a gesture and emits ``gesture_start``;
- a gesture keeps the bounds and score of its best-scoring detection so far (NMS across windows,
  which is what a full-sequence decode keeps);
- it closes, emitting ``gesture_end`` with those final bounds, once its latest detection ends more
  than ``close_margin_steps`` before the window edge, or when no detection matched it for
  ``patience_windows`` windows in a row, or at the end of the stream;
- a detection that matches an already closed gesture is ignored, so nothing is reported twice.

Everything is a deterministic function of the sequence of windows, so the live server and
:mod:`service.detection.offline` emit identical events for the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.api.protocol import GestureEvent
from service.contract.model_card import ModelCard, anchor_steps
from service.detection.decode import Detection, decode

DEFAULT_HOP_STEPS = 4


@dataclass(frozen=True)
class TrackerParams:
    match_iou: float = 0.3
    match_containment: float = 0.7
    close_margin_steps: float = 2.0
    patience_windows: int = 2


@dataclass(frozen=True)
class StreamEvent:
    """One event in stream units; frames are counted from the first processed frame."""

    type: str  # "gesture_start" | "gesture_end"
    event_id: int
    class_id: int
    label: str
    score: float
    start_step: float
    end_step: float
    decided_at_step: int
    start_frame: int
    end_frame: int
    decided_at_frame: int
    start_time: float
    end_time: float
    decided_at_time: float

    def to_message(self, stream_id: str) -> GestureEvent:
        return GestureEvent(
            type=self.type,  # type: ignore[arg-type]
            stream_id=stream_id,
            event_id=self.event_id,
            class_id=self.class_id,
            label=self.label,
            score=self.score,
            start_frame=self.start_frame,
            end_frame=self.end_frame,
            start_time=self.start_time,
            end_time=self.end_time,
            decided_at_frame=self.decided_at_frame,
            decided_at_time=self.decided_at_time,
        )


@dataclass
class _Track:
    event_id: int
    class_id: int
    score: float
    start: float
    end: float
    latest_end: float = 0.0  # end of this window's matching detection
    missed: int = 0


def _overlaps(a0: float, a1: float, b0: float, b1: float, iou: float, containment: float) -> bool:
    inter = min(a1, b1) - max(a0, b0)
    if inter <= 0:
        return False
    la, lb = a1 - a0, b1 - b0
    return inter / (la + lb - inter) >= iou or inter / max(min(la, lb), 1e-9) >= containment


class EventTracker:
    """Turns the detections of successive windows into start/end events (see the module docstring)."""

    def __init__(
        self,
        card: ModelCard,
        *,
        frames_per_step: int,
        fps: float,
        window_steps: int,
        params: TrackerParams | None = None,
    ) -> None:
        self.card = card
        self.frames_per_step = frames_per_step
        self.fps = fps
        self.window_steps = window_steps
        self.params = params or TrackerParams()
        self._active: list[_Track] = []
        self._closed: list[_Track] = []
        self._next_id = 1

    @property
    def open_gestures(self) -> int:
        return len(self._active)

    def _event(self, kind: str, t: _Track, n: int, end: float) -> StreamEvent:
        f, fps = self.frames_per_step, self.fps
        start_frame, end_frame, decided = round(t.start * f), round(end * f), n * f
        return StreamEvent(
            type=kind,
            event_id=t.event_id,
            class_id=t.class_id,
            label=self.card.classes[t.class_id - 1],
            score=t.score,
            start_step=t.start,
            end_step=end,
            decided_at_step=n,
            start_frame=start_frame,
            end_frame=end_frame,
            decided_at_frame=decided,
            start_time=start_frame / fps,
            end_time=end_frame / fps,
            decided_at_time=decided / fps,
        )

    def _match(self, tracks: list[_Track], d: Detection, start: float) -> _Track | None:
        p = self.params
        for t in tracks:
            if t.class_id == d.class_id and _overlaps(
                start, d.end_step, t.start, t.end, p.match_iou, p.match_containment
            ):
                return t
        return None

    def update(self, n: int, detections: list[Detection]) -> list[StreamEvent]:
        """Feed the decoded detections of the window ending at step ``n`` (stream-absolute steps)."""
        events: list[StreamEvent] = []
        matched: set[int] = set()
        for d in sorted(detections, key=lambda d: (-d.score, d.start_step, d.class_id)):
            if d.end_step <= 0:
                continue  # entirely inside the zero padding before the stream began
            start = max(d.start_step, 0.0)
            track = self._match(self._active, d, start)
            if track is not None:
                if track.event_id not in matched:
                    matched.add(track.event_id)
                    track.latest_end = d.end_step
                else:
                    track.latest_end = max(track.latest_end, d.end_step)
                if d.score > track.score:
                    track.score, track.start, track.end = d.score, start, d.end_step
                continue
            if self._match(self._closed, d, start) is not None:
                continue  # already reported
            track = _Track(self._next_id, d.class_id, d.score, start, d.end_step, latest_end=d.end_step)
            self._next_id += 1
            self._active.append(track)
            matched.add(track.event_id)
            events.append(self._event("gesture_start", track, n, track.end))
        still_open = []
        for t in self._active:
            if t.event_id in matched:
                t.missed = 0
                done = t.latest_end < n - self.params.close_margin_steps
            else:
                t.missed += 1
                done = t.missed >= self.params.patience_windows
            if done:
                events.append(self._close(t, n))
            else:
                still_open.append(t)
        self._active = still_open
        horizon = n - 2 * self.window_steps
        self._closed = [t for t in self._closed if t.end >= horizon]
        return events

    def _close(self, t: _Track, n: int) -> StreamEvent:
        t.end = min(t.end, float(n))
        self._closed.append(t)
        return self._event("gesture_end", t, n, t.end)

    def finish(self, n: int) -> list[StreamEvent]:
        """End of stream at step ``n``: close every open gesture."""
        events = [self._close(t, n) for t in self._active]
        self._active = []
        return events


class StreamDetector:
    """Per-stream decision schedule + decode + tracker. Holds no model: callers score the windows."""

    def __init__(
        self,
        card: ModelCard,
        *,
        hop_steps: int | None = None,
        score_threshold: float | None = None,
        classes: list[int] | None = None,
        fps: float | None = None,
        params: TrackerParams | None = None,
    ) -> None:
        self.card = card
        self.window_steps = card.window_steps
        self.hop_steps = int(hop_steps or card.architecture.get("hop_steps") or DEFAULT_HOP_STEPS)
        if not 1 <= self.hop_steps <= self.window_steps:
            raise ValueError(f"hop {self.hop_steps} must be in 1..{self.window_steps} steps")
        self.score_threshold = score_threshold
        self.classes = set(classes) if classes else None
        self.anchors = anchor_steps(card.window_steps, card.strides)
        self.tracker = EventTracker(
            card,
            frames_per_step=card.feature.frames_per_step,
            fps=fps or card.feature.fps,
            window_steps=self.window_steps,
            params=params,
        )
        self.last_scored = 0  # step count of the last scored window

    def is_due(self, n: int) -> bool:
        """A window ends at step ``n`` (``n`` steps seen) and must be scored."""
        return n > 0 and n % self.hop_steps == 0

    def needs_final(self, n: int) -> bool:
        """At end of stream: the last partial hop still needs a window."""
        return n > self.last_scored

    def detections(self, n: int, scores: np.ndarray, offsets: np.ndarray) -> list[Detection]:
        found = decode(
            scores,
            offsets,
            self.anchors,
            self.card.postprocess,
            step_offset=n - self.window_steps,
            score_threshold=self.score_threshold,
        )
        return [d for d in found if self.classes is None or d.class_id in self.classes]

    def update(self, n: int, scores: np.ndarray, offsets: np.ndarray) -> list[StreamEvent]:
        """Outputs (N, C) and (N, 2) of the window ending at step ``n``."""
        self.last_scored = n
        return self.tracker.update(n, self.detections(n, scores, offsets))

    def finish(self, n: int) -> list[StreamEvent]:
        return self.tracker.finish(n)


def window_ends(total_steps: int, hop_steps: int) -> list[int]:
    """Every decision point of a stream of ``total_steps`` steps, the final partial hop included."""
    ends = list(range(hop_steps, total_steps + 1, hop_steps))
    if total_steps > 0 and (not ends or ends[-1] != total_steps):
        ends.append(total_steps)
    return ends
