"""The ``mgstream stream`` loop: read a source, send it, print events as they arrive, optionally preview.

Sending and printing run concurrently: a task iterates the stream's events while the main coroutine reads
and sends frames, so events appear live even while a slow camera read is pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from client.sources import ArraySource, CaptureSource
from client.streaming import (
    EndedMessage,
    ErrorMessage,
    Event,
    GestureEvent,
    ReadyMessage,
    Reconnect,
    Reconnected,
    StatusMessage,
    Stream,
    connect,
)


@dataclass
class Summary:
    ready: ReadyMessage | None = None
    ended: EndedMessage | None = None
    frames_sent: int = 0
    ends: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    reconnects: int = 0
    interrupted: bool = False


class EventPrinter:
    """Rich lines for humans, or one JSON object per line (``--json``) for programs."""

    def __init__(self, console: Console, *, json_lines: bool, status_every_s: float = 5.0) -> None:
        self.console = console
        self.json_lines = json_lines
        self.status_every_s = status_every_s
        self._last_status = 0.0

    def event(self, event: Event) -> None:
        if self.json_lines:
            line = event.model_dump_json() if hasattr(event, "model_dump_json") else _reconnected_json(event)
            print(line, flush=True)
            return
        if isinstance(event, GestureEvent):
            if event.type == "gesture_start":
                self.console.print(
                    f"[bold green]▶ start[/] {_clock(event.start_time)}  #{event.event_id:<4} "
                    f"[bold]{event.label}[/] ({event.score:.2f})"
                )
            else:
                self.console.print(
                    f"[bold blue]■ end  [/] {_clock(event.start_time)}–{_clock(event.end_time)}  "
                    f"#{event.event_id:<4} [bold]{event.label}[/] ({event.score:.2f}, "
                    f"{event.end_time - event.start_time:.2f} s)"
                )
        elif isinstance(event, StatusMessage):
            now = time.monotonic()
            if now - self._last_status >= self.status_every_s:
                self._last_status = now
                self.console.print(
                    f"[dim]status: {event.frames_received} received, {event.frames_processed} processed, "
                    f"{event.frames_dropped} dropped, lag {event.lag_s * 1000:.0f} ms[/]"
                )
        elif isinstance(event, ErrorMessage):
            self.console.print(f"[bold red]error[/] {event.code}: {event.message}")
        elif isinstance(event, Reconnected):
            self.console.print(
                f"[yellow]reconnected[/] after close {event.close_code} (attempt {event.attempt}); "
                f"new stream {event.ready.stream_id}"
            )
        elif isinstance(event, EndedMessage):
            pass  # the summary reports the totals


def _clock(seconds: float) -> str:
    minutes, rest = divmod(max(seconds, 0.0), 60.0)
    return f"{int(minutes):02d}:{rest:05.2f}"


def _reconnected_json(event: Reconnected) -> str:
    import json

    return json.dumps({"type": event.type, "attempt": event.attempt, "stream_id": event.ready.stream_id})


class Preview:
    """An OpenCV window with the current gestures drawn over the frame; only where a display exists."""

    WINDOW = "mgstream"

    def __init__(self) -> None:
        import cv2

        self.cv2 = cv2
        cv2.namedWindow(self.WINDOW, cv2.WINDOW_NORMAL)  # raises on headless OpenCV builds

    @classmethod
    def maybe(cls, wanted: bool | None, console: Console) -> Preview | None:
        has_display = sys.platform in ("win32", "darwin") or bool(
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        )
        if wanted is False or (wanted is None and not has_display):
            return None
        try:
            return cls()
        except Exception as exc:  # cv2.error on opencv-python-headless, or no display after all
            if wanted:
                console.print(f"[yellow]no preview window: {str(exc).strip().splitlines()[-1]}[/]")
            return None

    def show(self, frame: np.ndarray, stream: Stream) -> bool:
        """Draw and display; False when the user pressed q or Esc."""
        cv2 = self.cv2
        canvas = frame.copy()
        y = 28
        for event in list(stream.active.values())[-6:]:
            text = f"{event.label} {event.score:.2f}"
            cv2.putText(canvas, text, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 4, cv2.LINE_AA)
            cv2.putText(canvas, text, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (80, 255, 80), 2, cv2.LINE_AA)
            y += 28
        if stream.status is not None:
            text = f"lag {stream.status.lag_s * 1000:.0f} ms  dropped {stream.status.frames_dropped}"
            cv2.putText(canvas, text, (10, canvas.shape[0] - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
        cv2.imshow(self.WINDOW, canvas)
        return (cv2.waitKey(1) & 0xFF) not in (ord("q"), 27)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.cv2.destroyWindow(self.WINDOW)


async def run_stream(
    source: CaptureSource | ArraySource,
    *,
    url: str,
    api_key: str | None,
    printer: EventPrinter,
    preview: Preview | None = None,
    stream_id: str | None = None,
    score_threshold: float | None = None,
    reconnect: bool = False,
    jpeg_quality: int = 80,
) -> Summary:
    summary = Summary()
    stop = asyncio.Event()
    _install_sigint(stop)
    t0 = time.time()
    async with connect(
        url,
        api_key=api_key,
        input=source.input_kind,  # type: ignore[arg-type]
        fps=source.fps,
        stream_id=stream_id,
        score_threshold=score_threshold,
        reconnect=Reconnect() if reconnect else None,
    ) as stream:
        summary.ready = stream.ready
        if isinstance(source, ArraySource) and stream.ready is not None:
            source.frames_per_step = stream.ready.frames_per_step
        printer_task = asyncio.create_task(_print_events(stream, printer, summary))
        try:
            async for item in source.frames():
                if stop.is_set() or printer_task.done():
                    summary.interrupted = stop.is_set()
                    break
                timestamp = t0 + item.media_time
                if source.input_kind == "keypoints":
                    await stream.send_keypoints(item.data, timestamp)
                elif source.input_kind == "features":
                    await stream.send_features(item.data, timestamp)
                else:
                    await stream.send_image(item.data, timestamp, jpeg_quality=jpeg_quality)
                    if preview is not None and not preview.show(item.data, stream):  # GUI calls stay on one thread
                        summary.interrupted = True
                        break
            if not printer_task.done():
                summary.ended = await stream.end()
            await printer_task  # re-raises StreamClosed when the stream died
        finally:
            summary.frames_sent = stream.frames_sent
            summary.reconnects = stream.reconnects
            if not printer_task.done():
                printer_task.cancel()
            if preview is not None:
                preview.close()
    return summary


async def _print_events(stream: Stream, printer: EventPrinter, summary: Summary) -> None:
    async for event in stream:
        printer.event(event)
        if isinstance(event, GestureEvent) and event.type == "gesture_end":
            summary.ends[event.label] += 1
        elif isinstance(event, ErrorMessage):
            summary.errors += 1


def _install_sigint(stop: asyncio.Event) -> None:
    """First Ctrl-C ends the stream cleanly (final events still arrive); a second one aborts."""
    loop = asyncio.get_running_loop()

    def first() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # Windows, non-main threads
        loop.add_signal_handler(signal.SIGINT, first)


def print_summary(console: Console, summary: Summary, elapsed_s: float) -> None:
    table = Table(title="gestures (ended)", show_edge=False)
    table.add_column("label")
    table.add_column("count", justify="right")
    for label, count in summary.ends.most_common():
        table.add_row(label, str(count))
    if summary.ends:
        console.print(table)
    ended: Any = summary.ended
    totals = "no end message"
    if ended is not None:
        totals = f"{ended.frames_received} received, {ended.frames_processed} processed, "
        totals += f"{ended.frames_dropped} dropped"
    console.print(
        f"sent {summary.frames_sent} frames in {elapsed_s:.1f} s; server: {totals}; "
        f"{sum(summary.ends.values())} gestures, {summary.errors} errors"
        + (f", {summary.reconnects} reconnects" if summary.reconnects else "")
    )
