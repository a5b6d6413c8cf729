"""WebSocket wire protocol for ``/v1/streams``: pydantic models, the binary frame header, close codes.

This module imports nothing else from the service, so the client package reuses it as is.
See docs/protocol.md for the prose version.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

PROTOCOL_VERSION = 1

# Binary media message: fixed little-endian header, then the payload.
#   u8 version | u8 reserved | u16 frames | u32 seq | f64 capture timestamp (seconds)
# `frames`: keypoint frames or feature steps in the payload (0 reads as 1, so a zeroed field is one
# frame); images are always one. `seq` and the timestamp are those of the first frame.
HEADER = struct.Struct("<BBHId")
HEADER_SIZE = HEADER.size  # 16 bytes
MAX_FRAMES_PER_MESSAGE = 0xFFFF


class InputKind:
    JPEG = "jpeg"
    PNG = "png"
    KEYPOINTS = "keypoints"  # float32[n, 258] little-endian, canonical MediaPipe Holistic layout
    FEATURES = "features"  # float32[n, feature_dim] little-endian, n feature steps


class CloseCode(IntEnum):
    """WebSocket close codes used by the server (documented in docs/protocol.md)."""

    NORMAL = 1000  # after `end`: all final events were sent
    SHUTDOWN = 1001  # server going away
    PROTOCOL_VIOLATION = 1008  # e.g. binary before `start`, a second `start`, too many bad messages
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011  # runtime failure
    OVERLOADED = 1013  # max sessions reached: try again later
    UNAUTHORIZED = 4401  # missing or wrong API key
    IDLE_TIMEOUT = 4408  # no message within idle_timeout_s
    SESSION_TOO_LONG = 4409  # max_session_s exceeded
    SLOW_CONSUMER = 4429  # client does not read its events


class ErrorCode:
    BAD_MESSAGE = "bad_message"  # malformed JSON or unknown type
    BAD_HEADER = "bad_header"  # binary message shorter than the header or wrong version
    BAD_FRAME = "bad_frame"  # payload that cannot be decoded (corrupt image, wrong size, NaN/Inf)
    TOO_BIG = "too_big"
    NOT_STARTED = "not_started"
    ALREADY_STARTED = "already_started"
    UNSUPPORTED = "unsupported"  # input kind this model cannot take
    INFERENCE_FAILED = "inference_failed"
    OVERLOADED = "overloaded"
    UNAUTHORIZED = "unauthorized"
    INTERNAL = "internal"


def pack_header(seq: int, timestamp: float, frames: int = 1) -> bytes:
    if not 1 <= frames <= MAX_FRAMES_PER_MESSAGE:
        raise ValueError(f"frames per message must be in 1..{MAX_FRAMES_PER_MESSAGE}, got {frames}")
    return HEADER.pack(PROTOCOL_VERSION, 0, frames, seq & 0xFFFFFFFF, float(timestamp))


def unpack_header(message: bytes) -> tuple[int, float, int, memoryview]:
    """Split a binary message into (seq, timestamp, frames, payload); ValueError on a bad header."""
    if len(message) < HEADER_SIZE:
        raise ValueError(f"binary message of {len(message)} bytes is shorter than the {HEADER_SIZE}-byte header")
    version, _, frames, seq, ts = HEADER.unpack_from(message)
    if version != PROTOCOL_VERSION:
        raise ValueError(f"header version {version} is not {PROTOCOL_VERSION}")
    return seq, ts, max(frames, 1), memoryview(message)[HEADER_SIZE:]


def pack_frame(seq: int, timestamp: float, payload: bytes, frames: int = 1) -> bytes:
    """A media message; ``frames`` > 1 when the payload holds that many keypoint frames or feature steps."""
    return pack_header(seq, timestamp, frames) + payload


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- client -> server (text) ----


class StartMessage(_Message):
    type: Literal["start"] = "start"
    input: Literal["jpeg", "png", "keypoints", "features"]
    fps: float = Field(30.0, gt=0, le=240)
    stream_id: str | None = Field(None, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    score_threshold: float | None = Field(None, ge=0.0, le=1.0)
    classes: list[int] | None = Field(None, description="1-based class ids to report; all when omitted")
    status_every_s: float = Field(1.0, ge=0.1, le=60)
    api_key: str | None = Field(None, description="for browsers, which cannot set headers")


class EndMessage(_Message):
    type: Literal["end"] = "end"


ClientMessage = Annotated[StartMessage | EndMessage, Field(discriminator="type")]
client_message_adapter: TypeAdapter[StartMessage | EndMessage] = TypeAdapter(ClientMessage)


# ---- server -> client (text) ----


class ReadyMessage(_Message):
    type: Literal["ready"] = "ready"
    stream_id: str
    protocol: int = PROTOCOL_VERSION
    model: str
    model_version: str
    input: str
    fps: float
    frames_per_step: int
    window_steps: int
    hop_steps: int
    mode: Literal["window", "step"]
    feature_dim: int
    keypoint_dim: int
    classes: list[str]
    max_message_bytes: int


class GestureEvent(_Message):
    """`gesture_start` and `gesture_end` share this shape and their `event_id`."""

    type: Literal["gesture_start", "gesture_end"]
    stream_id: str
    event_id: int
    class_id: int
    label: str
    score: float
    start_frame: int
    end_frame: int
    start_time: float
    end_time: float
    decided_at_frame: int
    decided_at_time: float


class StatusMessage(_Message):
    type: Literal["status"] = "status"
    stream_id: str
    frames_received: int
    frames_processed: int
    frames_dropped: int
    steps: int
    lag_frames: int
    lag_s: float


class ErrorMessage(_Message):
    type: Literal["error"] = "error"
    stream_id: str | None = None
    code: str
    message: str
    fatal: bool = False
    seq: int | None = None


class EndedMessage(_Message):
    type: Literal["end"] = "end"
    stream_id: str
    frames_received: int
    frames_processed: int
    frames_dropped: int
    events: int


ServerMessage = Annotated[
    ReadyMessage | GestureEvent | StatusMessage | ErrorMessage | EndedMessage, Field(discriminator="type")
]
server_message_adapter: TypeAdapter = TypeAdapter(ServerMessage)
