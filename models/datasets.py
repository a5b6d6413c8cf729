"""Dataset loaders: SMG's sample layout and a generic ActionFormer-style JSON + feature layout.

Both return :class:`Sequence` objects: per-video detector feature steps and ground-truth segments
in continuous step units (``step = (frame - frame_offset) / frames_per_step``), labels 1-based.

Supported inputs
----------------
SMG layout (``load_smg``), one folder per sample, ``root/SampleXXXX/``:

- ``SampleXXXX_finelabels.csv``: rows ``label,start_frame,end_frame`` (no header, 1-based labels).
  Frames are read as written; like the toolkit's ``getMGFlag`` the segment covers frames
  ``start .. end-1`` (0-based, end exclusive), which is what ``models.synth`` writes.
- features, first found in this order (or forced with ``source=``):
  ``SampleXXXX_features.npy`` (T_steps, D) from any backbone at ``frames_per_step``;
  ``SampleXXXX_keypoints.npy`` (T, 258) canonical keypoints (``models.synth`` output, or
  ``mgstream extract`` run on ``SampleXXXX_color.mp4``), turned into steps by the feature contract;
  ``SampleXXXX_skeleton.csv``, the original Kinect-v2 skeleton (25 joints x 11 values per row),
  mapped approximately into the canonical layout (see :func:`kinect_to_canonical`).
- ``SampleXXXX_data.csv`` (``numFrames,fps,maxDepth``), optional: fps and frame count.
- ``root/splits.json`` ``{"train": [...], "val": [...], "test": [...]}``, optional; without it
  only ``split=None`` (all samples) works. :func:`smg_toolkit_splits` gives the toolkit's split.

Generic layout (``load_generic``): ``{"database": {video_id: {"subset", "duration", "fps",
"annotations": [{"segment": [s, e], "label_id" | "label"}]}}}`` with segments in seconds or frames,
and ``feature_dir/<video_id>.npy`` of shape (T, D).

Every problem raises :class:`DataError` naming the file and what is wrong.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.contract.classes import NUM_CLASSES, SMG_CLASSES
from service.contract.features import (
    DEFAULT_SPEC,
    HAND_DIM,
    KEYPOINT_DIM,
    POSE_LANDMARKS,
    FeatureSpec,
    keypoints_to_steps,
)

SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "validation", "valid"),
    "test": ("test", "testing"),
}


class DataError(ValueError):
    """Bad dataset input; the message names the file and the problem."""


@dataclass
class Sequence:
    """One video: feature steps and its ground truth in continuous step units."""

    video_id: str
    steps: np.ndarray  # (T_steps, D) float32
    segments: np.ndarray  # (M, 2) float32, step units
    labels: np.ndarray  # (M,) int64, 1-based
    num_frames: int
    fps: float
    frames_per_step: int = DEFAULT_SPEC.frames_per_step
    frame_offset: float = 0.0  # frame = step * frames_per_step + frame_offset

    def segments_in_frames(self) -> np.ndarray:
        """Ground-truth segments back in frames (the unit the SMG F1 is computed in)."""
        return self.segments.astype(np.float64) * self.frames_per_step + self.frame_offset

    def ground_truth(self) -> list[tuple[int, float, float]]:
        """``(class_id, start_frame, end_frame)`` rows for :mod:`models.evaluation`."""
        frames = self.segments_in_frames()
        return [(int(c), float(s), float(e)) for c, (s, e) in zip(self.labels, frames, strict=True)]


# ----------------------------------------------------------------------------- shared checks


def _check_label(label: int, where: str) -> int:
    if not 1 <= label <= NUM_CLASSES:
        raise DataError(f"{where}: label {label} out of range 1..{NUM_CLASSES}")
    return label


def _check_steps(steps: np.ndarray, path: Path, feature_dim: int | None) -> np.ndarray:
    if steps.ndim != 2:
        raise DataError(f"{path}: features must be a 2-D array (T, D), got shape {steps.shape}")
    if steps.shape[0] == 0:
        raise DataError(f"{path}: empty sequence (0 feature steps)")
    if feature_dim is not None and steps.shape[1] != feature_dim:
        raise DataError(f"{path}: feature dim {steps.shape[1]} does not match the expected {feature_dim}")
    if not np.isfinite(steps).all():
        raise DataError(f"{path}: features contain NaN or Inf")
    return steps.astype(np.float32, copy=False)


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for truncated / foreign files
        raise DataError(f"{path}: cannot read as .npy ({exc})") from exc


def _to_steps(
    frames: list[tuple[int, float, float]],
    num_steps: int,
    frames_per_step: int,
    frame_offset: float,
    where: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Frame segments -> step segments clipped to [0, num_steps]; segments fully outside are dropped."""
    segs, labels = [], []
    for label, start, end in frames:
        s = (start - frame_offset) / frames_per_step
        e = (end - frame_offset) / frames_per_step
        if e <= 0 or s >= num_steps:
            warnings.warn(
                f"{where}: segment [{start}, {end}] lies outside the features; dropped", stacklevel=3
            )
            continue
        segs.append((max(s, 0.0), min(e, float(num_steps))))
        labels.append(label)
    return np.asarray(segs, dtype=np.float32).reshape(-1, 2), np.asarray(labels, dtype=np.int64)


