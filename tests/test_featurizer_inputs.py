"""Payload decoding, passthrough validation, rate-cap interpolation, featurizer factory (no MediaPipe)."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from service.config import Settings
from service.contract.features import KEYPOINT_DIM, FeatureSpec, keypoints_to_steps
from service.features.base import FrameError, UnsupportedInput
from service.features.factory import create_featurizer
from service.features.images import check_frame, decode_image, peek_size
from service.features.passthrough import FeaturePassthrough, KeypointPassthrough
from service.features.pose import RateCappedKeypoints, interpolate_keypoints
from tests.featurizer_helpers import card_for, jpeg, png

MAX_PIXELS = 1920 * 1080


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)


# ---- images ----


def test_jpeg_and_png_decode_to_bgr(picture):
    assert np.array_equal(decode_image(png(picture), expected="png", max_pixels=MAX_PIXELS), picture)
    out = decode_image(jpeg(picture, 95), expected="jpeg", max_pixels=MAX_PIXELS)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert peek_size(jpeg(picture)) == (64, 48)


def test_greyscale_and_rgba_payloads_are_converted(picture):
    grey = cv2.cvtColor(picture, cv2.COLOR_BGR2GRAY)
    out = decode_image(png(grey), expected="png", max_pixels=MAX_PIXELS)
    assert (
        out.shape == (48, 64, 3) and np.array_equal(out[..., 0], grey) and np.array_equal(out[..., 2], grey)
    )
    bgra = np.dstack([picture, np.full(picture.shape[:2], 7, np.uint8)])
    assert np.array_equal(decode_image(png(bgra), expected="png", max_pixels=MAX_PIXELS), picture)
    sixteen = picture.astype(np.uint16) * 257
    assert np.array_equal(decode_image(png(sixteen), expected="png", max_pixels=MAX_PIXELS), picture)


@pytest.mark.parametrize(
    ("payload", "expected", "message"),
    [
        (b"", "jpeg", "empty payload"),
        (b"hello, not an image at all", "jpeg", "not a JPEG or PNG"),
        (b"\xff\xd8\xff\xe0" + bytes(200), "jpeg", "corrupt JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "png", "corrupt PNG"),
        (_png_header_only(0, 10), "png", "zero-size image"),
        (_png_header_only(100_000, 100_000), "png", "more than the limit"),
        (_png_header_only(8, 8), "png", "too small"),
    ],
)
def test_bad_payloads_are_named(payload, expected, message):
    with pytest.raises(FrameError, match=message):
        decode_image(payload, expected=expected, max_pixels=MAX_PIXELS)


def test_truncated_and_mismatched_payloads(picture):
    data = jpeg(picture)
    with pytest.raises(FrameError, match="corrupt JPEG"):
        decode_image(data[: len(data) // 3], expected="jpeg", max_pixels=MAX_PIXELS)
    with pytest.raises(FrameError, match="declared jpeg input but this payload is a PNG"):
        decode_image(png(picture), expected="jpeg", max_pixels=MAX_PIXELS)
    with pytest.raises(FrameError, match="more than the limit of 1000"):
        decode_image(png(picture), expected=None, max_pixels=1000)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((48, 64), np.uint8), "greyscale frame"),
        (np.zeros((48, 64, 4), np.uint8), "4-channel"),
        (np.zeros((48, 64, 3), np.float32), "must be uint8"),
        (np.zeros((0, 0, 3), np.uint8), "zero-size"),
        (np.zeros((48, 64, 2), np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((2000, 2000, 3), np.uint8), "more than the limit"),
    ],
)
def test_bad_raw_frames_are_named(frame, message):
    with pytest.raises(FrameError, match=message):
        check_frame(frame, MAX_PIXELS)


# ---- passthrough ----


def _keypoints(t: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kp = rng.uniform(0.2, 0.8, (t, KEYPOINT_DIM)).astype(np.float32)
    kp[::3, 132:195] = np.nan  # left hand undetected on some frames
    return kp


def test_keypoint_passthrough_matches_the_offline_transform():
    kp = _keypoints(10)
    feat = KeypointPassthrough()
    steps = [s for frame in kp for s in feat.push_payload(frame.astype("<f4").tobytes())]
    assert len(steps) == 2
    np.testing.assert_array_equal(np.stack(steps), keypoints_to_steps(kp))


def test_keypoint_frames_grouped_in_any_way_give_the_same_steps():
    kp = _keypoints(23)
    expected = keypoints_to_steps(kp)
    for sizes in ([4] * 5 + [3], [7, 7, 7, 2], [1, 2, 3, 5, 8, 4], [23]):
        feat, steps, at = KeypointPassthrough(), [], 0
        for n in sizes:
            steps += feat.push_payload(kp[at : at + n].astype("<f4").tobytes(), n)
            at += n
        assert at == len(kp) and len(steps) == len(expected), sizes
        np.testing.assert_array_equal(np.stack(steps), expected)


def test_feature_steps_several_per_message():
    steps = np.arange(48, dtype="<f4").reshape(3, 16)
    out = FeaturePassthrough(16).push_payload(steps.tobytes(), 3)
    np.testing.assert_array_equal(np.stack(out), steps)
    steps[2, 5] = np.nan
    with pytest.raises(FrameError, match="NaN at step 2 of 3 in this message, index 5"):
        FeaturePassthrough(16).push_payload(steps.tobytes(), 3)
    with pytest.raises(FrameError, match="must be 128 bytes"):
        FeaturePassthrough(16).push_payload(steps.tobytes(), 2)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (np.zeros(KEYPOINT_DIM, np.float64).tobytes(), "looks like float64"),
        (np.zeros(100, np.float32).tobytes(), "must be 1032 bytes"),
        (b"", "got 0"),
    ],
)
def test_keypoint_passthrough_wrong_length(payload, message):
    with pytest.raises(FrameError, match=message):
        KeypointPassthrough().push_payload(payload)


def test_keypoint_passthrough_allows_nan_refuses_inf():
    feat = KeypointPassthrough()
    frame = np.full(KEYPOINT_DIM, np.nan, np.float32)
    assert feat.push_payload(frame.tobytes()) == []
    frame[7] = np.inf
    with pytest.raises(FrameError, match="Inf at index 7"):
        feat.push_payload(frame.tobytes())


def test_feature_passthrough_validates():
    feat = FeaturePassthrough(16)
    step = np.arange(16, dtype="<f4")
    (out,) = feat.push_payload(step.tobytes())
    np.testing.assert_array_equal(out, step)
    for bad, name in ((np.nan, "NaN at index 3"), (np.inf, "Inf at index 3")):
        step[3] = bad
        with pytest.raises(FrameError, match=name):
            feat.push_payload(step.tobytes())
    with pytest.raises(FrameError, match="64 bytes"):
        feat.push_payload(np.zeros(15, np.float32).tobytes())
    # big-endian bytes of 1.0 read back as a tiny denormal, never an error: the wire is little-endian
    assert feat.push_payload(np.ones(16, ">f4").tobytes())[0][0] != 1.0


# ---- rate cap ----


class _IndexedKeypoints:
    """Stand-in landmarker for the rate-cap logic: frame i has i in pixel (0, 0), its keypoints in a table."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.calls: list[int] = []

    def __call__(self, image: np.ndarray) -> np.ndarray:
        i = int(image[0, 0, 0])
        self.calls.append(i)
        return self.table[i]

    def close(self) -> None:
        pass


