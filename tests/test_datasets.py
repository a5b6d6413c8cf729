"""Dataset loaders: SMG layout round trip, generic JSON layout, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.datasets import (
    DataError,
    kinect_to_canonical,
    load_generic,
    load_smg,
    load_smg_sample,
    smg_toolkit_splits,
)
from models.synth import generate_sequence, write_dataset
from service.contract.features import DEFAULT_SPEC, KEYPOINT_DIM, keypoints_to_steps


@pytest.fixture(scope="module")
def smg_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smg")
    write_dataset(root, 3, seed=5, frames_per_sequence=900, splits=(1, 1, 1))
    return root


def test_smg_round_trip(smg_root: Path):
    seqs = load_smg(smg_root)
    assert [s.video_id for s in seqs] == ["Sample0001", "Sample0002", "Sample0003"]
    seq = seqs[1]
    kp = np.load(smg_root / "Sample0002" / "Sample0002_keypoints.npy")
    np.testing.assert_array_equal(seq.steps, keypoints_to_steps(kp))
    assert seq.steps.shape == (225, DEFAULT_SPEC.feature_dim) and seq.steps.dtype == np.float32
    assert seq.num_frames == 900 and seq.fps == 30.0 and seq.frames_per_step == 4
    _, ann = generate_sequence(_seed_of(1, 5), 900)
    rows = np.loadtxt(smg_root / "Sample0002" / "Sample0002_finelabels.csv", delimiter=",", ndmin=2)
    assert seq.labels.tolist() == rows[:, 0].astype(int).tolist()
    np.testing.assert_allclose(seq.segments, rows[:, 1:] / 4.0)
    assert [g[1:] for g in seq.ground_truth()] == [tuple(map(float, r[1:])) for r in rows]
    assert seq.segments.dtype == np.float32 and seq.labels.dtype == np.int64
    assert len(ann) == len(rows)


def _seed_of(index: int, seed: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def test_smg_split_selection(smg_root: Path):
    assert [s.video_id for s in load_smg(smg_root, "train")] == ["Sample0001"]
    assert [s.video_id for s in load_smg(smg_root, "validation")] == ["Sample0002"]
    with pytest.raises(DataError, match="no split named 'holdout'"):
        load_smg(smg_root, "holdout")


def test_smg_features_source_and_data_csv(tmp_path: Path):
    folder = tmp_path / "Sample0007"
    folder.mkdir()
    (folder / "Sample0007_finelabels.csv").write_text("3,8,40\n17,100,180\n")
    (folder / "Sample0007_data.csv").write_text("400,25,4000\n")
    np.save(folder / "Sample0007_features.npy", np.ones((100, 1408), dtype=np.float32))
    seq = load_smg_sample(folder, feature_dim=1408)
    assert seq.fps == 25.0 and seq.num_frames == 400 and seq.steps.shape == (100, 1408)
    np.testing.assert_allclose(seq.segments, [[2, 10], [25, 45]])
    expected = r"Sample0007_features\.npy: feature dim 1408 does not match the expected 372"
    with pytest.raises(DataError, match=expected):
        load_smg_sample(folder, feature_dim=372)
    with pytest.raises(DataError, match="splits.json: not found"):
        load_smg(tmp_path, "train")
    assert smg_toolkit_splits([f"Sample{i:04d}" for i in range(40, 0, -1)])["test"][0] == "Sample0036"


def test_smg_kinect_skeleton(tmp_path: Path):
    folder = tmp_path / "Sample0001"
    folder.mkdir()
    (folder / "Sample0001_finelabels.csv").write_text("5,0,8\n")
    rng = np.random.default_rng(0)
    rows = rng.uniform(1, 1000, (12, 275))
    rows[3] = 0.0  # an untracked frame
    np.savetxt(folder / "Sample0001_skeleton.csv", rows, delimiter=",")
    seq = load_smg_sample(folder)
    assert seq.steps.shape == (3, DEFAULT_SPEC.feature_dim) and np.isfinite(seq.steps).all()
    kp = kinect_to_canonical(rows.reshape(12, 25, 11).astype(np.float32))
    assert kp.shape == (12, KEYPOINT_DIM)
    assert np.isnan(kp[3, :132]).all() and np.isnan(kp[:, 132:]).all()
    left_shoulder = rows[0, 4 * 11 + 7 : 4 * 11 + 9] / [1920, 1080]  # Kinect joint 4, 2-D at 7:9
    np.testing.assert_allclose(kp[0, 11 * 4 : 11 * 4 + 2], left_shoulder, rtol=1e-6)


def _smg_sample(tmp_path: Path, labels: str, frames: int = 40) -> Path:
    folder = tmp_path / "Sample0001"
    folder.mkdir(exist_ok=True)
    (folder / "Sample0001_finelabels.csv").write_text(labels)
    np.save(folder / "Sample0001_keypoints.npy", generate_sequence(1, frames)[0])
    return folder


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("18,0,10\n", r"Sample0001_finelabels\.csv:1: label 18 out of range 1..17"),
        ("0,0,10\n", "label 0 out of range"),
        ("3,0,10\n3,20,10\n", r"Sample0001_finelabels\.csv:2: segment end 10 < start 20"),
        ("3,zero,10\n", r"Sample0001_finelabels\.csv:1: corrupt row"),
        ("3;0;10\n", "expected 'label,start_frame,end_frame'"),
    ],
)
def test_smg_bad_annotations_name_file_and_problem(tmp_path: Path, labels: str, message: str):
    folder = _smg_sample(tmp_path, labels)
    with pytest.raises(DataError, match=message):
        load_smg_sample(folder)


def test_smg_missing_or_corrupt_files(tmp_path: Path):
    folder = _smg_sample(tmp_path, "3,0,10\n")
    (folder / "Sample0001_finelabels.csv").unlink()
    with pytest.raises(DataError, match=r"Sample0001_finelabels\.csv: annotation file not found"):
        load_smg_sample(folder)
    folder = _smg_sample(tmp_path, "3,0,10\n")
    (folder / "Sample0001_keypoints.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"Sample0001_keypoints\.npy: cannot read as \.npy"):
        load_smg_sample(folder)
    np.save(folder / "Sample0001_keypoints.npy", np.zeros((0, KEYPOINT_DIM), dtype=np.float32))
    with pytest.raises(DataError, match=r"Sample0001_keypoints\.npy: empty sequence"):
        load_smg_sample(folder)
    np.save(folder / "Sample0001_keypoints.npy", np.zeros((40, 100), dtype=np.float32))
    with pytest.raises(DataError, match=r"keypoints must have shape \(T, 258\)"):
        load_smg_sample(folder)


# ----------------------------------------------------------------------------- generic layout


def _generic(tmp_path: Path, database: dict, features: dict[str, np.ndarray]) -> tuple[Path, Path]:
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps({"database": database}))
    feat_dir = tmp_path / "features"
    feat_dir.mkdir(exist_ok=True)
    for vid, arr in features.items():
        np.save(feat_dir / f"{vid}.npy", arr)
    return ann, feat_dir


def test_generic_seconds(tmp_path: Path):
    database = {
        "v1": {
            "subset": "Training",
            "duration": 10.0,
            "fps": 30,
            "annotations": [
                {"segment": [1.0, 2.0], "label_id": 3},
                {"segment": [4.0, 5.5], "label": "Arms akimbo"},
            ],
        },
        "v2": {"subset": "Validation", "fps": 25, "annotations": [{"segment": [0.4, 1.2], "label_id": 17}]},
    }
    ann, feat = _generic(
        tmp_path, database, {"v1": np.zeros((75, 1408), np.float32), "v2": np.zeros((60, 1408), np.float32)}
    )
    (train,) = load_generic(ann, feat, "train", feature_dim=1408)
    assert train.video_id == "v1" and train.num_frames == 300 and train.fps == 30.0
    np.testing.assert_allclose(train.segments, [[7.5, 15.0], [30.0, 41.25]])
    assert train.labels.tolist() == [3, 9]
    (val,) = load_generic(ann, feat, "val", feature_dim=1408)
    np.testing.assert_allclose(val.segments, [[2.5, 7.5]])  # 0.4 s * 25 fps / 4
    assert val.num_frames == 240
    assert len(load_generic(ann, feat)) == 2


def test_generic_frames_offset_and_zero_based_ids(tmp_path: Path):
    database = {"v": {"subset": "test", "annotations": [{"segment": [16, 48], "label_id": 0}]}}
    ann, feat = _generic(tmp_path, database, {"v": np.zeros((20, 8), np.float32)})
    (seq,) = load_generic(ann, feat, "test", units="frames", frame_offset=8.0, label_id_base=0)
    np.testing.assert_allclose(seq.segments, [[2.0, 10.0]])
    assert seq.labels.tolist() == [1]
    assert seq.ground_truth() == [(1, 16.0, 48.0)]


def _one(annotation: dict) -> dict:
    return {"v": {"annotations": [annotation]}}


@pytest.mark.parametrize(
    ("database", "features", "message"),
    [
        (_one({"segment": [0, 1], "label_id": 18}), (10, 8), r"\[v\] annotation 0: label 18 out of range"),
        (_one({"segment": [2, 1], "label_id": 3}), (10, 8), "segment end 1.0 < start 2.0"),
        (_one({"segment": [0, 1], "label": "Dancing"}), (10, 8), "unknown label 'Dancing'"),
        (_one({"segment": [0, 1]}), (10, 8), "neither 'label_id' nor 'label'"),
        (_one({"segment": "0-1", "label_id": 3}), (10, 8), "'segment' must be"),
        ({"v": {"annotations": []}}, (10, 9), r"v\.npy: feature dim 9 does not match the expected 8"),
        ({"v": {"annotations": []}}, (0, 8), r"v\.npy: empty sequence"),
    ],
)
def test_generic_bad_input(tmp_path: Path, database: dict, features: tuple[int, int], message: str):
    ann, feat = _generic(tmp_path, database, {"v": np.zeros(features, np.float32)})
    with pytest.raises(DataError, match=message):
        load_generic(ann, feat, feature_dim=8)


def test_generic_missing_and_corrupt_annotation_files(tmp_path: Path):
    with pytest.raises(DataError, match=r"nope\.json: annotation file not found"):
        load_generic(tmp_path / "nope.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: corrupt JSON"):
        load_generic(bad, tmp_path)
    bad.write_text(json.dumps({"videos": {}}))
    with pytest.raises(DataError, match="missing 'database'"):
        load_generic(bad, tmp_path)
    ann, feat = _generic(tmp_path, {"v": {"annotations": []}}, {})
    with pytest.raises(DataError, match=r"v\.npy: feature file not found"):
        load_generic(ann, feat)