def _canonical_split(name: str) -> str:
    low = name.strip().lower()
    return next((key for key, aliases in SPLIT_ALIASES.items() if low in aliases), low)


def _split_members(split: str, subset: str) -> bool:
    """True when ``subset`` names the same split as ``split`` (train/training, val/validation, ...)."""
    return _canonical_split(split) == _canonical_split(subset)


# ----------------------------------------------------------------------------- SMG layout


def read_finelabels(path: str | Path) -> list[tuple[int, int, int]]:
    """Rows ``label,start_frame,end_frame`` (no header); validates labels and ordering."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    rows: list[tuple[int, int, int]] = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read annotation file ({exc})") from exc
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            raise DataError(f"{path}:{lineno}: expected 'label,start_frame,end_frame', got {line!r}")
        try:
            label, start, end = int(parts[0]), int(float(parts[1])), int(float(parts[2]))
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: corrupt row {line!r} ({exc})") from exc
        _check_label(label, f"{path}:{lineno}")
        if end < start:
            raise DataError(f"{path}:{lineno}: segment end {end} < start {start}")
        if start < 0:
            raise DataError(f"{path}:{lineno}: negative start frame {start}")
        rows.append((label, start, end))
    return rows


def read_smg_data_csv(path: str | Path) -> tuple[int, float]:
    """``SampleXXXX_data.csv``: ``numFrames,fps,maxDepth`` -> (num_frames, fps)."""
    path = Path(path)
    try:
        row = next(csv.reader(path.read_text().splitlines()))
        return int(float(row[0])), float(row[1])
    except Exception as exc:
        raise DataError(f"{path}: expected 'numFrames,fps,maxDepth' ({exc})") from exc


# Kinect-v2 joint order in SMG's skeleton.csv (SMGaccessSample.Skeleton), 11 values per joint:
# world xyz (0:3), orientation quaternion (3:7), 2-D image coordinates (7:9), two more values.
KINECT_JOINTS = (
    "SpineBase", "SpineMid", "ShoulderCenter", "Head", "ShoulderLeft", "ElbowLeft", "WristLeft", "HandLeft",
    "ShoulderRight", "ElbowRight", "WristRight", "HandRight", "HipLeft", "KneeLeft", "AnkleLeft", "FootLeft",
    "HipRight", "KneeRight", "AnkleRight", "FootRight", "SpineShoulder", "HandTipLeft", "ThumbLeft",
    "HandTipRight", "ThumbRight",
)  # fmt: skip
# MediaPipe pose index -> Kinect joint index. The face has no Kinect joints: all 11 face points
# take the Head joint. Heels take the ankles.
_POSE_FROM_KINECT = (
    [3] * 11 + [4, 8, 5, 9, 6, 10, 7, 11, 21, 23, 22, 24, 12, 16, 13, 17, 14, 18, 14, 18, 15, 19]
)  # fmt: skip


def read_smg_skeleton_csv(path: str | Path) -> np.ndarray:
    """SMG's ``SampleXXXX_skeleton.csv`` -> (T, 25, 11) float32, one row per frame."""
    path = Path(path)
    try:
        arr = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except Exception as exc:
        raise DataError(f"{path}: cannot parse skeleton CSV ({exc})") from exc
    if arr.shape[0] == 0:
        raise DataError(f"{path}: empty sequence (no skeleton rows)")
    if arr.shape[1] < 25 * 11:
        raise DataError(f"{path}: expected 275 values per row (25 joints x 11), got {arr.shape[1]}")
    return arr[:, : 25 * 11].reshape(-1, 25, 11)


