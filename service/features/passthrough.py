"""Passthrough featurizers: the client computed keypoints or feature steps itself.

Wire format for both: little-endian float32, one or more whole frames (``float32[n, 258]``) or
feature steps (``float32[n, D]``) per message: a client may send the frames of a step together, which
costs nothing in latency (a step is scored only once its last frame is in) and divides the per-message
work on both ends. NaN policy: keypoints may hold NaN (an undetected part, per the
contract) but never Inf; feature steps go straight to the detector, so NaN and Inf are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from functools import partial

import numpy as np

from service.api.protocol import MAX_FRAMES_PER_MESSAGE
from service.contract.features import DEFAULT_SPEC, KEYPOINT_DIM, FeatureSpec, StepAssembler, transform_whole_steps
from service.features.base import Featurizer, FrameError

_LE_F32 = np.dtype("<f4")


def parse_float32(payload: bytes | memoryview, dim: int, what: str, rows: int = 1) -> np.ndarray:
    """Payload bytes -> float32 (rows, dim), or FrameError naming the expected and actual byte length."""
    expected = rows * dim * _LE_F32.itemsize
    if len(payload) != expected:
        hint = ""
        if len(payload) == expected * 2:
            hint = " (this looks like float64; send float32)"
        elif len(payload) % 4 == 0 and len(payload):
            hint = f" ({len(payload) // 4} float32 values)"
        count = f"{rows} x {dim}" if rows > 1 else f"{dim}"
        raise FrameError(f"{what} payload must be {expected} bytes ({count} little-endian float32), "
                         f"got {len(payload)}{hint}")
    return np.frombuffer(payload, dtype=_LE_F32).astype(np.float32).reshape(rows, dim)


def _first_bad(bad: np.ndarray) -> tuple[int, int]:
    """(row, column) of the first True in a 2-D mask."""
    row, col = np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
    return int(row), int(col)


def _where(row: int, col: int, rows: int, what: str) -> str:
    return f"{what} {row} of {rows} in this message, index {col}" if rows > 1 else f"index {col}"


def check_keypoints(frames: np.ndarray) -> np.ndarray:
    """(n, 258) frames; Inf is refused (NaN marks an undetected part)."""
    inf = np.isinf(frames)
    if inf.any():
        row, col = _first_bad(inf)
        where = _where(row, col, len(frames), "frame")
        raise FrameError(f"keypoint frame has Inf at {where}; use NaN for undetected parts")
    return frames


def check_features(steps: np.ndarray) -> np.ndarray:
    """(n, D) steps; NaN and Inf are refused."""
    bad = ~np.isfinite(steps)
    if bad.any():
        row, col = _first_bad(bad)
        kind = "NaN" if np.isnan(steps[row, col]) else "Inf"
        where = _where(row, col, len(steps), "step")
        raise FrameError(f"feature step has {kind} at {where} ({int(bad.sum())} non-finite values); "
                         "features must be finite")
    return steps


class KeypointPassthrough(Featurizer):
    """Keypoint frames in, the built-in feature transform's steps out."""

    kind = "keypoints"
    max_frames_per_message = MAX_FRAMES_PER_MESSAGE
    coalescable = True

    def __init__(self, spec: FeatureSpec = DEFAULT_SPEC) -> None:
        self.spec = spec
        self._assembler = StepAssembler(spec)

    def push_keypoints(self, frames: np.ndarray) -> list[np.ndarray]:
        """Already-parsed float32 frames: one (258,) or several (n, 258)."""
        return list(transform_whole_steps(self._gather(frames), self.spec))

    def push_payload(self, payload: bytes | memoryview, frames: int = 1) -> list[np.ndarray]:
        return self.push_keypoints(parse_float32(payload, KEYPOINT_DIM, "keypoint", frames))

    def gather_payload(self, payload: bytes | memoryview, frames: int = 1) -> np.ndarray:
        return self._gather(parse_float32(payload, KEYPOINT_DIM, "keypoint", frames))

    def shared_transform(self) -> tuple[Hashable, Callable[[np.ndarray], np.ndarray]]:
        return (type(self), self.spec), partial(transform_whole_steps, spec=self.spec)

    def _gather(self, frames: np.ndarray) -> np.ndarray:
        frames = check_keypoints(np.asarray(frames, dtype=np.float32).reshape(-1, KEYPOINT_DIM))
        return self._assembler.gather(frames)


class FeaturePassthrough(Featurizer):
    """Feature steps in, the same steps out (validated)."""

    kind = "features"
    max_frames_per_message = MAX_FRAMES_PER_MESSAGE

    def __init__(self, feature_dim: int) -> None:
        self.feature_dim = feature_dim

    def push_payload(self, payload: bytes | memoryview, frames: int = 1) -> list[np.ndarray]:
        return list(check_features(parse_float32(payload, self.feature_dim, "feature", frames)))
