"""Passthrough featurizers: the client computed keypoints or feature steps itself.

Wire format for both: little-endian float32, one frame (``float32[258]``) or one feature step
(``float32[D]``) per message. NaN policy: keypoints may hold NaN (an undetected part, per the
contract) but never Inf; feature steps go straight to the detector, so NaN and Inf are refused.
"""

from __future__ import annotations

import numpy as np

from service.contract.features import DEFAULT_SPEC, KEYPOINT_DIM, FeatureSpec, StepAssembler
from service.features.base import Featurizer, FrameError

_LE_F32 = np.dtype("<f4")


def parse_float32(payload: bytes | memoryview, dim: int, what: str) -> np.ndarray:
    """Payload bytes -> float32 (dim,) or FrameError naming the expected and actual byte length."""
    expected = dim * _LE_F32.itemsize
    if len(payload) != expected:
        hint = ""
        if len(payload) == dim * 8:
            hint = " (this looks like float64; send float32)"
        elif len(payload) % 4 == 0 and len(payload):
            hint = f" ({len(payload) // 4} float32 values)"
        raise FrameError(f"{what} payload must be {expected} bytes ({dim} little-endian float32), "
                         f"got {len(payload)}{hint}")
    return np.frombuffer(payload, dtype=_LE_F32).astype(np.float32)


def check_keypoints(frame: np.ndarray) -> np.ndarray:
    if np.isinf(frame).any():
        idx = int(np.flatnonzero(np.isinf(frame))[0])
        raise FrameError(f"keypoint frame has Inf at index {idx}; use NaN for undetected parts")
    return frame


def check_features(step: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(step)
    if bad.any():
        idx = int(np.flatnonzero(bad)[0])
        kind = "NaN" if np.isnan(step[idx]) else "Inf"
        raise FrameError(f"feature step has {kind} at index {idx} ({int(bad.sum())} non-finite values); "
                         "features must be finite")
    return step


class KeypointPassthrough(Featurizer):
    """Keypoint frames in, the built-in feature transform's steps out."""

    kind = "keypoints"

    def __init__(self, spec: FeatureSpec = DEFAULT_SPEC) -> None:
        self.spec = spec
        self._assembler = StepAssembler(spec)

    def push_keypoints(self, frame: np.ndarray) -> list[np.ndarray]:
        """One already-parsed (258,) float32 frame."""
        step = self._assembler.push(check_keypoints(np.asarray(frame, dtype=np.float32)))
        return [] if step is None else [step]

    def push_payload(self, payload: bytes | memoryview) -> list[np.ndarray]:
        return self.push_keypoints(parse_float32(payload, KEYPOINT_DIM, "keypoint"))


class FeaturePassthrough(Featurizer):
    """Feature steps in, the same steps out (validated)."""

    kind = "features"

    def __init__(self, feature_dim: int) -> None:
        self.feature_dim = feature_dim

    def push_payload(self, payload: bytes | memoryview) -> list[np.ndarray]:
        return [check_features(parse_float32(payload, self.feature_dim, "feature"))]