def _indexed_images(n: int) -> list[np.ndarray]:
    return [np.full((4, 4, 3), i, np.uint8) for i in range(n)]


def test_interpolation_is_linear_with_nearest_for_missing_parts():
    a, b = np.zeros(4, np.float32), np.array([4, 8, np.nan, 4], np.float32)
    a[3] = np.nan
    mid = interpolate_keypoints(a, b, 3)
    np.testing.assert_allclose(mid[:, 0], [1, 2, 3])
    np.testing.assert_allclose(mid[:, 1], [2, 4, 6])
    # a part missing at one end takes the nearer end's value (the midpoint counts as nearer to a)
    assert (mid[:2, 2] == 0).all() and np.isnan(mid[2, 2])
    assert np.isnan(mid[:2, 3]).all() and mid[2, 3] == 4


@pytest.mark.parametrize("every_n", [1, 2, 3, 5])
def test_rate_cap_runs_every_nth_frame_and_keeps_every_frame(every_n):
    t = 13
    table = np.linspace(0, 1, t, dtype=np.float32)[:, None] * np.ones(KEYPOINT_DIM, np.float32)
    table[:, 132:195] = np.nan
    landmarker = _IndexedKeypoints(table)
    capped = RateCappedKeypoints(landmarker, every_n)
    frames = [f for img in _indexed_images(t) for f in capped.push(img)] + capped.flush()
    assert len(frames) == t
    expected_calls = list(range(0, t, every_n))
    if expected_calls[-1] != t - 1:
        expected_calls.append(t - 1)  # flush processes the last buffered frame
    assert landmarker.calls == expected_calls
    np.testing.assert_allclose(np.stack(frames), table, atol=1e-6)  # linear motion is recovered exactly


# ---- factory ----


def test_factory_chooses_by_card_and_kind():
    settings = Settings()
    card = card_for()
    assert isinstance(create_featurizer("keypoints", card, settings), KeypointPassthrough)
    feat = create_featurizer("features", card, settings)
    assert isinstance(feat, FeaturePassthrough) and feat.feature_dim == card.feature.feature_dim
    with pytest.raises(UnsupportedInput, match="unknown input kind 'h264'"):
        create_featurizer("h264", card, settings)


def test_factory_refuses_what_the_model_cannot_take():
    settings = Settings()
    backbone_card = card_for(FeatureSpec(name="videomae-v2-g", input_kind="features", feature_dim=1408))
    with pytest.raises(UnsupportedInput, match="cannot take keypoints"):
        create_featurizer("keypoints", backbone_card, settings)
    with pytest.raises(UnsupportedInput, match="no clip backbone is configured"):
        create_featurizer("jpeg", backbone_card, settings)
    assert create_featurizer("features", backbone_card, settings).feature_dim == 1408
    foreign = card_for(FeatureSpec(name="someone-elses-keypoint-features", version=3))
    with pytest.raises(UnsupportedInput, match="cannot compute"):
        create_featurizer("png", foreign, settings)


def test_factory_refuses_unavailable_pose_complexity():
    from service.features.pose import pose_model_path

    for complexity in (0, 2):
        if pose_model_path(complexity).exists():
            continue
        with pytest.raises(UnsupportedInput, match=f"model_complexity={complexity} needs"):
            create_featurizer("jpeg", card_for(), Settings(pose_model_complexity=complexity))
