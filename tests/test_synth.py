"""The procedural generator: determinism, a plausible keypoint layout, valid annotations, SMG layout."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from models.synth import SynthConfig, generate_sequence, split_counts, write_dataset
from service.contract.classes import NUM_CLASSES
from service.contract.features import KEYPOINT_DIM, keypoints_to_steps

FRAMES = 30 * 60 * 2  # two minutes


@pytest.fixture(scope="module")
def sequence():
    return generate_sequence(7, FRAMES, SynthConfig())


def pose_xy(kp: np.ndarray, idx: int) -> np.ndarray:
    return kp[:, idx * 4 : idx * 4 + 2]


def test_same_seed_same_bytes_and_different_seeds_differ():
    a, ann_a = generate_sequence(3, 900)
    b, ann_b = generate_sequence(3, 900)
    c, _ = generate_sequence(4, 900)
    assert a.tobytes() == b.tobytes() and ann_a == ann_b
    assert a.tobytes() != c.tobytes()


def test_shape_dtype_and_finite_pose(sequence):
    kp, _ = sequence
    assert kp.shape == (FRAMES, KEYPOINT_DIM) and kp.dtype == np.float32
    assert np.isfinite(kp[:, : 33 * 4]).all()  # the pose is always tracked
    assert not np.isinf(kp).any()
    vis = kp[:, 3 : 33 * 4 : 4]
    assert ((vis >= 0) & (vis <= 1)).all()


def test_seated_body_layout_is_plausible(sequence):
    kp, _ = sequence
    nose, l_sh, r_sh = pose_xy(kp, 0), pose_xy(kp, 11), pose_xy(kp, 12)
    l_hip, l_knee, l_ankle = pose_xy(kp, 23), pose_xy(kp, 25), pose_xy(kp, 27)
    assert (nose[:, 1] < np.minimum(l_sh[:, 1], r_sh[:, 1])).all()  # y grows downwards
    assert (l_sh[:, 0] > r_sh[:, 0]).all()  # the person's left appears on the image's right
    assert (l_hip[:, 1] > l_sh[:, 1]).all() and (l_ankle[:, 1] > l_knee[:, 1]).all()
    centre = (l_sh + r_sh) / 2
    assert ((centre > 0.1) & (centre < 0.9)).all()


def test_hands_are_dropped_as_whole_hands(sequence):
    kp, _ = sequence
    for offset in (33 * 4, 33 * 4 + 63):
        hand = kp[:, offset : offset + 63]
        missing = np.isnan(hand)
        whole = missing.all(axis=1)
        assert whole.any() and (~whole).any()
        assert (missing.any(axis=1) == whole).all()  # never partially NaN


def test_hands_hidden_while_folding_arms_behind_body():
    cfg = SynthConfig(class_weights=tuple(1.0 if c == 7 else 0.0 for c in range(1, NUM_CLASSES + 1)))
    kp, ann = generate_sequence(11, 1800, cfg)
    assert ann and all(label == 7 for label, _, _ in ann)
    label, start, end = ann[0]
    mid = (start + end) // 2
    assert np.isnan(kp[mid, 33 * 4 :]).all()


def test_annotations_are_in_range_and_sized_like_smg(sequence):
    kp, ann = sequence
    assert len(ann) > 20
    for label, start, end in ann:
        assert 1 <= label <= NUM_CLASSES
        assert 0 <= start < end <= kp.shape[0]
        assert 20 <= end - start <= 200
    durations = np.array([e - s for _, s, e in ann])
    assert 30 <= durations.mean() <= 80  # SMG: mean 51.3 frames


def test_every_class_is_generated_and_long_tail_is_imbalanced():
    balanced = [lab for s in range(6) for lab, _, _ in generate_sequence(s, 5400)[1]]
    tail = [lab for s in range(6) for lab, _, _ in generate_sequence(s, 5400, SynthConfig(long_tail=True))[1]]
    assert set(balanced) == set(range(1, NUM_CLASSES + 1))
    bc = np.bincount(balanced, minlength=NUM_CLASSES + 1)[1:]
    tc = np.bincount(tail, minlength=NUM_CLASSES + 1)[1:]
    assert tc.max() / max(tc.min(), 1) > 3 * bc.max() / bc.min()
    assert tc.argmax() + 1 == 5  # "Moving legs" leads, as in SMG


def test_classes_move_different_body_parts():
    """A gesture's target region shows in the features: e.g. hair lifts the wrist above the nose."""

    def only(c: int) -> SynthConfig:
        return SynthConfig(class_weights=tuple(1.0 if k == c else 0.0 for k in range(1, NUM_CLASSES + 1)))

    kp, ann = generate_sequence(5, 3600, only(13))
    nose_y = pose_xy(kp, 0)[:, 1]
    wrists_y = np.minimum(pose_xy(kp, 15)[:, 1], pose_xy(kp, 16)[:, 1])
    mids = [(s + e) // 2 for _, s, e in ann]
    assert np.mean(wrists_y[mids] < nose_y[mids]) > 0.8
    kp, ann = generate_sequence(5, 3600, only(9))  # akimbo: elbows far outside the shoulders
    width = pose_xy(kp, 11)[:, 0] - pose_xy(kp, 12)[:, 0]
    elbows = pose_xy(kp, 13)[:, 0] - pose_xy(kp, 14)[:, 0]
    mids = [(s + e) // 2 for _, s, e in ann]
    assert np.mean(elbows[mids] > 1.5 * width[mids]) > 0.5


def test_features_are_finite(sequence):
    steps = keypoints_to_steps(sequence[0])
    assert steps.shape[0] == FRAMES // 4 and np.isfinite(steps).all()


def test_split_counts():
    assert split_counts(20, (0.7, 0.15, 0.15)) == (14, 3, 3)
    assert split_counts(3, (0.8, 0.1, 0.1)) == (1, 1, 1)  # every non-empty split gets one
    assert split_counts(5, (1, 0, 0)) == (5, 0, 0)
    with pytest.raises(ValueError, match="too few"):
        split_counts(2, (0.1, 0.45, 0.45))
    with pytest.raises(ValueError, match="non-negative"):
        split_counts(5, (1.0, -0.5, 0.5))


def test_write_dataset_smg_layout_is_deterministic(tmp_path):
    a = write_dataset(tmp_path / "a", 4, seed=9, frames_per_sequence=600, long_tail=True)
    write_dataset(tmp_path / "b", 4, seed=9, frames_per_sequence=600, long_tail=True)
    for name in ("Sample0001", "Sample0004"):
        for suffix in ("_keypoints.npy", "_finelabels.csv"):
            fa = (tmp_path / "a" / name / f"{name}{suffix}").read_bytes()
            assert fa == (tmp_path / "b" / name / f"{name}{suffix}").read_bytes()
    assert (tmp_path / "a" / "dataset.json").read_bytes() == (tmp_path / "b" / "dataset.json").read_bytes()
    splits = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert sorted(sum(splits.values(), [])) == [f"Sample{i:04d}" for i in range(1, 5)]
    assert all(splits[k] for k in ("train", "val", "test"))
    assert a["description"] == "procedural synthetic skeleton data" and a["config"]["long_tail"] is True
    kp = np.load(tmp_path / "a" / "Sample0002" / "Sample0002_keypoints.npy")
    assert kp.shape == (600, KEYPOINT_DIM) and kp.dtype == np.float32
    with open(tmp_path / "a" / "Sample0002" / "Sample0002_finelabels.csv") as fh:
        rows = [tuple(int(v) for v in row) for row in csv.reader(fh)]
    assert rows and all(len(r) == 3 and 1 <= r[0] <= 17 and r[1] < r[2] <= 600 for r in rows)
    assert sum(a["class_counts"].values()) > 0


def test_synth_command_writes_the_layout(tmp_path):
    import typer
    from typer.testing import CliRunner

    from models.cli import synth

    app = typer.Typer()
    app.command()(synth)
    out = tmp_path / "data"
    result = CliRunner().invoke(app, [str(out), "-n", "3", "--frames", "300", "--seed", "2", "--long-tail"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "Sample0001",
        "Sample0002",
        "Sample0003",
        "dataset.json",
        "splits.json",
    ]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["frames_per_sequence"] == 300 and meta["seed"] == 2 and meta["config"]["long_tail"] is True
    assert np.load(out / "Sample0003" / "Sample0003_keypoints.npy").shape == (300, KEYPOINT_DIM)
