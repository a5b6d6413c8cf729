"""Pose featurizer: MediaPipe Holistic landmarks -> canonical keypoint frames -> feature steps.

Keypoint layout (``service.contract.features``): the 33 pose landmarks as (x, y, z, visibility),
then ``left_hand_landmarks`` then ``right_hand_landmarks`` as (x, y, z) x 21. Holistic names the
hands from the person's own perspective (its left hand is the one attached to pose landmark 15,
the person's left wrist, which appears on the image's right for a camera facing them); we keep
MediaPipe's naming as is and never mirror. x/y are normalised image coordinates, z is
MediaPipe's relative depth; an undetected pose or hand is NaN.

Rate cap (``every_n``): the landmarker runs on frames 0, n, 2n, ... and the frames between two
processed frames are linearly interpolated once the later one is in, so every frame still yields
a keypoint frame, at the cost of n - 1 frames of extra latency. A part missing at one end of the
gap takes the nearer end's value. ``flush`` processes the last buffered frame so no frame is lost.

Only ``model_complexity=1`` works offline with the 0.10.21 wheel: it bundles only
``pose_landmark_full.tflite``. 0 (lite) and 2 (heavy) would be downloaded at run time, so they are
refused unless their model file has been put into the package beforehand.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from service.contract.features import (
    DEFAULT_SPEC,
    HAND_DIM,
    KEYPOINT_DIM,
    LEFT_HAND_OFFSET,
    POSE_DIM,
    RIGHT_HAND_OFFSET,
    FeatureSpec,
    StepAssembler,
)
from service.features.base import Featurizer, FrameError, UnsupportedInput
from service.features.images import check_frame, decode_image

POSE_MODEL_FILES = {
    0: "pose_landmark_lite.tflite",
    1: "pose_landmark_full.tflite",
    2: "pose_landmark_heavy.tflite",
}


class PoseModelUnavailable(UnsupportedInput):
    """The requested pose model complexity needs a model file that is not installed."""


def pose_model_path(complexity: int) -> Path:
    """Where mediapipe looks for the pose landmark model of ``complexity`` (it downloads it if absent)."""
    if complexity not in POSE_MODEL_FILES:
        raise PoseModelUnavailable(f"pose model complexity must be 0, 1 or 2, got {complexity}")
    import mediapipe

    return Path(mediapipe.__file__).parent / "modules" / "pose_landmark" / POSE_MODEL_FILES[complexity]


def check_pose_model(complexity: int) -> None:
    """Raise PoseModelUnavailable unless ``complexity`` can run without a download."""
    path = pose_model_path(complexity)
    if not path.exists():
        raise PoseModelUnavailable(
            f"pose model_complexity={complexity} needs {path.name}, which mediapipe 0.10.21 does not "
            f"ship and would download at run time; use model_complexity=1 or place the file at {path}"
        )


def results_to_keypoints(results) -> np.ndarray:
    """A Holistic result -> canonical float32[258] (NaN for every part that was not detected)."""
    out = np.full(KEYPOINT_DIM, np.nan, dtype=np.float32)
    if results.pose_landmarks is not None:
        pose = [(p.x, p.y, p.z, p.visibility) for p in results.pose_landmarks.landmark]
        out[:POSE_DIM] = np.asarray(pose, dtype=np.float32).reshape(-1)[:POSE_DIM]
    for landmarks, offset in ((results.left_hand_landmarks, LEFT_HAND_OFFSET),
                              (results.right_hand_landmarks, RIGHT_HAND_OFFSET)):
        if landmarks is not None:
            hand = [(p.x, p.y, p.z) for p in landmarks.landmark]
            out[offset : offset + HAND_DIM] = np.asarray(hand, dtype=np.float32).reshape(-1)[:HAND_DIM]
    return out


class HolisticLandmarker:
    """One MediaPipe Holistic graph: BGR image -> float32[258]. Stateful (tracking), not thread-safe."""

    def __init__(self, complexity: int = 1, *, tracking: bool = True, min_detection_confidence: float = 0.5,
                 min_tracking_confidence: float = 0.5) -> None:
        check_pose_model(complexity)
        from mediapipe.python.solutions import holistic

        self._graph = holistic.Holistic(
            static_image_mode=not tracking,
            model_complexity=complexity,
            smooth_landmarks=tracking,
            enable_segmentation=False,
            refine_face_landmarks=False,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )

    def __call__(self, image_bgr: np.ndarray) -> np.ndarray:
        if self._graph is None:
            raise RuntimeError("landmarker is closed")
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        try:
            results = self._graph.process(rgb)
        except (RuntimeError, ValueError) as exc:  # e.g. a graph error on an odd frame
            raise FrameError(f"pose landmarker failed on this frame: {exc}") from exc
        return results_to_keypoints(results)

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()
            self._graph = None


def interpolate_keypoints(a: np.ndarray, b: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` frames strictly between keypoint frames ``a`` and ``b`` (equally spaced).

    Where either end is NaN, each in-between frame takes the value of the nearer end.
    """
    w = (np.arange(1, count + 1, dtype=np.float32) / (count + 1))[:, None]
    lerp = (1 - w) * a[None, :] + w * b[None, :]
    nearest = np.where(w <= 0.5, a[None, :], b[None, :])
    both = np.isfinite(a) & np.isfinite(b)
    return np.where(both[None, :], lerp, nearest).astype(np.float32)


