"""The MediaPipe pose featurizer on a real photo of a person, streaming vs video file, and the worker pool."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.config import Settings
from service.contract.features import LEFT_HAND_OFFSET, POSE_DIM, keypoints_to_steps
from service.features.factory import create_featurizer
from service.features.pool import FeaturizerPool
from service.features.pose import PoseFeaturizer
from service.features.video import featurize_video, iter_frames
from tests.featurizer_helpers import astronaut_frames, card_for, jpeg, png, write_video

NOSE, LEFT_SHOULDER, RIGHT_SHOULDER, LEFT_EYE, RIGHT_EYE = 0, 11, 12, 2, 5


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return astronaut_frames(12)


@pytest.fixture(scope="module")
def streamed(frames):
    """The 12 astronaut frames pushed as JPEG payloads through the factory's pose featurizer."""
    feat = create_featurizer("jpeg", card_for(), Settings(), record_keypoints=True)
    try:
        steps = [s for frame in frames for s in feat.push_payload(jpeg(frame))] + feat.flush()
    finally:
        feat.close()
    return np.stack(feat.recorded), steps


def test_pose_found_in_plausible_places(streamed):
    keypoints, _ = streamed
    assert keypoints.shape == (12, 258) and keypoints.dtype == np.float32
    pose = keypoints[:, :POSE_DIM].reshape(12, 33, 4)
    assert np.isfinite(pose).all(), "pose must be found in every frame"
    x, y, vis = pose[..., 0], pose[..., 1], pose[..., 3]
    assert (vis[:, [NOSE, LEFT_SHOULDER, RIGHT_SHOULDER]] > 0.9).all()
    assert ((x > 0) & (x < 1) & (y > 0))[:, :25].all()  # head and upper body inside the image
    assert (y[:, NOSE] < y[:, LEFT_SHOULDER] - 0.05).all() and (
        y[:, NOSE] < y[:, RIGHT_SHOULDER] - 0.05
    ).all()
    # shoulders roughly level: the line between them tilts less than 25 degrees (in pixels, 640x480)
    dx = (x[:, LEFT_SHOULDER] - x[:, RIGHT_SHOULDER]) * 640
    dy = (y[:, LEFT_SHOULDER] - y[:, RIGHT_SHOULDER]) * 480
    assert (np.degrees(np.arctan2(np.abs(dy), np.abs(dx))) < 25).all()
    # she faces the camera: her left side appears on the image's right
    assert (x[:, LEFT_SHOULDER] > x[:, NOSE]).all() and (x[:, NOSE] > x[:, RIGHT_SHOULDER]).all()
    assert (x[:, LEFT_EYE] > x[:, RIGHT_EYE]).all()
    assert (y[:, [LEFT_EYE, RIGHT_EYE]].max(axis=1) < y[:, NOSE]).all()
    width = x[:, LEFT_SHOULDER] - x[:, RIGHT_SHOULDER]
    eyes = x[:, LEFT_EYE] - x[:, RIGHT_EYE]
    assert (width > 2 * eyes).all() and (width < 0.8).all()
    nose_x = x[:, NOSE]
    assert nose_x.max() - nose_x.min() < 0.05, "small shifts give small keypoint motion"


def test_hands_out_of_frame_are_nan(streamed):
    keypoints, _ = streamed
    assert np.isnan(keypoints[:, LEFT_HAND_OFFSET:]).all()


def test_steps_follow_the_feature_contract(streamed):
    keypoints, steps = streamed
    assert len(steps) == 3
    np.testing.assert_array_equal(np.stack(steps), keypoints_to_steps(keypoints))
    assert np.isfinite(np.stack(steps)).all()


