"""The feature spec: how canonical keypoint frames become detector feature steps.

Canonical keypoint frame (``float32[258]``, MediaPipe Holistic layout and coordinates):
33 pose landmarks x (x, y, z, visibility), then the left hand's 21 x (x, y, z), then the
right hand's 21 x (x, y, z). x/y are normalised image coordinates; an undetected part is NaN.

Frame features (``FRAME_DIM`` = 186): pose x/y and hand x/y, centred on the mid-shoulder point
(legs on the mid-hip point) and divided by a body scale, the mean of the shoulder width and the
torso length (so body size, camera distance and offset drop out), pose
visibility, and three presence flags (pose, left hand, right hand). Missing parts become zeros
with their flag at 0, so NaN never reaches the detector.

A feature step summarises ``frames_per_step`` consecutive frames: their mean, and the change
from the first to the last frame (a velocity). Steps depend only on their own frames, so the
incremental path (one frame at a time) and the offline path (a whole array) agree exactly.

Both trainer and server import this module; its name and version travel in the ONNX metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

POSE_LANDMARKS = 33
HAND_LANDMARKS = 21
POSE_DIM = POSE_LANDMARKS * 4
HAND_DIM = HAND_LANDMARKS * 3
KEYPOINT_DIM = POSE_DIM + 2 * HAND_DIM  # 258
LEFT_HAND_OFFSET = POSE_DIM
RIGHT_HAND_OFFSET = POSE_DIM + HAND_DIM

# MediaPipe Pose indices used for normalisation.
LEFT_SHOULDER, RIGHT_SHOULDER = 11, 12
LEFT_HIP, RIGHT_HIP = 23, 24
LEGS = slice(25, 33)  # knees, ankles, heels, toes
TORSO_PER_SHOULDER = 1.5  # typical mid-shoulder-to-mid-hip length in shoulder widths

FRAME_DIM = POSE_LANDMARKS * 2 + POSE_LANDMARKS + 2 * HAND_LANDMARKS * 2 + 3  # 186
MIN_SCALE = 1e-3

SPEC_NAME = "mgstream-pose-kinematics"
SPEC_VERSION = 2


@dataclass(frozen=True)
class FeatureSpec:
    """Everything a featurizer must reproduce for a model to see what it was trained on."""

    name: str = SPEC_NAME
    version: int = SPEC_VERSION
    input_kind: str = "keypoints"  # "keypoints": this module's transform; "features": a backbone's output
    keypoint_dim: int = KEYPOINT_DIM
    feature_dim: int = 2 * FRAME_DIM
    frames_per_step: int = 4
    fps: float = 30.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpec:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def is_builtin(self) -> bool:
        """True when this module's own keypoint transform produces the features."""
        return self.input_kind == "keypoints" and self.name == SPEC_NAME and self.version == SPEC_VERSION


DEFAULT_SPEC = FeatureSpec()