def kinect_to_canonical(skeleton: np.ndarray, image_size: tuple[int, int] = (1920, 1080)) -> np.ndarray:
    """Approximate Kinect-v2 skeleton (T, 25, 11) -> canonical keypoints (T, 258).

    Uses the joints' 2-D image coordinates divided by ``image_size`` (which image space SMG stores
    there is not documented; 1920x1080 colour is assumed). Hands are NaN (Kinect has no finger
    landmarks), face points collapse onto the Head joint, visibility is 1, z is 0, and frames whose
    joints are all zero (no body tracked) become NaN. A model trained on MediaPipe keypoints sees
    a domain shift on these; train on them directly, or run ``mgstream extract`` on the colour video.
    """
    t = skeleton.shape[0]
    xy = skeleton[:, :, 7:9] / np.asarray(image_size, dtype=np.float32)
    pose = np.zeros((t, POSE_LANDMARKS, 4), dtype=np.float32)
    pose[..., :2] = xy[:, _POSE_FROM_KINECT]
    pose[..., 3] = 1.0
    untracked = ~skeleton.reshape(t, -1).any(axis=1)
    pose[untracked] = np.nan
    hands = np.full((t, 2 * HAND_DIM), np.nan, dtype=np.float32)
    return np.concatenate([pose.reshape(t, -1), hands], axis=1)


def smg_toolkit_splits(sample_ids: Iterable[str]) -> dict[str, list[str]]:
    """The SMG online-recognition toolkit's split: sorted samples [0:35] train, [35:] test."""
    ids = sorted(sample_ids)
    return {"train": ids[:35], "val": [], "test": ids[35:]}


