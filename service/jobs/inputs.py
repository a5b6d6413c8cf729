"""What a batch job accepts, checked at upload time, and how each input becomes feature steps.

Probing runs before a job exists, so a bad file is answered with a 4xx naming the problem instead of
becoming a failed job. Featurizing runs in a worker thread at full speed: every frame is used (no
live-style drops) through the same featurizer and feature transform as live streams.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.contract.features import keypoints_to_steps
from service.contract.model_card import ModelCard
from service.jobs.store import InputKind

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
ARRAY_EXTENSIONS = (".npy",)
NPY_MAGIC = b"\x93NUMPY"
KEYPOINT_CHUNK = 4096  # frames per chunk of the keypoint transform (a multiple of every frames_per_step)


class InputError(ValueError):
    """The upload cannot be processed; the message names the problem (answered with 422)."""

    status = 422


class UnsupportedInput(InputError):
    """A file type or codec this server does not take (answered with 415)."""

    status = 415


class Cancelled(Exception):
    """The job was cancelled while its input was being processed."""


@dataclass(frozen=True)
class InputInfo:
    kind: str  # InputKind
    frames: int  # input frames (for a features .npy: steps x frames_per_step)
    fps: float
    width: int = 0
    height: int = 0

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps if self.fps > 0 else 0.0


def extension_of(filename: str) -> str:
    ext = Path(filename).suffix.lower()
    if ext not in VIDEO_EXTENSIONS + ARRAY_EXTENSIONS:
        accepted = ", ".join(VIDEO_EXTENSIONS + ARRAY_EXTENSIONS)
        raise UnsupportedInput(f"unsupported file type '{ext or filename}'; accepted: {accepted}")
    return ext


# ---- probing ----


def _load_array(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        if f.read(6) != NPY_MAGIC:
            raise InputError("not a .npy file (no NumPy header); save the array with numpy.save")
    try:
        # mmap: a long keypoint file is not read into memory just to check its header.
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # bad magic, bad header, pickled object arrays
        raise InputError(f"not a valid .npy array: {exc}") from exc
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read the .npy file: {exc}") from exc


def probe_array(path: Path, card: ModelCard, fps: float | None) -> InputInfo:
    """A (T, 258) keypoint array or a (T, feature_dim) feature-step array, matched to the model."""
    arr = _load_array(path)
    spec = card.feature
    if arr.ndim != 2:
        raise InputError(
            f".npy must be 2-D (frames, {spec.keypoint_dim}) or (steps, {spec.feature_dim}); got {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f".npy must hold floating-point values, got dtype {arr.dtype}")
    rate = float(fps or spec.fps)
    dim = arr.shape[1]
    if dim == spec.keypoint_dim and spec.is_builtin():
        kind, frames = InputKind.KEYPOINTS, arr.shape[0]
    elif dim == spec.feature_dim:
        kind, frames = InputKind.FEATURES, arr.shape[0] * spec.frames_per_step
    else:
        wanted = f"{spec.feature_dim} (feature steps)"
        if spec.is_builtin():
            wanted = f"{spec.keypoint_dim} (keypoint frames) or {wanted}"
        raise InputError(f"wrong feature dimension {dim}: model {card.name} takes {wanted}")
    if frames < spec.frames_per_step:
        raise InputError(f"the array has {arr.shape[0]} rows; at least one feature step is needed")
    return InputInfo(kind=kind, frames=int(frames), fps=rate)


def probe_video(path: Path, default_fps: float, filename: str = "") -> InputInfo:
    """Container opens, the first frame decodes and so does the last declared one (a cheap truncation
    check; seeking is by index). The frame count may be an estimate (0: unknown)."""
    import cv2

    from service.features import video
    from service.jobs.sniff import diagnose

    filename = filename or path.name
    try:
        meta = video.open_video(path)
    except video.VideoError as exc:
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        opened = cap.isOpened()
        cap.release()
        # The container bytes only explain files OpenCV could not open at all.
        raise (None if opened else diagnose(path, filename)) or InputError(str(exc)) from exc
    if meta.frame_count > 1:
        # Within the featurizer's own tolerance, so an estimated count never rejects a good file.
        last = max(int(meta.frame_count * (1 - video.TRUNCATION_TOLERANCE)) - 1, 0)
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        try:
            cap.set(cv2.CAP_PROP_POS_FRAMES, last)
            ok, _ = cap.read()
        finally:
            cap.release()
        if not ok:
            raise InputError(
                f"{filename} is truncated or corrupt: frame {last + 1} of the {meta.frame_count} "
                "its container declares cannot be decoded"
            )
    fps = meta.fps if meta.fps > 0 else default_fps
    return InputInfo(InputKind.VIDEO, frames=meta.frame_count, fps=fps, width=meta.width, height=meta.height)


def probe(path: Path, filename: str, card: ModelCard, fps: float | None = None) -> InputInfo:
    ext = extension_of(filename)
    if ext in ARRAY_EXTENSIONS:
        return probe_array(path, card, fps)
    if not card.feature.is_builtin():
        raise UnsupportedInput(
            f"model {card.name} takes '{card.feature.name}' features; upload them as a .npy of feature steps"
        )
    return probe_video(path, fps or card.feature.fps, filename)


# ---- featurizing ----

Progress = Callable[[int], None]  # frames done so far


def featurize(
    path: Path,
    info: InputInfo,
    card: ModelCard,
    *,
    max_frames: int | None = None,
    make_featurizer: Callable[[], object] | None = None,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """The whole input as (steps, feature_dim) float32. Blocking; call from a worker thread."""
    cancel = cancel or threading.Event()
    progress = progress or (lambda _: None)
    if info.kind == InputKind.FEATURES:
        steps = np.asarray(_load_array(path), dtype=np.float32)
        if not np.isfinite(steps).all():
            raise InputError("feature steps contain NaN or Inf")
        progress(info.frames)
        return steps
    if info.kind == InputKind.KEYPOINTS:
        return _keypoint_steps(path, card, cancel, progress)
    if make_featurizer is None:
        raise InputError("this server has no featurizer for video input")
    return _video_steps(path, card, make_featurizer, cancel, progress, max_frames)


def _keypoint_steps(path: Path, card: ModelCard, cancel: threading.Event, progress: Progress) -> np.ndarray:
    kp = _load_array(path)
    per_step = card.feature.frames_per_step
    chunk = KEYPOINT_CHUNK - KEYPOINT_CHUNK % per_step
    parts = []
    usable = kp.shape[0] - kp.shape[0] % per_step
    for start in range(0, usable, chunk):
        if cancel.is_set():
            raise Cancelled()
        # Steps depend only on their own frames, so chunking at step boundaries changes nothing.
        try:
            parts.append(keypoints_to_steps(np.asarray(kp[start : start + chunk]), card.feature))
        except ValueError as exc:  # NaN is allowed (undetected), Inf and wrong dtypes are not
            raise InputError(f"keypoint frames {start}..{start + chunk}: {exc}") from exc
        progress(min(start + chunk, kp.shape[0]))
    progress(kp.shape[0])
    if not parts:
        return np.zeros((0, card.feature.feature_dim), dtype=np.float32)
    return np.concatenate(parts)


def _video_steps(
    path: Path,
    card: ModelCard,
    make_featurizer: Callable[[], object],
    cancel: threading.Event,
    progress: Progress,
    max_frames: int | None,
) -> np.ndarray:
    from service.features import video

    featurizer = make_featurizer()
    steps: list[np.ndarray] = []
    done = 0
    try:
        for frame in video.iter_frames(path):
            if cancel.is_set():
                raise Cancelled()
            if max_frames is not None and done >= max_frames:  # the container under-declared its length
                raise InputError(f"the video has more than {max_frames} frames, over the duration limit")
            steps.extend(featurizer.push_frame(frame))  # type: ignore[attr-defined]
            done += 1
            progress(done)
        steps.extend(featurizer.flush())  # type: ignore[attr-defined]
    except video.VideoError as exc:
        raise InputError(str(exc)) from exc
    finally:
        featurizer.close()  # type: ignore[attr-defined]
    if not steps:
        return np.zeros((0, card.feature.feature_dim), dtype=np.float32)
    return np.stack(steps).astype(np.float32, copy=False)
