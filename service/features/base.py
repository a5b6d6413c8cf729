"""The Featurizer interface: one instance per stream, frames in, feature steps out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable

import numpy as np


class FrameError(ValueError):
    """A payload or frame that cannot be turned into features; the message names the problem."""


class UnsupportedInput(ValueError):
    """The model cannot take this input kind (e.g. keypoints for a model trained on backbone features)."""


class Featurizer(ABC):
    """Incremental: ``push_*`` takes one message or frame and returns the feature steps it completed.

    Instances hold per-stream state (tracking graphs, partial steps) and are never shared between
    streams. ``blocking`` featurizers (MediaPipe, clip backbones) must be driven off the event loop.
    """

    kind: str
    blocking: bool = False
    # True when a push mostly waits on a shared cross-stream batcher (clip backbones) rather than
    # using the CPU itself; the worker pool runs those on a wider lane.
    batched: bool = False

    # Most frames one message may carry (the header's `frames` field): 1 for images.
    max_frames_per_message: int = 1
    # True when the featurizer's work splits into a cheap per-stream part (``gather_payload``) and a
    # stateless transform (``shared_transform``) that the pool may run for many streams in one call.
    coalescable: bool = False

    @abstractmethod
    def push_payload(self, payload: bytes | memoryview, frames: int = 1) -> list[np.ndarray]:
        """Decode one wire payload: an encoded image, or ``frames`` keypoint frames or feature steps."""

    def gather_payload(self, payload: bytes | memoryview, frames: int = 1) -> np.ndarray:
        """Coalescable featurizers: decode a payload into the input rows of the steps it completes."""
        raise NotImplementedError

    def shared_transform(self) -> tuple[Hashable, Callable[[np.ndarray], np.ndarray]]:
        """Coalescable featurizers: (key, transform) where the transform maps gathered rows, of one or
        many streams concatenated, to (k, feature_dim) steps, a fixed number of rows per step. It is
        stateless and not bound to this stream; featurizers with equal keys share it."""
        raise NotImplementedError

    def push_frame(self, image_bgr: np.ndarray) -> list[np.ndarray]:
        """One decoded BGR frame (video files); only image featurizers accept it."""
        raise UnsupportedInput(f"{self.kind} featurizer does not take video frames")

    def flush(self) -> list[np.ndarray]:
        """End of stream: steps still pending, if the featurizer can complete them."""
        return []

    def close(self) -> None:  # noqa: B027 - a no-op is the right default
        """Release per-stream resources (graphs, threads). Idempotent."""