def list_samples(root: str | Path, split: str | None = None) -> list[str]:
    """Sample folder names of ``root`` (all, or those of ``split`` in ``root/splits.json``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset directory not found")
    if split is None:
        return sorted(
            p.name for p in root.iterdir() if p.is_dir() and (p / f"{p.name}_finelabels.csv").exists()
        )
    split_file = root / "splits.json"
    if not split_file.is_file():
        raise DataError(f"{split_file}: not found; needed to select split {split!r} (see smg_toolkit_splits)")
    try:
        splits = json.loads(split_file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{split_file}: corrupt JSON ({exc})") from exc
    for key, members in splits.items():
        if _split_members(split, key):
            return list(members)
    raise DataError(f"{split_file}: no split named {split!r} (has {sorted(splits)})")


def load_smg_sample(
    folder: str | Path,
    *,
    source: str = "auto",
    spec: FeatureSpec = DEFAULT_SPEC,
    feature_dim: int | None = None,
    fps: float | None = None,
    kinect_image_size: tuple[int, int] = (1920, 1080),
) -> Sequence:
    """Load one ``SampleXXXX`` folder; ``source`` is auto, features, keypoints or kinect."""
    folder = Path(folder)
    name = folder.name
    if not folder.is_dir():
        raise DataError(f"{folder}: sample folder not found")
    ann = read_finelabels(folder / f"{name}_finelabels.csv")
    data_csv = folder / f"{name}_data.csv"
    num_frames, file_fps = read_smg_data_csv(data_csv) if data_csv.is_file() else (None, None)
    fps = float(fps or file_fps or spec.fps)
    candidates = {
        "features": folder / f"{name}_features.npy",
        "keypoints": folder / f"{name}_keypoints.npy",
        "kinect": folder / f"{name}_skeleton.csv",
    }
    if source == "auto":
        source = next((k for k, p in candidates.items() if p.is_file()), "")
        if not source:
            raise DataError(f"{folder}: no {name}_features.npy, {name}_keypoints.npy or {name}_skeleton.csv")
    elif source not in candidates:
        raise ValueError(f"source must be auto, features, keypoints or kinect, got {source!r}")
    path = candidates[source]
    fps_step = spec.frames_per_step
    if source == "features":
        steps = _check_steps(_load_npy(path), path, feature_dim)
        num_frames = num_frames or steps.shape[0] * fps_step
    else:
        if source == "keypoints":
            kp = _load_npy(path)
            if kp.ndim != 2 or kp.shape[1] != KEYPOINT_DIM:
                raise DataError(f"{path}: keypoints must have shape (T, {KEYPOINT_DIM}), got {kp.shape}")
        else:
            kp = kinect_to_canonical(read_smg_skeleton_csv(path), kinect_image_size)
        if kp.shape[0] < fps_step:
            raise DataError(
                f"{path}: empty sequence ({kp.shape[0]} frames, fewer than one step of {fps_step})"
            )
        try:
            steps = keypoints_to_steps(kp, spec)
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from exc
        steps = _check_steps(steps, path, feature_dim if feature_dim is not None else spec.feature_dim)
        num_frames = num_frames or kp.shape[0]
    segs, labels = _to_steps(ann, steps.shape[0], fps_step, 0.0, str(folder / f"{name}_finelabels.csv"))
    return Sequence(name, steps, segs, labels, int(num_frames), fps, fps_step, 0.0)


def load_smg(
    root: str | Path,
    split: str | None = None,
    *,
    source: str = "auto",
    spec: FeatureSpec = DEFAULT_SPEC,
    feature_dim: int | None = None,
    fps: float | None = None,
    kinect_image_size: tuple[int, int] = (1920, 1080),
) -> list[Sequence]:
    """All samples of ``split`` (``None`` = every sample folder) under an SMG-layout ``root``."""
    root = Path(root)
    names = list_samples(root, split)
    if not names:
        raise DataError(f"{root}: no samples found" + (f" for split {split!r}" if split else ""))
    return [
        load_smg_sample(
            root / n,
            source=source,
            spec=spec,
            feature_dim=feature_dim,
            fps=fps,
            kinect_image_size=kinect_image_size,
        )
        for n in names
    ]


# ----------------------------------------------------------------------------- generic layout


def _label_of_annotation(item: dict, where: str, label_id_base: int) -> int:
    if "label_id" in item:
        try:
            raw = int(item["label_id"])
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: label_id {item['label_id']!r} is not an integer") from exc
        return _check_label(raw - label_id_base + 1, where)
    if "label" in item:
        name = str(item["label"]).strip()
        if name.lstrip("-").isdigit():
            return _check_label(int(name) - label_id_base + 1, where)
        lowered = [c.lower() for c in SMG_CLASSES]
        if name.lower() in lowered:
            return lowered.index(name.lower()) + 1
        raise DataError(f"{where}: unknown label {name!r}")
    raise DataError(f"{where}: annotation has neither 'label_id' nor 'label'")


def load_generic(
    annotation_file: str | Path,
    feature_dir: str | Path,
    split: str | None = None,
    *,
    units: str = "seconds",
    frames_per_step: int = 4,
    feature_dim: int | None = None,
    default_fps: float = 30.0,
    frame_offset: float = 0.0,
    label_id_base: int = 1,
) -> list[Sequence]:
    """ActionFormer-style JSON annotations plus ``feature_dir/<video_id>.npy`` (T, D) features.

    ``units``: ``"seconds"`` (frames = value x fps) or ``"frames"``; ``duration`` uses the same
    unit. ``frames_per_step`` is the backbone's feature stride (VideoMAEv2 at stride 4: 4).
    ``frame_offset``: the frame that step 0 stands for (ActionFormer centres clips, using
    ``0.5 * clip_frames``; our keypoint features use 0). ``label_id_base``: 1 for SMG ids, 0 for
    0-based exports; names from the SMG class list are accepted in ``label``.
    """
    if units not in ("seconds", "frames"):
        raise ValueError(f"units must be 'seconds' or 'frames', got {units!r}")
    annotation_file = Path(annotation_file)
    feature_dir = Path(feature_dir)
    if not annotation_file.is_file():
        raise DataError(f"{annotation_file}: annotation file not found")
    try:
        doc = json.loads(annotation_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{annotation_file}: corrupt JSON ({exc})") from exc
    database = doc.get("database") if isinstance(doc, dict) else None
    if not isinstance(database, dict):
        raise DataError(f"{annotation_file}: missing 'database' object")
    out: list[Sequence] = []
    for vid, entry in database.items():
        where = f"{annotation_file} [{vid}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: entry must be an object")
        if split is not None and not _split_members(split, str(entry.get("subset", ""))):
            continue
        fps = float(entry.get("fps") or default_fps)
        to_frames = fps if units == "seconds" else 1.0
        frames: list[tuple[int, float, float]] = []
        for k, item in enumerate(entry.get("annotations", [])):
            w = f"{where} annotation {k}"
            try:
                s, e = (float(v) for v in item["segment"])
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{w}: 'segment' must be [start, end] numbers") from exc
            if e < s:
                raise DataError(f"{w}: segment end {e} < start {s}")
            frames.append((_label_of_annotation(item, w, label_id_base), s * to_frames, e * to_frames))
        path = feature_dir / f"{vid}.npy"
        steps = _check_steps(_load_npy(path), path, feature_dim)
        if "duration" in entry:
            num_frames = int(round(float(entry["duration"]) * to_frames))
        else:
            num_frames = steps.shape[0] * frames_per_step
        segs, labels = _to_steps(frames, steps.shape[0], frames_per_step, frame_offset, where)
        out.append(Sequence(str(vid), steps, segs, labels, num_frames, fps, frames_per_step, frame_offset))
    if not out:
        raise DataError(f"{annotation_file}: no videos" + (f" in split {split!r}" if split else ""))
    return out
