"""The trainer/server contract: keypoint features, the model card, anchors and decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.synth import generate_sequence
from service.contract.classes import NUM_CLASSES, SMG_CLASSES, label_of
from service.contract.features import (
    DEFAULT_SPEC,
    FRAME_DIM,
    KEYPOINT_DIM,
    LEFT_HAND_OFFSET,
    RIGHT_HAND_OFFSET,
    FeatureSpec,
    StepAssembler,
    keypoints_to_frame_features,
    keypoints_to_steps,
)
from service.contract.model_card import (
    METADATA_KEY,
    ModelCard,
    ModelCardError,
    PostProcess,
    anchor_steps,
    anchor_strides,
)
from service.detection.decode import decode


@pytest.fixture(scope="module")
def keypoints() -> np.ndarray:
    kp, _ = generate_sequence(3, 240)
    return kp


def test_classes_are_smg_1_based() -> None:
    assert NUM_CLASSES == 17
    assert label_of(1) == "Turtling neck and shoulder"
    assert label_of(17) == SMG_CLASSES[-1]
    with pytest.raises(ValueError, match="out of range"):
        label_of(18)


def test_features_ignore_camera_offset_and_distance(keypoints: np.ndarray) -> None:
    moved = keypoints.copy()
    pose = moved[:, :132].reshape(len(moved), 33, 4)
    hands = moved[:, LEFT_HAND_OFFSET:].reshape(len(moved), 42, 3)
    # Zoom out around the image centre and shift: body-centred, scale-normalised features stay put.
    for part in (pose, hands):
        part[..., :2] = 0.5 + (part[..., :2] - 0.5) * 0.6 + np.array([0.1, -0.05], dtype=np.float32)
    np.testing.assert_allclose(keypoints_to_steps(moved), keypoints_to_steps(keypoints), atol=2e-4)


def test_missing_hand_becomes_zeros_with_flag_down(keypoints: np.ndarray) -> None:
    kp = keypoints[:8].copy()
    kp[:, RIGHT_HAND_OFFSET:] = np.nan
    frames = keypoints_to_frame_features(kp)
    assert np.isfinite(frames).all()
    right_xy = frames[:, FRAME_DIM - 3 - 42 : FRAME_DIM - 3]
    assert (right_xy == 0).all()
    assert (frames[:, -1] == 0).all() and (frames[:, -3] == 1).all()


def test_missing_pose_zeroes_everything_but_is_finite(keypoints: np.ndarray) -> None:
    kp = keypoints[:4].copy()
    kp[:, :132] = np.nan
    frames = keypoints_to_frame_features(kp)
    assert np.isfinite(frames).all() and (frames == 0).all()


def test_incremental_assembler_equals_whole_sequence(keypoints: np.ndarray) -> None:
    assembler = StepAssembler()
    steps = [s for frame in keypoints if (s := assembler.push(frame)) is not None]
    whole = keypoints_to_steps(keypoints)
    assert len(steps) == len(whole) == len(keypoints) // DEFAULT_SPEC.frames_per_step
    np.testing.assert_array_equal(np.stack(steps), whole)
    assert whole.shape[1] == DEFAULT_SPEC.feature_dim


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((4, 257), np.float32), "shape"),
        (np.zeros((4, KEYPOINT_DIM), np.int32), "floating point"),
        (np.full((4, KEYPOINT_DIM), np.inf, np.float32), "Inf"),
    ],
)
def test_bad_keypoints_are_named(bad: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        keypoints_to_steps(bad)


def test_spec_from_another_featurizer_is_not_built_in() -> None:
    backbone = FeatureSpec(name="videomae-v2", input_kind="features", feature_dim=1408)
    assert not backbone.is_builtin()
    with pytest.raises(ValueError, match="not produced from keypoints"):
        StepAssembler(backbone)


def _card(**overrides) -> ModelCard:
    fields = dict(
        name="m", version="1", created="now", feature=DEFAULT_SPEC, window_steps=64, strides=(1, 2, 4), causal=True
    )
    fields.update(overrides)
    return ModelCard(**fields)


def test_model_card_round_trips_through_metadata() -> None:
    card = _card(postprocess=PostProcess(score_threshold=0.42), metrics={"f1": 0.5})
    back = ModelCard.from_metadata(card.to_metadata())
    assert back == card
    assert back.num_anchors == 64 + 32 + 16


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({}, "not an mgstream model"),
        ({METADATA_KEY: "{not json"}, "not valid JSON"),
        ({METADATA_KEY: json.dumps({"name": "m"})}, "lacks"),
        ({METADATA_KEY: _card().to_json().replace('"window_steps": 64', '"window_steps": 66')}, "multiple"),
        ({METADATA_KEY: _card().to_json().replace('"format": 1', '"format": 99')}, "newer"),
    ],
)
def test_bad_model_cards_are_refused_with_reason(props: dict, message: str) -> None:
    with pytest.raises(ModelCardError, match=message):
        ModelCard.from_metadata(props)


def test_anchors_sit_on_the_last_step_each_position_has_seen() -> None:
    steps = anchor_steps(8, (1, 2, 4))
    strides = anchor_strides(8, (1, 2, 4))
    np.testing.assert_array_equal(steps, [0, 1, 2, 3, 4, 5, 6, 7, 1, 3, 5, 7, 3, 7])
    np.testing.assert_array_equal(strides, [1] * 8 + [2] * 4 + [4] * 2)


def test_decode_keeps_the_best_of_overlapping_segments_per_class() -> None:
    anchors = np.array([10.0, 11.0, 30.0])
    scores = np.zeros((3, 17), np.float32)
    scores[0, 2], scores[1, 2], scores[2, 4] = 0.9, 0.8, 0.6
    offsets = np.array([[5, 2], [6, 1], [3, 3]], np.float32)
    pp = PostProcess(score_threshold=0.5, nms_iou=0.5, min_duration_steps=1)
    found = decode(scores, offsets, anchors, pp, step_offset=100)
    assert [(d.class_id, round(d.score, 2), d.start_step, d.end_step) for d in found] == [
        (3, 0.9, 105.0, 112.0),
        (5, 0.6, 127.0, 133.0),
    ]
    assert decode(scores, offsets, anchors, pp, score_threshold=0.95) == []
