"""The ONNX clip backbone featurizer, on a tiny randomly initialised 3-D CNN exported in a fixture."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from service.config import Settings
from service.contract.features import FeatureSpec
from service.features.base import FrameError, UnsupportedInput
from service.features.clip import (
    BackboneError,
    ClipBackbone,
    ClipBatcher,
    ClipFeaturizer,
    create_clip_batcher,
    preprocess_frame,
)
from service.features.factory import create_featurizer
from service.features.video import featurize_video, iter_frames
from tests.clip_models import export_tiny_backbone
from tests.featurizer_helpers import card_for, jpeg, png, write_video

pytest.importorskip("torch", reason="the tiny backbone is exported with torch")  # installed with [train]

DIM = 64


@pytest.fixture(scope="session")
def backbone_path(tmp_path_factory):
    return export_tiny_backbone(tmp_path_factory.mktemp("clip") / "tiny3d.onnx", feature_dim=DIM)


@pytest.fixture(scope="session")
def backbone(backbone_path):
    return ClipBackbone(backbone_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.fixture()
def batcher(backbone):
    b = ClipBatcher(backbone, max_batch=8, max_wait_ms=1.0)
    yield b
    b.close()


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(n)]


def _backbone_card():
    return card_for(FeatureSpec(name="tiny3d", input_kind="features", feature_dim=DIM, frames_per_step=4))


def test_backbone_config_dim_and_provider(backbone):
    cfg = backbone.config
    assert (cfg.clip_frames, cfg.stride, cfg.size, cfg.layout) == (8, 4, (32, 32), "NCTHW")
    assert backbone.feature_dim == DIM
    assert backbone.providers[-1] == "CPUExecutionProvider"  # CUDA first when usable, CPU otherwise


def test_featurizer_steps_equal_the_backbone_on_causal_clips(batcher, backbone):
    frames = _frames(12)
    feat = ClipFeaturizer(batcher, frames_per_step=4, feature_dim=DIM)
    steps = [s for f in frames for s in feat.push_frame(f)]
    assert len(steps) == 3 and all(s.shape == (DIM,) for s in steps)
    pre = [preprocess_frame(f, backbone.config) for f in frames]
    padded = [pre[0]] * 7 + pre  # the stream's first frame repeated before it
    for k, step in enumerate(steps):
        end = 7 + 4 * k + 4  # the clip ends at frame 4k+3
        clip = np.stack(padded[end - 8 : end], axis=1)[None]
        np.testing.assert_allclose(step, backbone.embed_batch(clip)[0], rtol=1e-5, atol=1e-5)


def test_clips_are_batched_across_streams(backbone):
    clips = [np.random.default_rng(i).standard_normal((3, 8, 32, 32)).astype(np.float32) for i in range(8)]
    batcher = ClipBatcher(backbone, max_batch=8, max_wait_ms=10_000)  # waits until the batch is full
    try:
        futures = [batcher.submit(c) for c in clips]
        results = [f.result(timeout=60) for f in futures]
        assert (batcher.batches, batcher.clips) == (1, 8)
    finally:
        batcher.close()
    for clip, row in zip(clips, results, strict=True):
        np.testing.assert_allclose(row, backbone.embed_batch(clip[None])[0], rtol=1e-4, atol=1e-5)


def test_many_streams_share_one_batcher(batcher):
    frames = _frames(8)
    ref_feat = ClipFeaturizer(batcher)
    ref = [s for f in frames for s in ref_feat.push_frame(f)]
    results: dict[int, list[np.ndarray]] = {}

    def stream(i: int) -> None:
        feat = ClipFeaturizer(batcher)
        results[i] = [s for f in frames for s in feat.push_frame(f)]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 6
    for steps in results.values():
        np.testing.assert_allclose(np.stack(steps), np.stack(ref), rtol=1e-4, atol=1e-5)


def test_video_file_matches_streaming(tmp_path, batcher):
    video = write_video(tmp_path / "noise.avi", _frames(8, seed=3))
    offline = featurize_video(ClipFeaturizer(batcher), video)
    live = ClipFeaturizer(batcher, input_format="png")
    streamed = np.stack([s for f in iter_frames(video) for s in live.push_payload(png(f))])
    assert offline.shape == (2, DIM)
    np.testing.assert_allclose(offline, streamed, rtol=1e-5, atol=1e-6)


def test_factory_builds_clip_featurizer_and_checks_dims(backbone_path):
    settings = Settings(clip_backbone_path=backbone_path, clip_max_wait_ms=0)
    batcher = create_clip_batcher(settings, feature_dim=DIM)
    try:
        feat = create_featurizer("jpeg", _backbone_card(), settings, clip_batcher=batcher)
        assert isinstance(feat, ClipFeaturizer)
        assert [s.shape for f in _frames(4) for s in feat.push_payload(jpeg(f))] == [(DIM,)]
        with pytest.raises(FrameError, match="corrupt JPEG"):
            feat.push_payload(b"\xff\xd8\xff\xe0garbage")
        detector_372 = card_for()  # the built-in keypoint model: images go to pose, not the backbone
        wrong = card_for(FeatureSpec(name="videomae", input_kind="features", feature_dim=372))
        with pytest.raises(
            UnsupportedInput, match="outputs 64-dim features but the detector expects feature_dim=372"
        ):
            create_featurizer("jpeg", wrong, settings, clip_batcher=batcher)
        assert create_featurizer("keypoints", detector_372, settings).kind == "keypoints"
        eight = card_for(
            FeatureSpec(name="tiny3d", input_kind="features", feature_dim=DIM, frames_per_step=8)
        )
        with pytest.raises(BackboneError, match="stride 4 must equal the detector's frames_per_step 8"):
            create_featurizer("png", eight, settings, clip_batcher=batcher)
    finally:
        batcher.close()
    with pytest.raises(
        BackboneError, match="outputs 64-dim features but the detector expects feature_dim=1408"
    ):
        create_clip_batcher(settings, feature_dim=1408)


def test_config_from_settings_and_contradictions(backbone_path, tmp_path):
    with pytest.raises(BackboneError, match="config asks for 16-frame clips, the model takes 8"):
        ClipBackbone(backbone_path, overrides={"clip_frames": 16})
    with pytest.raises(BackboneError, match="unknown clip config keys: frames"):
        ClipBackbone(backbone_path, overrides={"frames": 16})
    with pytest.raises(BackboneError, match="layout must be one of"):
        ClipBackbone(backbone_path, overrides={"layout": "NHWC"})
    assert ClipBackbone(
        backbone_path, overrides={"mean": [0.5, 0.5, 0.5], "resize": "stretch"}
    ).config.mean == (0.5, 0.5, 0.5)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(BackboneError, match="cannot load clip backbone"):
        ClipBackbone(bad)
    with pytest.raises(BackboneError, match="does not exist"):
        ClipBackbone(tmp_path / "missing.onnx")


def test_ntchw_layout(tmp_path):
    path = export_tiny_backbone(
        tmp_path / "ntchw.onnx", feature_dim=16, clip_frames=4, size=24, layout="NTCHW"
    )
    backbone = ClipBackbone(path)
    assert backbone.config.layout == "NTCHW" and backbone.feature_dim == 16
    batcher = ClipBatcher(backbone, max_wait_ms=0)
    try:
        feat = ClipFeaturizer(batcher)
        steps = [s for f in _frames(8) for s in feat.push_frame(f)]
    finally:
        batcher.close()
    assert len(steps) == 2 and np.isfinite(np.stack(steps)).all()


def test_extract_cli_with_a_backbone(tmp_path, backbone_path, batcher):
    import subprocess
    import sys
    from pathlib import Path

    video = write_video(tmp_path / "noise.avi", _frames(9, seed=5))
    code = "import typer; from service.features.extract_cli import extract; typer.run(extract)"
    done = subprocess.run(
        [sys.executable, "-c", code, str(video), "--backbone", str(backbone_path), "--no-keypoints"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    steps = np.load(tmp_path / "noise.features.npy")
    assert not (tmp_path / "noise.keypoints.npy").exists()
    np.testing.assert_allclose(steps, featurize_video(ClipFeaturizer(batcher), video), rtol=1e-5, atol=1e-6)
    assert steps.shape == (2, DIM)


def test_start_alignment_matches_offline_extractors(backbone_path):
    """align="start": step k embeds frames [4k, 4k+8) as offline extractors do; the tail repeats the last."""
    backbone = ClipBackbone(backbone_path, overrides={"align": "start"})
    batcher = ClipBatcher(backbone, max_wait_ms=0)
    frames = _frames(14, seed=7)
    try:
        feat = ClipFeaturizer(batcher)
        live = [len(feat.push_frame(f)) for f in frames]
        tail = feat.flush()
    finally:
        batcher.close()
    assert [i for i, n in enumerate(live) if n] == [7, 11]  # emitted once the clip's last frame is in
    assert len(tail) == 1  # 14 frames -> 3 steps, like the keypoint transform
    pre = [preprocess_frame(f, backbone.config) for f in frames]
    clip = pre[8:14] + [pre[13]] * 2
    expected = backbone.embed_batch(np.stack(clip, axis=1)[None])[0]
    np.testing.assert_allclose(tail[0], expected, rtol=1e-5, atol=1e-5)