class RateCappedKeypoints:
    """Runs a landmarker on every n-th image and interpolates the frames in between."""

    def __init__(self, landmarker, every_n: int = 1) -> None:
        if every_n < 1:
            raise ValueError(f"every_n must be >= 1, got {every_n}")
        self.landmarker = landmarker
        self.every_n = every_n
        self._index = 0
        self._last_key: np.ndarray | None = None
        self._pending = 0  # frames after the last keyframe, not yet emitted
        self._pending_image: np.ndarray | None = None

    def push(self, image_bgr: np.ndarray) -> list[np.ndarray]:
        """One image -> the keypoint frames it completed (0 or more, in order)."""
        is_key = self._index % self.every_n == 0
        self._index += 1
        if not is_key:
            self._pending += 1
            self._pending_image = image_bgr
            return []
        return self._key(image_bgr, self._pending)

    def flush(self) -> list[np.ndarray]:
        if not self._pending:
            return []
        image, gap = self._pending_image, self._pending - 1
        return self._key(image, gap)

    def _key(self, image_bgr: np.ndarray, gap: int) -> list[np.ndarray]:
        frame = self.landmarker(image_bgr)
        out: list[np.ndarray] = []
        if gap and self._last_key is not None:
            out.extend(interpolate_keypoints(self._last_key, frame, gap))
        out.append(frame)
        self._last_key, self._pending, self._pending_image = frame, 0, None
        return out


class PoseFeaturizer(Featurizer):
    """Images (payloads or decoded BGR frames) -> Holistic keypoints -> built-in feature steps."""

    kind = "pose"
    blocking = True

    def __init__(self, *, input_format: str | None = None, spec: FeatureSpec = DEFAULT_SPEC,
                 complexity: int = 1, every_n: int = 1, max_pixels: int = 1920 * 1080, tracking: bool = True,
                 record_keypoints: bool = False, landmarker=None) -> None:
        if not spec.is_builtin():
            raise UnsupportedInput(f"the pose featurizer produces {DEFAULT_SPEC.name} "
                                   f"v{DEFAULT_SPEC.version} features, not {spec.name} v{spec.version}")
        self.input_format = input_format
        self.max_pixels = max_pixels
        self.spec = spec
        if landmarker is None:
            landmarker = HolisticLandmarker(complexity, tracking=tracking)
        self._landmarker = landmarker
        self._keypoints = RateCappedKeypoints(self._landmarker, every_n)
        self._assembler = StepAssembler(spec)
        self.recorded: list[np.ndarray] | None = [] if record_keypoints else None

    def push_payload(self, payload: bytes | memoryview, frames: int = 1) -> list[np.ndarray]:
        return self._steps(self._keypoints.push(decode_image(payload, expected=self.input_format,
                                                             max_pixels=self.max_pixels)))

    def push_frame(self, image_bgr: np.ndarray) -> list[np.ndarray]:
        return self._steps(self._keypoints.push(check_frame(image_bgr, self.max_pixels)))

    def flush(self) -> list[np.ndarray]:
        return self._steps(self._keypoints.flush())

    def close(self) -> None:
        self._landmarker.close()

    def _steps(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        steps = []
        for frame in frames:
            if self.recorded is not None:
                self.recorded.append(frame)
            step = self._assembler.push(frame)
            if step is not None:
                steps.append(step)
        return steps

