"""Open and iterate video files with OpenCV, with errors that say what is wrong with the file.

``open_video`` probes a file (container opens, first frame decodes) and returns its
:class:`VideoInfo`; ``iter_frames`` yields BGR uint8 frames and, at the end, raises
:class:`VideoError` if the file stopped well short of the frame count its container declares
(a truncated upload). ``featurize_video`` runs a featurizer over a whole file: the exact same
``push_frame``/``flush`` calls a live stream makes, so offline and streaming features agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from service.features.base import Featurizer

# Containers estimate frame counts; only a shortfall beyond this is reported as truncation.
TRUNCATION_TOLERANCE = 0.02


class VideoError(ValueError):
    """The file is not a readable video; the message names the problem."""


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    fps: float  # 0.0 when the container does not say
    frame_count: int  # the container's figure (an estimate for some formats); 0 when unknown
    width: int
    height: int
    codec: str  # FourCC, e.g. "mp4v", "MJPG"; "" when unknown

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps if self.fps > 0 else 0.0


def _fourcc(cap: cv2.VideoCapture) -> str:
    code = int(cap.get(cv2.CAP_PROP_FOURCC))
    text = "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4))
    return text if text.isprintable() and code else ""


def _open(path: Path) -> cv2.VideoCapture:
    if not path.exists():
        raise VideoError(f"video file {path} does not exist")
    if not path.is_file():
        raise VideoError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise VideoError(f"video file {path} is empty (0 bytes)")
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise VideoError(f"{path.name} is not a readable video: OpenCV cannot open it (not a video file, a "
                         "truncated file missing its index, or an unsupported container)")
    return cap


def open_video(path: str | Path) -> VideoInfo:
    """Probe ``path``; VideoError for missing/empty/not-a-video/zero-frame/undecodable files."""
    path = Path(path)
    cap = _open(path)
    try:
        info = VideoInfo(
            path=path,
            fps=max(float(cap.get(cv2.CAP_PROP_FPS) or 0.0), 0.0),
            frame_count=max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0),
            width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            codec=_fourcc(cap),
        )
        ok, frame = cap.read()
    finally:
        cap.release()
    if not ok or frame is None:
        if info.frame_count == 0:
            raise VideoError(f"{path.name} contains no video frames")
        raise VideoError(f"{path.name}: no frame could be decoded (codec {info.codec or 'unknown'} "
                         "unsupported by this OpenCV build, or the file is corrupt)")
    return info


def iter_frames(path: str | Path, *, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Yield BGR uint8 (H, W, 3) frames; VideoError on an unreadable or truncated file."""
    info = open_video(path)
    cap = _open(Path(path))
    count = 0
    try:
        while max_frames is None or count < max_frames:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            count += 1
            yield frame
    finally:
        cap.release()
    if max_frames is None and info.frame_count and count < info.frame_count * (1 - TRUNCATION_TOLERANCE):
        raise VideoError(f"{Path(path).name} is truncated or corrupt: decoded {count} of the "
                         f"{info.frame_count} frames its container declares")


def featurize_video(featurizer: Featurizer, path: str | Path, *,
                    on_frame: Callable[[int], None] | None = None,
                    max_frames: int | None = None) -> np.ndarray:
    """All feature steps of a video file, (T_steps, D) float32, through ``push_frame`` then ``flush``."""
    steps: list[np.ndarray] = []
    for i, frame in enumerate(iter_frames(path, max_frames=max_frames)):
        steps.extend(featurizer.push_frame(frame))
        if on_frame is not None:
            on_frame(i + 1)
    steps.extend(featurizer.flush())
    if not steps:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(steps).astype(np.float32, copy=False)
