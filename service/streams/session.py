"""Everything one stream owns: config, featurizer, feature ring, detector, queues, counters, deadlines.

Nothing per stream lives on a shared object: the registry only holds references to sessions, and
the scheduler only sees a session's key and its current window.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass

from service.api.protocol import CloseCode, StartMessage, StatusMessage
from service.detection.events import StreamDetector
from service.detection.step_events import StepStream
from service.features.base import Featurizer
from service.streams.outbox import Outbox
from service.streams.ringbuffer import FeatureRing


@dataclass(frozen=True)
class InboundFrame:
    """One media message: ``frames`` frames (keypoints and features may carry several), the first at ``seq``."""

    seq: int
    timestamp: float
    payload: bytes
    arrival: float  # monotonic
    frames: int = 1


@dataclass
class Counters:
    frames_received: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    bad_messages: int = 0
    events: int = 0
    windows: int = 0


@dataclass
class CloseRequest:
    code: int
    reason: str


class StreamSession:
    """Created at admission (before ``start``); :meth:`configure` attaches the stream's pipeline."""

    def __init__(
        self, *, inbound_frames: int, outbound_messages: int, idle_timeout_s: float, max_session_s: float
    ) -> None:
        self.key = uuid.uuid4().hex  # internal, unique: the scheduler key
        self.stream_id: str = self.key[:12]
        self.started_at = time.monotonic()
        self.last_activity = self.started_at
        self.idle_timeout_s = idle_timeout_s
        self.deadline = self.started_at + max_session_s
        self.inbound: deque[InboundFrame] = deque()
        self.inbound_limit = inbound_frames
        self.queued_frames = 0  # frames in ``inbound`` (a message may carry several)
        self.inbound_ready = asyncio.Event()
        self.outbox = Outbox(outbound_messages)
        self.counters = Counters()
        self.config: StartMessage | None = None
        self.featurizer: Featurizer | None = None
        self.detector: StreamDetector | None = None
        self.ring: FeatureRing | None = None
        self.step: StepStream | None = None  # step mode: the stream's model state and final outputs
        self.authenticated = False
        self.ended = False  # the client sent `end`
        self.close_request: CloseRequest | None = None
        self.close_requested = asyncio.Event()

    # ---------------------------------------------------------- lifecycle

    @property
    def started(self) -> bool:
        return self.config is not None

    def configure(self, config: StartMessage, featurizer: Featurizer, detector: StreamDetector) -> None:
        self.config = config
        if config.stream_id:
            self.stream_id = config.stream_id
        self.featurizer = featurizer
        self.detector = detector
        # Room for one window plus a hop: the window being scored never overlaps rows being written.
        dim = detector.card.feature.feature_dim
        self.ring = FeatureRing(detector.window_steps + detector.hop_steps, dim)

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def request_close(self, code: int, reason: str) -> None:
        """Ask the connection's handler to close (first request wins)."""
        if self.close_request is None:
            self.close_request = CloseRequest(code, reason)
            self.close_requested.set()

    def expired(self, now: float) -> CloseRequest | None:
        """Which deadline, if any, this session has passed."""
        if now - self.last_activity > self.idle_timeout_s:
            return CloseRequest(CloseCode.IDLE_TIMEOUT, f"no message for {self.idle_timeout_s:g} s")
        if now > self.deadline:
            return CloseRequest(CloseCode.SESSION_TOO_LONG, "maximum session duration reached")
        return None

    # ---------------------------------------------------------- inbound (live policy: drop oldest)

    def push_frame(self, frame: InboundFrame) -> int:
        """Queue a received message; returns how many frames were dropped for it (the oldest first).

        The limit counts frames, not messages; a single message above it is still taken whole."""
        self.counters.frames_received += frame.frames
        dropped = 0
        while self.inbound and self.queued_frames + frame.frames > self.inbound_limit:
            oldest = self.inbound.popleft()
            self.queued_frames -= oldest.frames
            dropped += oldest.frames
        self.counters.frames_dropped += dropped
        self.inbound.append(frame)
        self.queued_frames += frame.frames
        self.inbound_ready.set()
        return dropped

    async def next_frame(self) -> InboundFrame | None:
        """The oldest queued frame; None once the client ended and the queue is drained."""
        while not self.inbound:
            if self.ended:
                return None
            self.inbound_ready.clear()
            await self.inbound_ready.wait()
        frame = self.inbound.popleft()
        self.queued_frames -= frame.frames
        return frame

    def mark_ended(self) -> None:
        self.ended = True
        self.inbound_ready.set()

    # ---------------------------------------------------------- status

    def status(self) -> StatusMessage:
        c = self.counters
        lag_frames = self.queued_frames
        fps = self.config.fps if self.config else 30.0
        return StatusMessage(
            stream_id=self.stream_id,
            frames_received=c.frames_received,
            frames_processed=c.frames_processed,
            frames_dropped=c.frames_dropped,
            steps=self.ring.total if self.ring else 0,
            lag_frames=lag_frames,
            lag_s=round(lag_frames / fps, 3),
        )

    def release(self) -> None:
        """Drop the heavy per-stream state (ring, queues); the featurizer is closed by its owner."""
        self.inbound.clear()
        self.queued_frames = 0
        self.outbox.clear()
        self.ring = None
        self.step = None  # frees the cached model state
        self.detector = None
        self.featurizer = None
