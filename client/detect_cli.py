"""``mgstream detect FILE``: upload a video or .npy as a batch job, follow it, save JSON/CSV/PNG results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def detect(
    file: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            readable=True,
            help="Video (mp4/avi/mkv/webm), or .npy of keypoints (T, 258) or feature steps (T, D).",
        ),
    ],
    url: Annotated[
        str, typer.Option(envvar="MGSTREAM_URL", help="Server URL (http://, ws:// or host:port).")
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option(envvar="MGSTREAM_API_KEY", help="API key, when the server requires one.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", file_okay=False, help="Directory for the results (default: next to FILE)."),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait/--no-wait", help="Follow the job to the end and save results (default), or only submit."),
    ] = True,
    fps: Annotated[
        float | None, typer.Option(min=0.1, help=".npy input: frames per second (default: the model's).")
    ] = None,
    video_id: Annotated[str | None, typer.Option(help="Id for the scored CSV (default: the file name).")] = None,
    threshold: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Score threshold (default: the model's).")
    ] = None,
    poll: Annotated[float, typer.Option(min=0.05, help="Seconds between progress polls.")] = 0.5,
) -> None:
    """Detect every micro-gesture in FILE: writes FILE.mgstream.json, .csv (MiGA/SMG) and .png (timeline)."""
    import httpx
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from client.batch import BatchClient, BatchError, JobFailed

    console = Console(stderr=True)
    out_dir = out or file.parent
    try:
        with BatchClient(url, api_key=api_key) as api:
            job = api.submit(file, fps=fps, video_id=video_id, score_threshold=threshold)
            console.print(
                f"job {job['id']}: {job['filename']}, {job['duration_s']:.1f} s, {job['state']}",
                highlight=False,
            )
            if not wait:
                typer.echo(job["id"])
                return
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.completed:.0f}/{task.total:.0f} frames"),
                TimeRemainingColumn(),
            )
            with Progress(*columns, console=console, transient=True) as bar:
                task = bar.add_task("queued", total=max(job["progress"]["frames_total"], 1))

                def show(j: dict) -> None:
                    p = j["progress"]
                    bar.update(task, completed=p["frames_done"], description=p["phase"] or j["state"])

                job = api.wait(job["id"], poll_s=poll, on_progress=show)
            paths = api.download_results(job["id"], out_dir, stem=file.stem)
    except JobFailed as exc:
        console.print(f"[red]job {exc.job['id']} {exc.job['state']}: {exc.job.get('error')}[/]", highlight=False)
        raise typer.Exit(1) from exc
    except BatchError as exc:
        hint = f" (retry in {exc.retry_after:g} s)" if exc.retry_after else ""
        console.print(f"[red]server refused the file: {exc.detail}{hint}[/]", highlight=False)
        raise typer.Exit(1) from exc
    except httpx.HTTPError as exc:
        console.print(f"[red]cannot reach {url}: {exc}[/]", highlight=False)
        raise typer.Exit(1) from exc
    console.print(f"{job['detections']} detections", highlight=False)
    for path in paths.values():
        typer.echo(str(path))
