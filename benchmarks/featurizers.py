"""Featurizer throughput and the accuracy cost of the pose rate cap.

    python benchmarks/featurizers.py [--frames 40] [--skip-pose] [--skip-clip] [--skip-ratecap]

Pose: MediaPipe Holistic per frame at each model complexity (640x480 frames of
``skimage.data.astronaut()``, slightly shifted, tracking on), plus JPEG decode. Complexities whose
model file is not installed are reported as unavailable offline. Clip: a tiny random 3-D CNN
exported to ONNX (torch is needed here only for that export) at batch 1/8/32. Rate cap: synthetic
keypoint motion, every n-th frame kept and the rest interpolated, compared with the truth.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.contract.features import (  # noqa: E402
    HAND_LANDMARKS,
    KEYPOINT_DIM,
    LEFT_HAND_OFFSET,
    POSE_DIM,
    RIGHT_HAND_OFFSET,
    keypoints_to_steps,
)
from service.features.pose import interpolate_keypoints  # noqa: E402


def _summary(times_s: list[float]) -> str:
    ms = sorted(t * 1000 for t in times_s)
    mean = statistics.fmean(ms)
    p90 = ms[int(0.9 * (len(ms) - 1))]
    median = statistics.median(ms)
    return f"mean {mean:7.2f} ms  median {median:7.2f} ms  p90 {p90:7.2f} ms  -> {1000 / mean:7.1f} /s"


def bench_pose(frames: int) -> None:
    import cv2

    from service.features.images import decode_image
    from service.features.native_logs import filter_native_stderr
    from service.features.pose import HolisticLandmarker, PoseModelUnavailable, pose_model_path
    from tests.featurizer_helpers import astronaut_frames

    filter_native_stderr()
    images = astronaut_frames(frames + 5)
    print(f"\n== pose: MediaPipe Holistic, 640x480, {frames} timed frames after 5 warm-up ==")
    payloads = [cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for im in images]
    times = []
    for p in payloads:
        t0 = time.perf_counter()
        decode_image(p, expected="jpeg", max_pixels=1920 * 1080)
        times.append(time.perf_counter() - t0)
    print(f"jpeg decode (q90, {len(payloads[0]) // 1024} KiB)      {_summary(times[5:])}")
    for complexity in (0, 1, 2):
        try:
            landmarker = HolisticLandmarker(complexity)
        except PoseModelUnavailable:
            print(f"complexity {complexity} ({pose_model_path(complexity).name}): unavailable offline")
            continue
        times, found = [], 0
        try:
            for i, im in enumerate(images):
                t0 = time.perf_counter()
                kp = landmarker(im)
                if i >= 5:
                    times.append(time.perf_counter() - t0)
                    found += bool(np.isfinite(kp[0]))
        finally:
            landmarker.close()
        print(
            f"complexity {complexity} per frame               {_summary(times)}  pose found {found}/{frames}"
        )
        mean = statistics.fmean(times)
        for n in (2, 3, 4):
            print(
                f"  every_n={n}: ~{mean * 1000 / n:6.2f} ms per input frame -> ~{n / mean:6.1f} frames/s"
            )


def bench_clip(repeats: int) -> None:
    from service.features.clip import ClipBackbone, ClipBatcher, preprocess_frame
    from tests.clip_models import export_tiny_backbone

    clip_frames, size = 16, 112
    with tempfile.TemporaryDirectory() as tmp:
        path = export_tiny_backbone(
            Path(tmp) / "tiny3d.onnx", feature_dim=256, clip_frames=clip_frames, size=size
        )
        backbone = ClipBackbone(path)
        print(
            f"\n== clip backbone: tiny random 3-D CNN, input (N, 3, {clip_frames}, {size}, {size}), "
            f"output (N, 256), {backbone.providers[0]} =="
        )
        frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            preprocess_frame(frame, backbone.config)
            times.append(time.perf_counter() - t0)
        print(f"preprocess 640x480 -> {size}x{size}            {_summary(times[5:])}")
        for batch in (1, 8, 32):
            clips = (
                np.random.default_rng(batch)
                .standard_normal(backbone.config.input_shape(batch))
                .astype(np.float32)
            )
            backbone.embed_batch(clips)  # warm-up
            times = []
            for _ in range(max(3, repeats // batch)):
                t0 = time.perf_counter()
                backbone.embed_batch(clips)
                times.append(time.perf_counter() - t0)
            mean = statistics.fmean(times)
            per_clip = mean / batch
            print(
                f"batch {batch:2d}: {mean * 1000:8.2f} ms/batch  {per_clip * 1000:7.2f} ms/clip  "
                f"{1 / per_clip:7.1f} clips/s  = {4 / per_clip:7.1f} frames/s at stride 4 "
                f"({per_clip / 4 * 1000:.2f} ms/frame)"
            )
        batcher = ClipBatcher(backbone, max_batch=8, max_wait_ms=50)
        try:
            clip = np.zeros(backbone.config.input_shape(1)[1:], np.float32)
            t0 = time.perf_counter()
            futures = [batcher.submit(clip) for _ in range(32)]
            for f in futures:
                f.result()
            elapsed = time.perf_counter() - t0
        finally:
            batcher.close()
        print(
            f"batcher, 32 clips submitted at once, max_batch 8: {batcher.batches} batches, "
            f"{elapsed * 1000 / 32:.2f} ms/clip"
        )


def synthetic_keypoints(t: int, fps: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(clean, observed): a seated upper body with smooth micro-gesture hand and head motion; observed adds
    landmark jitter (0.003 normalised, about what Holistic shows on a still subject)."""
    time_s = np.arange(t) / fps
    kp = np.full((t, KEYPOINT_DIM), np.nan, np.float32)
    pose = np.zeros((t, 33, 4), np.float32)
    base = rng.uniform(0.3, 0.7, (33, 2))
    base[11], base[12] = (0.62, 0.55), (0.38, 0.55)  # shoulders 0.24 apart
    pose[..., :2] = base
    pose[..., 3] = 0.95
    pose[:, :11, 0] += 0.01 * np.sin(2 * np.pi * 0.7 * time_s)[:, None]  # head sway
    kp[:, :POSE_DIM] = pose.reshape(t, -1)
    for offset, centre in ((LEFT_HAND_OFFSET, (0.6, 0.8)), (RIGHT_HAND_OFFSET, (0.4, 0.8))):
        freq, amp = rng.uniform(0.5, 3.0), rng.uniform(0.01, 0.04)  # rubbing, scratching, fidgeting
        phase = rng.uniform(0, 2 * np.pi)
        shape = rng.normal(0, 0.02, (HAND_LANDMARKS, 2))
        hand = np.zeros((t, HAND_LANDMARKS, 3), np.float32)
        hand[..., 0] = centre[0] + shape[:, 0] + amp * np.sin(2 * np.pi * freq * time_s + phase)[:, None]
        hand[..., 1] = centre[1] + shape[:, 1] + amp * np.cos(2 * np.pi * freq * time_s + phase)[:, None]
        hand[..., 2] = -0.05
        kp[:, offset : offset + 3 * HAND_LANDMARKS] = hand.reshape(t, -1)
    jitter = rng.normal(0, 0.003, kp.shape).astype(np.float32)
    jitter[:, 3:POSE_DIM:4] = 0  # visibility
    return kp, kp + jitter


