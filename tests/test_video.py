"""Opening and iterating video files written with OpenCV, and the errors for files that are not videos."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.features.passthrough import FeaturePassthrough
from service.features.video import VideoError, featurize_video, iter_frames, open_video
from tests.featurizer_helpers import write_video


def _frames(n: int) -> list[np.ndarray]:
    return [np.full((64, 80, 3), (i * 20) % 256, np.uint8) for i in range(n)]


def test_open_and_iterate(tmp_path):
    path = write_video(tmp_path / "clip.avi", _frames(10), fps=25.0)
    info = open_video(path)
    assert (info.width, info.height, info.frame_count, info.fps, info.codec) == (80, 64, 10, 25.0, "MJPG")
    assert info.duration_s == pytest.approx(0.4)
    frames = list(iter_frames(path))
    assert len(frames) == 10 and frames[0].shape == (64, 80, 3) and frames[0].dtype == np.uint8
    assert abs(int(frames[3].mean()) - 60) <= 2
    assert len(list(iter_frames(path, max_frames=4))) == 4


def test_mp4_is_readable(tmp_path):
    path = write_video(tmp_path / "clip.mp4", _frames(6), fourcc="mp4v")
    assert open_video(path).frame_count == 6 and len(list(iter_frames(path))) == 6


def test_not_a_video(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is a text file, not a video\n" * 20)
    with pytest.raises(VideoError, match="not a readable video"):
        open_video(text)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        open_video(tmp_path / "nope.avi")
    (tmp_path / "empty.avi").write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        open_video(tmp_path / "empty.avi")
    with pytest.raises(VideoError, match="not a file"):
        open_video(tmp_path)


def test_zero_frames(tmp_path):
    path = tmp_path / "zero.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (80, 64))
    writer.release()
    with pytest.raises(VideoError, match="no video frames|not a readable video"):
        open_video(path)


def test_truncated_file(tmp_path):
    path = write_video(tmp_path / "long.avi", _frames(40))
    data = path.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="truncated"):
        list(iter_frames(cut))


def test_featurize_video_needs_an_image_featurizer(tmp_path):
    from service.features.base import UnsupportedInput

    path = write_video(tmp_path / "clip.avi", _frames(4))
    with pytest.raises(UnsupportedInput, match="does not take video frames"):
        featurize_video(FeaturePassthrough(8), path)