def validate_keypoints(keypoints: np.ndarray) -> np.ndarray:
    """Return ``keypoints`` as float32 (T, 258); raise ValueError naming the problem."""
    arr = np.asarray(keypoints)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != KEYPOINT_DIM:
        raise ValueError(f"keypoints must have shape (T, {KEYPOINT_DIM}), got {tuple(np.shape(keypoints))}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"keypoints must be floating point, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if np.isinf(arr).any():
        raise ValueError("keypoints contain Inf; use NaN for undetected parts")
    return arr


# ufunc reductions straight from C: ndarray.any()/sum() add a Python-level wrapper to every call.
_any = np.logical_or.reduce
_sum = np.add.reduce


def keypoints_to_frame_features(keypoints: np.ndarray) -> np.ndarray:
    """(T, 258) canonical keypoints -> (T, FRAME_DIM) body-centred, scale-normalised frame features."""
    return _frame_features(validate_keypoints(keypoints))


def _frame_features(kp: np.ndarray) -> np.ndarray:
    """:func:`keypoints_to_frame_features` of already validated float32 (T, 258) keypoints."""
    # Written as few whole-array operations: this runs for every step of every live stream, and on
    # a handful of frames numpy's cost is per call, not per element.
    t = kp.shape[0]
    missing = np.isnan(kp)  # Inf was refused by validation, so NaN is the only non-finite value
    zeroed = np.where(missing, np.float32(0.0), kp)
    pose = zeroed[:, :POSE_DIM].reshape(t, POSE_LANDMARKS, 4)
    hands = zeroed[:, POSE_DIM:].reshape(t, 2 * HAND_LANDMARKS, 3)
    shoulders_missing = missing[:, 4 * LEFT_SHOULDER : 4 * (RIGHT_SHOULDER + 1)].reshape(t, 2, 4)[..., :2]
    pose_ok = ~_any(shoulders_missing, axis=(1, 2))
    hands_ok = ~_any(missing[:, POSE_DIM:].reshape(t, 2, HAND_LANDMARKS, 3)[..., :2], axis=(2, 3))  # (T, 2)

    left_shoulder, right_shoulder = pose[:, LEFT_SHOULDER, :2], pose[:, RIGHT_SHOULDER, :2]
    origin = np.where(pose_ok[:, None], (left_shoulder + right_shoulder) / 2, 0.0)
    down = origin - (pose[:, LEFT_HIP, :2] + pose[:, RIGHT_HIP, :2]) / 2  # mid-hip to mid-shoulder
    across = left_shoulder - right_shoulder
    width = np.sqrt(_sum(across * across, axis=-1))
    torso = np.sqrt(_sum(down * down, axis=-1))
    # Two body lengths averaged: a per-frame scale from one short segment turns tracking jitter
    # into large noise on distal landmarks.
    scale = np.maximum(0.5 * (width + torso / TORSO_PER_SHOULDER), MIN_SCALE)[:, None, None]

    # All 75 x/y points at once: pose, left hand, right hand.
    xy = np.concatenate([pose[..., :2], hands[..., :2]], axis=1)
    # Legs are measured from the mid-hip point: their small motions (bouncing knees) would drown
    # in the scale noise multiplied by their distance from the shoulders.
    xy[:, LEGS] += down[:, None, :]
    flags = np.empty((t, 3), dtype=bool)  # pose, left hand, right hand
    flags[:, 0] = pose_ok
    np.logical_and(hands_ok, pose_ok[:, None], out=flags[:, 1:])
    ok = flags.repeat([POSE_LANDMARKS, HAND_LANDMARKS, HAND_LANDMARKS], axis=1)  # (T, 75)
    centred = np.where(ok[..., None], (xy - origin[:, None, :]) / scale, 0.0).reshape(t, -1)

    pose_xy_dim = POSE_LANDMARKS * 2
    out = np.empty((t, FRAME_DIM), dtype=np.float32)
    out[:, :pose_xy_dim] = centred[:, :pose_xy_dim]
    out[:, pose_xy_dim : pose_xy_dim + POSE_LANDMARKS] = np.where(pose_ok[:, None], pose[..., 3], 0.0)
    out[:, pose_xy_dim + POSE_LANDMARKS : -3] = centred[:, pose_xy_dim:]
    out[:, -3:] = flags
    return out


def frames_to_steps(frame_features: np.ndarray, frames_per_step: int) -> np.ndarray:
    """(T, F) frame features -> (T // frames_per_step, 2F) steps; a trailing partial step is dropped."""
    n = frame_features.shape[0] // frames_per_step
    grouped = frame_features[: n * frames_per_step].reshape(n, frames_per_step, -1)
    dim = grouped.shape[2]
    out = np.empty((n, 2 * dim), dtype=np.float32)
    np.divide(_sum(grouped, axis=1), frames_per_step, out=out[:, :dim])  # the mean of the step's frames
    np.subtract(grouped[:, -1], grouped[:, 0], out=out[:, dim:])  # first-to-last change
    return out


def keypoints_to_steps(keypoints: np.ndarray, spec: FeatureSpec = DEFAULT_SPEC) -> np.ndarray:
    """The whole transform, for a whole sequence: (T, 258) -> (T // frames_per_step, feature_dim)."""
    if not spec.is_builtin():
        raise ValueError(f"feature spec {spec.name} v{spec.version} is not produced from keypoints here")
    return _steps(validate_keypoints(keypoints), spec)


def _steps(keypoints: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    return frames_to_steps(_frame_features(keypoints), spec.frames_per_step)


def transform_whole_steps(frames: np.ndarray, spec: FeatureSpec = DEFAULT_SPEC) -> np.ndarray:
    """:func:`keypoints_to_steps` of frames that :meth:`StepAssembler.gather` returned (validated, whole
    steps). Frames of several streams may be concatenated: every step depends on its own frames only,
    so the result is bitwise what each stream would get alone."""
    if len(frames) == 0:
        return np.zeros((0, spec.feature_dim), np.float32)
    return _steps(frames, spec)


class StepAssembler:
    """Incremental form of :func:`keypoints_to_steps`: push frames one at a time, get steps when complete.

    Raw frames are buffered and transformed once per step: the transform's cost is mostly per call,
    and this runs for every frame of every live stream.
    """

    def __init__(self, spec: FeatureSpec = DEFAULT_SPEC) -> None:
        if not spec.is_builtin():
            raise ValueError(f"feature spec {spec.name} v{spec.version} is not produced from keypoints here")
        self.spec = spec
        self._frames = np.zeros((spec.frames_per_step, KEYPOINT_DIM), dtype=np.float32)
        self._count = 0

    def push(self, keypoint_frame: np.ndarray) -> np.ndarray | None:
        """Add one (258,) frame; return a (feature_dim,) step when this frame completes one."""
        frame = np.asarray(keypoint_frame)
        if frame.shape not in ((KEYPOINT_DIM,), (1, KEYPOINT_DIM)):
            raise ValueError(f"a keypoint frame must have shape ({KEYPOINT_DIM},), got {frame.shape}")
        steps = self.extend(frame)
        return steps[0] if len(steps) else None

    def extend(self, keypoint_frames: np.ndarray) -> np.ndarray:
        """Add (n, 258) frames at once; return the (k, feature_dim) steps they complete, k >= 0.

        Whole steps inside the batch are transformed in one call, so a client sending a step's frames
        together pays the transform's fixed cost once per step, not per frame.
        """
        return transform_whole_steps(self.gather(keypoint_frames), self.spec)

    def gather(self, keypoint_frames: np.ndarray) -> np.ndarray:
        """Add (n, 258) frames; return the frames of the steps they complete, (k * frames_per_step, 258),
        validated and not yet transformed (:func:`transform_whole_steps` does that, possibly together
        with other streams' frames)."""
        frames = validate_keypoints(keypoint_frames)
        per_step = self.spec.frames_per_step
        if self._count + len(frames) < per_step:  # no step completes: buffer and return nothing
            self._frames[self._count : self._count + len(frames)] = frames
            self._count += len(frames)
            return frames[:0]
        whole = (self._count + len(frames)) // per_step * per_step
        joined = np.concatenate([self._frames[: self._count], frames]) if self._count else frames
        rest = len(joined) - whole
        self._frames[:rest] = joined[whole:]
        self._count = rest
        return joined[:whole]

    @property
    def pending_frames(self) -> int:
        return self._count
