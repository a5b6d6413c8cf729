"""``mgstream stream``: stream a camera, a video or a ``.npy`` to a running server and print events live."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def stream(
    file: Annotated[
        Path | None,
        typer.Argument(help="Video file, or .npy of keypoints (T, 258) or feature steps (T, D), to replay."),
    ] = None,
    camera: Annotated[
        str | None,
        typer.Option("--camera", "-c", help="Camera index (0) or a video path/URL opened as a live device."),
    ] = None,
    url: Annotated[
        str, typer.Option(envvar="MGSTREAM_URL", help="Server URL (http://, ws:// or host:port).")
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None,
        typer.Option(envvar="MGSTREAM_API_KEY", help="API key, when the server requires one."),
    ] = None,
    fps: Annotated[
        float | None,
        typer.Option(help="Frames per second to send (camera default 15; files: their own rate)."),
    ] = None,
    fast: Annotated[bool, typer.Option("--fast", help="Replay FILE as fast as possible.")] = False,
    preview: Annotated[
        bool | None,
        typer.Option("--preview/--no-preview", help="Preview window (default: when a display exists)."),
    ] = None,
    seconds: Annotated[
        float | None,
        typer.Option("--seconds", help="Stop after this many seconds of media."),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Score threshold (default: the model's)."),
    ] = None,
    stream_id: Annotated[str | None, typer.Option(help="Stream id (default: server-assigned).")] = None,
    jpeg_quality: Annotated[int, typer.Option(min=10, max=100, help="JPEG quality of sent frames.")] = 80,
    max_width: Annotated[int, typer.Option(min=0, help="Downscale wider frames (0: never).")] = 640,
    reconnect: Annotated[bool, typer.Option(help="Reconnect after a drop.")] = False,
    frames_per_message: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            help="Keypoint .npy: frames per message. 0: one feature step's frames (the server's frames_per_step),"
            " which costs the server a quarter of the messages and delays no event; 1: every frame alone.",
        ),
    ] = 0,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per message.")] = False,
) -> None:
    """Stream a webcam (--camera 0), a video or a .npy and print gestures as they start and end."""
    import asyncio
    import time

    from rich.console import Console

    from client.live import EventPrinter, Preview, print_summary, run_stream
    from client.sources import CaptureSource, open_source
    from client.streaming import StreamError

    console = Console(stderr=json_lines)  # keep stdout clean for --json
    try:
        source = open_source(
            file,
            camera,
            fps=fps,
            fast=fast,
            max_width=max_width,
            max_seconds=seconds,
            frames_per_message=frames_per_message,
        )
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    window = Preview.maybe(preview, console) if isinstance(source, CaptureSource) else None
    what = f"camera {camera}" if camera is not None else str(file)
    console.print(f"streaming {what} as {source.input_kind} at {source.fps:g} fps to {url}", highlight=False)
    started = time.monotonic()
    try:
        summary = asyncio.run(
            run_stream(
                source,
                url=url,
                api_key=api_key,
                printer=EventPrinter(console, json_lines=json_lines),
                preview=window,
                stream_id=stream_id,
                score_threshold=threshold,
                reconnect=reconnect,
                jpeg_quality=jpeg_quality,
            )
        )
    except StreamError as exc:
        console.print(f"[bold red]{exc}[/]", highlight=False)
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        console.print("[yellow]aborted[/]")
        raise typer.Exit(130) from None
    print_summary(console, summary, time.monotonic() - started)
