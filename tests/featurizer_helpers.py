"""Shared builders for the featurizer tests: a model card, test images, a video written with OpenCV."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from service.contract.features import DEFAULT_SPEC, FeatureSpec
from service.contract.model_card import ModelCard


def card_for(spec: FeatureSpec = DEFAULT_SPEC) -> ModelCard:
    return ModelCard(
        name="test-model",
        version="0",
        created="",
        feature=spec,
        window_steps=16,
        strides=(1, 2, 4, 8, 16),
        causal=True,
    )


def astronaut_frames(count: int, size: tuple[int, int] = (480, 640)) -> list[np.ndarray]:
    """``skimage.data.astronaut()`` (BGR) on a grey canvas, slightly shifted and cropped per frame."""
    from skimage import data

    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)  # 512x512, upper body, hands out of frame
    h, w = size
    frames = []
    for i in range(count):
        canvas = np.full((h, w, 3), 128, np.uint8)
        crop = photo[(i % 3) * 4 :, (i % 2) * 6 :]  # a few pixels cropped off the top/left
        scale = (h - 40) / crop.shape[0] * (1 + 0.01 * (i % 4))
        crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)[:h, :w]
        dx, dy = (w - crop.shape[1]) // 2 + 3 * (i % 5) - 6, 10 + (i % 3)
        canvas[dy : dy + crop.shape[0], dx : dx + crop.shape[1]] = crop[: h - dy, : w - dx]
        frames.append(canvas)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: float = 30.0, fourcc: str = "MJPG") -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} to {path}"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()
