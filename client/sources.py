"""What the CLI streams: OpenCV captures (a camera or a video file, one code path) and ``.npy`` arrays.

A camera index and a video path both open with ``cv2.VideoCapture``; reads are paced to the capture's frame
rate, which is a no-op for a device (``read()`` blocks until the next frame) and real-time replay for a file.
That is why a video file can stand in for the webcam in tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.contract.features import KEYPOINT_DIM

DEFAULT_CAMERA_FPS = 15.0  # what a live camera sends unless --fps says otherwise: enough for micro-gestures
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


@dataclass(frozen=True)
class Item:
    """One message to send: an image (BGR) or a vector, with its capture time in seconds since the start."""

    data: np.ndarray
    media_time: float


def parse_camera(value: str) -> int | str:
    """``--camera 0`` is a device index; anything else (a path, an rtsp:// URL) is opened as given."""
    return int(value) if value.strip().isdigit() else value


class CaptureSource:
    """Frames from ``cv2.VideoCapture(index or path)``, paced and subsampled to the send rate.

    ``live``: media time is the wall clock since the first frame (a device), else the frame index over the
    capture's fps (a file). ``realtime=False`` (``--fast``) reads as fast as the client can encode.
    """

    def __init__(
        self,
        source: int | str,
        *,
        fps: float | None = None,
        live: bool = False,
        realtime: bool = True,
        max_width: int = 640,
        max_seconds: float | None = None,
    ) -> None:
        import cv2  # the keypoint paths do not need OpenCV

        self._cv2 = cv2
        self.source = source
        # OpenCV's own warnings for a missing device are noise next to the error raised below.
        previous = cv2.getLogLevel()
        cv2.setLogLevel(0)
        try:
            self.cap = cv2.VideoCapture(source)
        finally:
            cv2.setLogLevel(previous)
        if not self.cap.isOpened():
            what = f"camera {source}" if isinstance(source, int) else f"video {source!r}"
            raise ValueError(f"OpenCV cannot open {what}")
        native = self.cap.get(cv2.CAP_PROP_FPS)
        self.native_fps = float(native) if native and np.isfinite(native) and 1.0 <= native <= 240.0 else 30.0
        wanted = fps if fps is not None else (DEFAULT_CAMERA_FPS if live else self.native_fps)
        self.fps = min(float(wanted), self.native_fps)
        self.live = live
        self.realtime = realtime
        self.max_width = max_width
        self.max_seconds = max_seconds
        total = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.total_frames = total if total > 0 and not live else None

    @property
    def input_kind(self) -> str:
        return "jpeg"

    def _resize(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        if self.max_width and w > self.max_width:
            scale = self.max_width / w
            frame = self._cv2.resize(frame, (self.max_width, round(h * scale)), interpolation=self._cv2.INTER_AREA)
        return frame

    async def frames(self) -> AsyncIterator[Item]:
        start = time.monotonic()
        next_send = 0.0
        index = 0
        try:
            while True:
                ok, frame = await asyncio.to_thread(self.cap.read)  # a device read blocks: keep the loop free
                if not ok or frame is None:
                    return
                due = index / self.native_fps
                index += 1
                if self.realtime:
                    delay = start + due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                media_time = time.monotonic() - start if self.live else due
                if self.max_seconds is not None and media_time >= self.max_seconds:
                    return
                if media_time + 1e-6 < next_send:  # subsample to the send rate
                    continue
                next_send = max(next_send + 1.0 / self.fps, media_time)
                yield Item(self._resize(frame), media_time)
        finally:
            self.cap.release()


class ArraySource:
    """A ``.npy`` of keypoint frames (T, 258) or feature steps (T, D), replayed as a stream."""

    def __init__(
        self,
        path: Path,
        *,
        fps: float | None = None,
        realtime: bool = True,
        max_seconds: float | None = None,
        frames_per_message: int = 1,
    ) -> None:
        """frames_per_message 0: one feature step's frames, once ``frames_per_step`` is known."""
        array = np.load(path, allow_pickle=False)
        if array.ndim != 2 or array.shape[0] == 0:
            raise ValueError(f"{path} holds an array of shape {array.shape}; expected (T, 258) or (T, D)")
        self.array = np.ascontiguousarray(array, dtype=np.float32)
        self.kind = "keypoints" if array.shape[1] == KEYPOINT_DIM else "features"
        self.fps = float(fps) if fps else 30.0  # frames per second, also for feature steps
        self.realtime = realtime
        self.max_seconds = max_seconds
        self.frames_per_step = 1  # set from the server's ready message
        self.total_frames = len(self.array)
        if frames_per_message < 0:
            raise ValueError("frames per message must be at least 1, or 0 for one feature step")
        # Keypoints only: several frames go in one message, sent when the last of them is due.
        self.frames_per_message = frames_per_message if self.kind == "keypoints" else 1

    @property
    def group(self) -> int:
        """Frames per message: a whole feature step when asked for 0 (the step completes with its last
        frame anyway, so no event comes later), else as asked."""
        return self.frames_per_message or self.frames_per_step

    @property
    def input_kind(self) -> str:
        return self.kind

    async def frames(self) -> AsyncIterator[Item]:
        # One row is one frame (keypoints) or one feature step of frames_per_step frames.
        # With a group of n keypoint frames, one message carries n frames (an (n, 258) Item).
        period = (self.frames_per_step if self.kind == "features" else 1) / self.fps
        group = self.group
        start = time.monotonic()
        for sent, index in enumerate(range(0, len(self.array), group)):
            media_time = index * period
            if self.max_seconds is not None and media_time >= self.max_seconds:
                return
            rows = self.array[index : index + group]
            if self.max_seconds is not None:  # no frame past the limit inside a group either
                rows = rows[: max(1, int(np.ceil(self.max_seconds / period)) - index)]
            if self.realtime:
                delay = start + (index + len(rows) - 1) * period - time.monotonic()  # when the last is captured
                if delay > 0:
                    await asyncio.sleep(delay)
            elif sent % 64 == 0:
                await asyncio.sleep(0)  # let the event printer run during --fast replays
            yield Item(rows if group > 1 else rows[0], media_time)


def open_source(
    file: Path | None,
    camera: str | None,
    *,
    fps: float | None,
    fast: bool,
    max_width: int,
    max_seconds: float | None,
    frames_per_message: int = 0,
) -> CaptureSource | ArraySource:
    if (file is None) == (camera is None):
        raise ValueError("give either FILE or --camera")
    if camera is not None:
        return CaptureSource(
            parse_camera(camera),
            fps=fps,
            live=True,
            realtime=True,
            max_width=max_width,
            max_seconds=max_seconds,
        )
    assert file is not None
    if not file.exists():
        raise ValueError(f"{file} does not exist")
    if file.suffix.lower() == ".npy":
        return ArraySource(
            file, fps=fps, realtime=not fast, max_seconds=max_seconds, frames_per_message=frames_per_message
        )
    return CaptureSource(
        str(file), fps=fps, live=False, realtime=not fast, max_width=max_width, max_seconds=max_seconds
    )