def rate_capped(truth: np.ndarray, n: int, hold: bool = False) -> np.ndarray:
    out = truth.copy()
    keys = list(range(0, len(truth), n))
    if keys[-1] != len(truth) - 1:
        keys.append(len(truth) - 1)  # flush processes the last frame
    for a, b in zip(keys, keys[1:], strict=False):
        if b - a > 1:
            out[a + 1 : b] = truth[a] if hold else interpolate_keypoints(truth[a], truth[b], b - a - 1)
    return out


def bench_rate_cap() -> None:
    rng = np.random.default_rng(0)
    fps, t, clips = 30.0, 600, 20
    print(
        f"\n== rate cap accuracy: synthetic keypoints, {clips} sequences x {t} frames at {fps:.0f} fps, "
        "hands circling at 0.5-3 Hz with 0.01-0.04 radius, jitter 0.003 =="
    )
    print("hand kp error: mean |kp - clean motion| in % of shoulder width (n=1 is the jitter alone)")
    print(
        "step error: mean |step - step of the clean motion| over hand dims, in % of that dim's std over time"
        " (mean / velocity part; n=1 is the jitter alone)"
    )
    hands = slice(LEFT_HAND_OFFSET, KEYPOINT_DIM)
    mean_dims = np.arange(99, 183)  # hand x/y in the per-step mean (see service.contract.features)
    vel_dims = mean_dims + 186
    data = [synthetic_keypoints(t, fps, rng) for _ in range(clips)]
    print("every_n  method       hand kp error   step error mean   step error velocity")
    for n in (1, 2, 3, 4, 6):
        for hold in (False, True):
            if n == 1 and hold:
                continue
            kp_err, m_err, v_err = [], [], []
            for clean, observed in data:
                approx = rate_capped(observed, n, hold)
                kp_err.append(np.abs(approx[:, hands] - clean[:, hands]).mean() / 0.24 * 100)
                ref = keypoints_to_steps(clean)
                diff = np.abs(keypoints_to_steps(approx) - ref) / (ref.std(axis=0) + 1e-6)
                m_err.append(diff[:, mean_dims].mean() * 100)
                v_err.append(diff[:, vel_dims].mean() * 100)
            name = "hold last" if hold else "interpolate"
            print(
                f"{n:7d}  {name:11s}  {np.mean(kp_err):9.2f} %   {np.mean(m_err):11.1f} %   "
                f"{np.mean(v_err):13.1f} %"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--clip-repeats", type=int, default=32)
    parser.add_argument("--skip-pose", action="store_true")
    parser.add_argument("--skip-clip", action="store_true")
    parser.add_argument("--skip-ratecap", action="store_true")
    args = parser.parse_args()
    import onnxruntime

    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"
    )
    if not args.skip_pose:
        bench_pose(args.frames)
    if not args.skip_clip:
        bench_clip(args.clip_repeats)
    if not args.skip_ratecap:
        bench_rate_cap()


if __name__ == "__main__":
    main()
