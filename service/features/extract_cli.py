"""``mgstream extract``: a video file -> keypoints (T, 258) and/or feature steps (T_steps, D) as .npy."""

from __future__ import annotations

from pathlib import Path

import typer


def extract(
    video: Path = typer.Argument(..., help="input video file (anything OpenCV/FFmpeg can read)"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="output folder; default: next to the video"),
    keypoints: bool = typer.Option(True, "--keypoints/--no-keypoints", help="write <stem>.keypoints.npy"),
    features: bool = typer.Option(True, "--features/--no-features", help="write <stem>.features.npy"),
    backbone: Path = typer.Option(None, help="ONNX clip backbone: features come from it instead of pose"),
    every_n: int = typer.Option(1, min=1, help="run the pose landmarker on every n-th frame, interpolate"),
    complexity: int = typer.Option(1, min=0, max=2, help="MediaPipe pose model complexity (1 ships offline)"),
    max_frames: int = typer.Option(None, min=1, help="stop after this many frames"),
) -> None:
    """Extract keypoints/features from a video for training on your own data."""
    import numpy as np
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from service.config import Settings
    from service.features.base import FrameError, UnsupportedInput
    from service.features.native_logs import filter_native_stderr
    from service.features.video import VideoError, featurize_video, open_video

    if not (keypoints or features):
        raise typer.BadParameter("nothing to write: both --no-keypoints and --no-features given")
    if backbone is not None and keypoints and not features:
        raise typer.BadParameter("a clip backbone produces features, not keypoints")
    try:
        info = open_video(video)
    except VideoError as exc:
        raise typer.BadParameter(str(exc), param_hint="VIDEO") from exc
    out_dir = out_dir or video.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings()
    max_pixels = max(settings.max_image_pixels, info.width * info.height)  # a local file: any size

    batcher = None
    try:
        if backbone is not None:
            from service.features.clip import ClipBackbone, ClipBatcher, ClipFeaturizer

            clip = ClipBackbone(backbone, providers=list(settings.providers),
                                overrides=dict(settings.clip_config))
            batcher = ClipBatcher(clip, max_batch=1, max_wait_ms=0.0)  # one stream: nothing to wait for
            featurizer = ClipFeaturizer(batcher, max_pixels=max_pixels)
        else:
            from service.features.pose import PoseFeaturizer

            filter_native_stderr()
            featurizer = PoseFeaturizer(complexity=complexity, every_n=every_n, record_keypoints=True,
                                        max_pixels=max_pixels)
    except UnsupportedInput as exc:
        raise typer.BadParameter(str(exc)) from exc

    total = min(info.frame_count, max_frames) if max_frames else info.frame_count
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns) as progress:
            task = progress.add_task(f"extract {video.name}", total=total or None)
            steps = featurize_video(featurizer, video, max_frames=max_frames,
                                    on_frame=lambda n: progress.update(task, completed=n))
    except (VideoError, FrameError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        featurizer.close()
        if batcher is not None:
            batcher.close()

    stem = video.stem
    if features:
        np.save(out_dir / f"{stem}.features.npy", steps)
        typer.echo(f"{out_dir / f'{stem}.features.npy'}: {steps.shape[0]} steps x {steps.shape[1]} features")
    if keypoints and backbone is None:
        kp = np.stack(featurizer.recorded) if featurizer.recorded else np.zeros((0, 258), np.float32)
        np.save(out_dir / f"{stem}.keypoints.npy", kp.astype(np.float32))
        found = int(np.isfinite(kp[:, 0]).sum()) if len(kp) else 0
        typer.echo(f"{out_dir / f'{stem}.keypoints.npy'}: {kp.shape[0]} frames, pose found in {found}")