def test_video_file_matches_frame_by_frame_streaming(tmp_path, frames):
    video = write_video(tmp_path / "astronaut.avi", frames[:8])
    decoded = list(iter_frames(video))
    assert len(decoded) == 8
    offline = PoseFeaturizer(record_keypoints=True)
    live = PoseFeaturizer(input_format="png", record_keypoints=True)
    try:
        from_file = featurize_video(offline, video)
        from_stream = np.stack([s for frame in decoded for s in live.push_payload(png(frame))] + live.flush())
    finally:
        offline.close()
        live.close()
    assert from_file.shape == (2, 372)
    np.testing.assert_allclose(from_file, from_stream, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.stack(offline.recorded), np.stack(live.recorded), rtol=0, atol=1e-6)


def test_rate_cap_on_real_frames(frames):
    capped = PoseFeaturizer(every_n=3, record_keypoints=True)
    try:
        steps = [s for frame in frames[:8] for s in capped.push_frame(frame)]
        assert len(capped.recorded) == 7  # frame 7 waits for the next processed frame (n - 1 latency)
        steps += capped.flush()
    finally:
        capped.close()
    kp = np.stack(capped.recorded)
    assert kp.shape == (8, 258) and len(steps) == 2
    # frames 1 and 2 lie on the line between processed frames 0 and 3
    np.testing.assert_allclose(kp[1, :POSE_DIM], (2 * kp[0, :POSE_DIM] + kp[3, :POSE_DIM]) / 3, atol=1e-5)
    assert np.isnan(kp[:, LEFT_HAND_OFFSET:]).all()


def test_greyscale_and_rgba_payloads_still_find_the_pose(frames):
    feat = PoseFeaturizer(input_format="png", record_keypoints=True)
    try:
        feat.push_payload(png(cv2.cvtColor(frames[0], cv2.COLOR_BGR2GRAY)))
        feat.push_payload(png(cv2.cvtColor(frames[1], cv2.COLOR_BGR2BGRA)))
    finally:
        feat.close()
    assert all(np.isfinite(kp[:POSE_DIM]).all() for kp in feat.recorded)


def test_pool_runs_streams_concurrently_and_in_order(frames):
    """Two streams through a 2-worker pool give exactly what each gives alone (per-stream graphs, ordered)."""
    payloads = [jpeg(f) for f in frames[:8]]

    async def stream(pool: FeaturizerPool, feat: PoseFeaturizer) -> np.ndarray:
        steps = [s for p in payloads for s in await pool.push(feat, p)]
        steps += await pool.finish(feat)
        return np.stack(steps)

    async def main() -> list[np.ndarray]:
        pool = FeaturizerPool(2)
        try:
            feats = [PoseFeaturizer(input_format="jpeg") for _ in range(2)]
            return await asyncio.gather(*(stream(pool, f) for f in feats))
        finally:
            pool.shutdown()

    a, b = asyncio.run(main())
    alone = PoseFeaturizer(input_format="jpeg")
    try:
        ref = np.stack([s for p in payloads for s in alone.push_payload(p)])
    finally:
        alone.close()
    np.testing.assert_allclose(a, ref, atol=1e-6)
    np.testing.assert_allclose(b, ref, atol=1e-6)


def _run_extract(*args: str) -> subprocess.CompletedProcess:
    code = "import typer; from service.features.extract_cli import extract; typer.run(extract)"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)


def test_extract_cli_writes_keypoints_and_features(tmp_path, frames):
    video = write_video(tmp_path / "astronaut.avi", frames[:8])
    done = _run_extract(str(video), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    kp = np.load(tmp_path / "out" / "astronaut.keypoints.npy")
    steps = np.load(tmp_path / "out" / "astronaut.features.npy")
    assert kp.shape == (8, 258) and kp.dtype == np.float32 and np.isfinite(kp[:, :POSE_DIM]).all()
    np.testing.assert_array_equal(steps, keypoints_to_steps(kp))
    assert "pose found in 8" in done.stdout
    assert "inference_feedback_manager" not in done.stderr  # MediaPipe's native log noise is filtered


def test_extract_cli_reports_a_bad_video(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    done = _run_extract(str(bad))
    assert done.returncode != 0 and "not a readable video" in done.stdout + done.stderr
