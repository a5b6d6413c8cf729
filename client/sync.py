"""Blocking wrapper over :mod:`client.streaming` for scripts and notebooks.

An event loop runs in a daemon thread; every call hands a coroutine to it and waits::

    with connect("http://127.0.0.1:8000", input="keypoints") as stream:
        for frame in keypoints:               # (T, 258) float32
            stream.send_keypoints(frame)
            for event in stream.poll():       # whatever arrived meanwhile, without blocking
                print(event)
        stream.end()
        for event in stream.events():         # the rest, up to the server's normal close
            print(event)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import numpy as np

from client.streaming import EndedMessage, Event, Stream
from client.streaming import connect as async_connect

T = TypeVar("T")


class _LoopThread:
    """One private event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="mgstream-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5.0)
        if not self.loop.is_running():
            self.loop.close()


class SyncStream:
    """The blocking twin of :class:`client.streaming.Stream` (same methods, no ``await``)."""

    def __init__(self, stream: Stream, runner: _LoopThread) -> None:
        self._stream = stream
        self._runner = runner

    # Read-only views of the live state (set by the reader task; plain attribute reads are safe).
    @property
    def stream(self) -> Stream:
        return self._stream

    @property
    def ready(self) -> Any:
        return self._stream.ready

    @property
    def status(self) -> Any:
        return self._stream.status

    @property
    def active(self) -> dict[int, Any]:
        return dict(self._stream.active)

    def send(self, payload: bytes, timestamp: float | None = None) -> int | None:
        return self._runner.run(self._stream.send(payload, timestamp))

    def send_jpeg(self, data: bytes, timestamp: float | None = None) -> int | None:
        return self._runner.run(self._stream.send_jpeg(data, timestamp))

    def send_png(self, data: bytes, timestamp: float | None = None) -> int | None:
        return self._runner.run(self._stream.send_png(data, timestamp))

    def send_image(self, bgr: np.ndarray, timestamp: float | None = None, *, jpeg_quality: int = 80) -> int | None:
        return self._runner.run(self._stream.send_image(bgr, timestamp, jpeg_quality=jpeg_quality))

    def send_keypoints(self, keypoints: np.ndarray, timestamp: float | None = None) -> int | None:
        return self._runner.run(self._stream.send_keypoints(keypoints, timestamp))

    def send_features(self, step: np.ndarray, timestamp: float | None = None) -> int | None:
        return self._runner.run(self._stream.send_features(step, timestamp))

    def poll(self) -> list[Event]:
        """Events received so far and not yet consumed; never blocks."""

        async def drain() -> list[Event]:
            return self._stream.pending_events()

        return self._runner.run(drain())

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Block for each next event until the stream ends; ``timeout`` bounds the wait for each one."""
        while True:
            event = self._runner.run(self._stream.next_event(timeout))
            if event is None:
                return
            yield event

    def end(self, timeout: float | None = None) -> EndedMessage | None:
        return self._runner.run(self._stream.end(timeout))

    def close(self) -> None:
        try:
            self._runner.run(self._stream.close(), timeout=10.0)
        finally:
            self._runner.stop()

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None and self._stream.connected and self._stream.ended is None:
                self.end()
        finally:
            self.close()


def connect(url: str, **options: Any) -> SyncStream:
    """Blocking :func:`client.streaming.connect`; same options, same exceptions."""
    runner = _LoopThread()

    async def open_stream() -> Stream:
        return await async_connect(url, **options)

    try:
        return SyncStream(runner.run(open_stream()), runner)
    except BaseException:
        runner.stop()
        raise
