"""Async client for the ``/v1/streams`` WebSocket.

It reuses the server's wire models (``service/api/protocol.py``), so both sides validate the same schema::

    async with connect("ws://127.0.0.1:8000", input="jpeg", fps=15) as stream:
        await stream.send_jpeg(jpeg_bytes)
        ...
        ended = await stream.end()          # flushes the last window; final events are queued
        async for event in stream:          # GestureEvent / StatusMessage / ErrorMessage / ...
            print(event)

A background reader task drains the socket all the time, so the server never sees this client as a slow
consumer, and ``stream.active`` / ``stream.status`` always hold the latest view (the preview window reads
them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from service.api.protocol import (
    CloseCode,
    EndedMessage,
    EndMessage,
    ErrorCode,
    ErrorMessage,
    GestureEvent,
    InputKind,
    ReadyMessage,
    StartMessage,
    StatusMessage,
    pack_frame,
    server_message_adapter,
)
from service.contract.features import KEYPOINT_DIM

STREAMS_PATH = "/v1/streams"
API_KEY_HEADER = "X-API-Key"

InputName = Literal["jpeg", "png", "keypoints", "features"]
ServerEvent = ReadyMessage | GestureEvent | StatusMessage | ErrorMessage | EndedMessage

# Closes after which a new session can succeed (server restart, overload, a lost network, session limits).
RETRYABLE_CLOSE_CODES = frozenset(
    {
        1001,  # going away (server shutdown)
        1006,  # no close frame: network drop or killed process
        CloseCode.INTERNAL_ERROR,
        1012,  # service restart
        CloseCode.OVERLOADED,
        CloseCode.SESSION_TOO_LONG,
        CloseCode.SLOW_CONSUMER,
    }
)
# A refusal before the upgrade only has an HTTP status; map it to the close code the server would send.
_HTTP_REFUSAL_CODES = {401: CloseCode.UNAUTHORIZED, 403: CloseCode.UNAUTHORIZED, 503: CloseCode.OVERLOADED}
# Errors that a new attempt with the same `start` cannot fix.
_FINAL_ERRORS = frozenset({ErrorCode.UNSUPPORTED, ErrorCode.BAD_MESSAGE, ErrorCode.UNAUTHORIZED})
# Queued status messages beyond this backlog are skipped (the latest is still in ``Stream.status``).
_STATUS_BACKLOG = 1000


class StreamError(Exception):
    """Base class of the client's errors."""


class StreamRefused(StreamError):
    """The server refused to open the stream (auth, overload, bad ``start``) or could not be reached."""

    def __init__(self, code: int | None, reason: str, http_status: int | None = None, error: str | None = None) -> None:
        self.code = code
        self.reason = reason
        self.http_status = http_status
        self.error = error  # the server's ErrorCode when it sent one (unsupported, unauthorized, ...)
        where = f" (HTTP {http_status})" if http_status is not None else f" (close code {code})" if code else ""
        super().__init__(f"stream refused{where}: {reason or 'no reason given'}")

    @property
    def retryable(self) -> bool:
        if self.code == CloseCode.UNAUTHORIZED or self.error in _FINAL_ERRORS:
            return False
        return self.code in RETRYABLE_CLOSE_CODES or self.code is None or (self.http_status or 0) >= 500


class StreamClosed(StreamError):
    """The stream closed before a normal end (server error, protocol violation, lost connection)."""

    def __init__(self, code: int | None, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"stream closed (code {code}): {reason or 'no reason given'}")


@dataclass(frozen=True)
class Reconnect:
    """Opt-in reconnection with exponential backoff. ``attempts=None`` retries forever."""

    attempts: int | None = 10
    initial_delay_s: float = 0.5
    max_delay_s: float = 10.0
    factor: float = 2.0
    jitter: float = 0.2

    def delays(self) -> Generator[float, None, None]:
        delay, n = self.initial_delay_s, 0
        while self.attempts is None or n < self.attempts:
            yield delay * (1.0 + random.uniform(-self.jitter, self.jitter))
            delay, n = min(delay * self.factor, self.max_delay_s), n + 1


@dataclass(frozen=True)
class Reconnected:
    """Client-side event: the connection dropped and a new server session was opened.

    Frame and step counters restart in the new session; ``lost`` are gestures that were open when the old
    session died (their ``gesture_end`` will never come).
    """

    attempt: int
    ready: ReadyMessage
    lost: list[GestureEvent] = field(default_factory=list)
    close_code: int | None = None
    type: Literal["reconnected"] = "reconnected"


Event = ServerEvent | Reconnected


def stream_url(url: str) -> str:
    """Accept ``ws(s)://``, ``http(s)://`` or ``host:port``; default the path to ``/v1/streams``."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r}")
    path = parts.path if parts.path not in ("", "/") else STREAMS_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def http_base_url(url: str) -> str:
    """The HTTP origin of a server URL given in any of the forms ``stream_url`` accepts."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


class _EndOfStream:
    pass


_EOF = _EndOfStream()


class Stream:
    """One live stream. Create it with :func:`connect`; it opens on ``await`` or ``async with``."""

    def __init__(
        self,
        url: str,
        start: StartMessage,
        *,
        api_key: str | None = None,
        reconnect: Reconnect | None = None,
        open_timeout_s: float = 10.0,
        end_timeout_s: float = 60.0,
    ) -> None:
        # A header, checked before the upgrade is accepted; unlike ``?api_key=`` (what browsers must use),
        # it stays out of URLs and access logs.
        self.url = stream_url(url)
        self._headers = {API_KEY_HEADER: api_key} if api_key else {}
        self.start_message = start
        self.reconnect = reconnect
        self.open_timeout_s = open_timeout_s
        self.end_timeout_s = end_timeout_s

        self.ready: ReadyMessage | None = None
        self.status: StatusMessage | None = None
        self.ended: EndedMessage | None = None
        self.active: dict[int, GestureEvent] = {}  # open gestures by event_id
        self.frames_sent = 0
        self.frames_dropped_local = 0  # frames offered while reconnecting
        self.reconnects = 0
        self.close_code: int | None = None
        self.close_reason = ""

        self._ws: ClientConnection | None = None
        self._seq = 0
        self._end_sent = False
        self._closing = False
        self._connected = asyncio.Event()
        self._queue: asyncio.Queue[Event | BaseException | _EndOfStream] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    # ---- opening ----

    async def open(self) -> Stream:
        if self.reconnect is None:
            await self._open_once()
        else:
            await self._open_with_retries(first=True)
        assert self.ready is not None
        self._queue.put_nowait(self.ready)  # events start with `ready`, as on the wire
        self._reader = asyncio.create_task(self._read_loop(), name="mgstream-reader")
        return self

    async def _open_once(self) -> None:
        """Upgrade, send ``start``, wait for ``ready``; anything else becomes :class:`StreamRefused`."""
        try:
            ws = await ws_connect(
                self.url, additional_headers=self._headers, open_timeout=self.open_timeout_s, max_size=2**22
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
            code = _HTTP_REFUSAL_CODES.get(status)
            raise StreamRefused(code, body or exc.response.reason_phrase, http_status=status) from exc
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
            raise StreamRefused(None, f"cannot connect to {self.url}: {exc}") from exc

        error: ErrorMessage | None = None
        try:
            await ws.send(self.start_message.model_dump_json(exclude_none=True))
            while True:
                message = _parse(await asyncio.wait_for(ws.recv(), self.open_timeout_s))
                if isinstance(message, ReadyMessage):
                    break
                if isinstance(message, ErrorMessage):
                    error = message
                    if not message.fatal:  # the server rejected this `start` (e.g. an input kind it lacks)
                        await ws.close()
                        raise StreamRefused(None, message.message, error=message.code)
        except ConnectionClosed as exc:  # a fatal error (overload, auth) comes with its close code
            code, reason = _close_info(exc)
            raise StreamRefused(
                code, error.message if error and not reason else reason, error=error.code if error else None
            ) from exc
        except asyncio.TimeoutError as exc:
            await ws.close()
            raise StreamRefused(None, f"no 'ready' within {self.open_timeout_s:.0f} s") from exc
        self._ws, self.ready = ws, message
        self._seq, self._end_sent = 0, False
        self._connected.set()

    async def _open_with_retries(self, *, first: bool) -> int:
        assert self.reconnect is not None
        last: StreamRefused | None = None
        attempt = 0
        if first:  # the first try is immediate
            try:
                await self._open_once()
                return 0
            except StreamRefused as exc:
                if not exc.retryable:
                    raise
                last = exc
        for attempt, delay in enumerate(self.reconnect.delays(), start=1):
            await asyncio.sleep(delay)
            if self._closing:
                break
            try:
                await self._open_once()
                return attempt
            except StreamRefused as exc:
                if not exc.retryable:
                    raise
                last = exc
        raise last or StreamRefused(None, "gave up reconnecting")

    # ---- reading ----

    async def _read_loop(self) -> None:
        try:
            while True:
                ws = self._ws
                assert ws is not None
                try:
                    async for raw in ws:
                        self._dispatch(_parse(raw))
                    code, reason = _close_info_ws(ws)
                except ConnectionClosed as exc:
                    code, reason = _close_info(exc)
                self.close_code, self.close_reason = code, reason
                if not self._should_reconnect(code):
                    break
                self._connected.clear()
                lost = list(self.active.values())
                self.active.clear()
                try:
                    attempt = await self._open_with_retries(first=False)
                except StreamRefused as exc:
                    self._queue.put_nowait(StreamClosed(exc.code, f"reconnect failed: {exc.reason}"))
                    return
                self.reconnects += 1
                assert self.ready is not None
                self._queue.put_nowait(Reconnected(attempt, self.ready, lost, code))
            if self.ended is None and not self._closing and code != CloseCode.NORMAL:
                self._queue.put_nowait(StreamClosed(code, reason))
        except Exception as exc:  # a bad server message must surface to the caller, not vanish in a task
            self._queue.put_nowait(exc)
            if self._ws is not None:
                await self._ws.close(1002, "unexpected message")
        finally:
            self._connected.clear()
            self._queue.put_nowait(_EOF)

    def _should_reconnect(self, code: int | None) -> bool:
        return (
            self.reconnect is not None
            and not self._closing
            and not self._end_sent
            and (code is None or code in RETRYABLE_CLOSE_CODES)
        )

    def _dispatch(self, message: ServerEvent) -> None:
        if isinstance(message, GestureEvent):
            if message.type == "gesture_start":
                self.active[message.event_id] = message
            else:
                self.active.pop(message.event_id, None)
        elif isinstance(message, StatusMessage):
            self.status = message
            if self._queue.qsize() > _STATUS_BACKLOG:
                return
        elif isinstance(message, EndedMessage):
            self.ended = message
        self._queue.put_nowait(message)

    # ---- sending ----

    @property
    def input(self) -> str:
        return self.start_message.input

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def send(self, payload: bytes, timestamp: float | None = None, frames: int = 1) -> int | None:
        """Send one media message (header + payload) holding ``frames`` frames. Returns the seq of its
        first frame, or None when dropped while reconnecting (live semantics: stale frames are worth
        nothing after a reconnect)."""
        if self._end_sent or self._closing:
            raise StreamError("stream already ended")
        if not self._connected.is_set():
            if self.reconnect is not None and self._reader is not None and not self._reader.done():
                self.frames_dropped_local += frames
                return None
            raise StreamClosed(self.close_code, self.close_reason or "not connected")
        seq = self._seq
        ws = self._ws
        assert ws is not None
        try:
            await ws.send(pack_frame(seq, time.time() if timestamp is None else timestamp, payload, frames))
        except ConnectionClosed as exc:
            if self.reconnect is not None:
                self.frames_dropped_local += frames
                return None
            code, reason = _close_info(exc)
            raise StreamClosed(code, reason) from exc
        self._seq += frames
        self.frames_sent += frames
        return seq

    def _require(self, *kinds: str) -> None:
        if self.input not in kinds:
            raise ValueError(f"this stream was started with input={self.input!r}, not {' / '.join(kinds)}")

    async def send_jpeg(self, data: bytes, timestamp: float | None = None) -> int | None:
        self._require(InputKind.JPEG)
        return await self.send(data, timestamp)

    async def send_png(self, data: bytes, timestamp: float | None = None) -> int | None:
        self._require(InputKind.PNG)
        return await self.send(data, timestamp)

    async def send_image(
        self, bgr: np.ndarray, timestamp: float | None = None, *, jpeg_quality: int = 80
    ) -> int | None:
        """Encode an OpenCV BGR image as the stream's image kind (jpeg or png) and send it."""
        self._require(InputKind.JPEG, InputKind.PNG)
        return await self.send(encode_image(bgr, self.input, jpeg_quality), timestamp)

    async def send_keypoints(self, keypoints: np.ndarray, timestamp: float | None = None) -> int | None:
        """Canonical keypoint frames: float32[258] for one, (n, 258) for n in one message (NaN =
        undetected). Sending a step's frames (``frames_per_step`` in ``ready``) together adds no
        latency: the server scores a step only once its last frame is in."""
        self._require(InputKind.KEYPOINTS)
        dim = self.ready.keypoint_dim if self.ready else KEYPOINT_DIM
        payload, frames = _as_rows(keypoints, dim, "keypoints")
        return await self.send(payload, timestamp, frames)

    async def send_features(self, steps: np.ndarray, timestamp: float | None = None) -> int | None:
        """Feature steps: float32[feature_dim] from the ``ready`` message, or (n, feature_dim)."""
        self._require(InputKind.FEATURES)
        assert self.ready is not None
        payload, frames = _as_rows(steps, self.ready.feature_dim, "features")
        return await self.send(payload, timestamp, frames)

    # ---- events and ending ----

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def events(self) -> AsyncIterator[Event]:
        """Every server message in order, then stop after the server's normal close.

        Raises :class:`StreamClosed` where the stream died (after the events received before it)."""
        while True:
            item = await self._queue.get()
            if isinstance(item, _EndOfStream | BaseException):
                self._queue.put_nowait(item)  # later iterations end (or raise) the same way
                if isinstance(item, BaseException):
                    raise item
                return
            yield item

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None at the end of the stream; TimeoutError after ``timeout`` seconds."""
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if isinstance(item, _EndOfStream | BaseException):
            self._queue.put_nowait(item)
            if isinstance(item, BaseException):
                raise item
            return None
        return item

    def pending_events(self) -> list[Event]:
        """Events already received and not yet consumed, without waiting (for polling loops)."""
        out: list[Event] = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, _EndOfStream | BaseException):
                self._queue.put_nowait(item)
                if isinstance(item, BaseException) and not out:
                    raise item
                break
            out.append(item)
        return out

    async def end(self, timeout: float | None = None) -> EndedMessage | None:
        """Send ``end``, wait until the server sent its final events and closed; return its totals.

        The final events stay queued for :meth:`events`."""
        if not self._end_sent and not self._closing and self._connected.is_set():
            self._end_sent = True
            assert self._ws is not None
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(EndMessage().model_dump_json())
        self._end_sent = True
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout or self.end_timeout_s)
        return self.ended

    async def close(self) -> None:
        """Drop the connection now, without waiting for final events."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5.0)

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None and not self._end_sent and self._connected.is_set():
                await self.end()
        finally:
            await self.close()


class _Connect:
    """``await connect(...)`` returns an open :class:`Stream`; ``async with connect(...)`` also ends it."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    def __await__(self) -> Generator[Any, None, Stream]:
        return self._stream.open().__await__()

    async def __aenter__(self) -> Stream:
        return await self._stream.open()

    async def __aexit__(self, *exc: Any) -> None:
        await self._stream.__aexit__(*exc)


def connect(
    url: str,
    *,
    api_key: str | None = None,
    input: InputName = "jpeg",
    fps: float = 30.0,
    stream_id: str | None = None,
    score_threshold: float | None = None,
    classes: Sequence[int] | None = None,
    status_every_s: float = 1.0,
    reconnect: Reconnect | bool | None = None,
    open_timeout_s: float = 10.0,
) -> _Connect:
    """Open a live stream. ``url`` may be ``ws://host:port``, ``http://host:port`` or the full stream URL.

    Raises :class:`StreamRefused` (``.code`` 1013 overloaded, 4401 unauthorized, ...) when the server says no.
    ``reconnect=True`` (or a :class:`Reconnect`) reopens a new session after a drop or a server restart."""
    start = StartMessage(
        input=input,
        fps=fps,
        stream_id=stream_id,
        score_threshold=score_threshold,
        classes=list(classes) if classes is not None else None,
        status_every_s=status_every_s,
    )
    policy = Reconnect() if reconnect is True else (reconnect or None)
    return _Connect(Stream(url, start, api_key=api_key, reconnect=policy, open_timeout_s=open_timeout_s))


# ---- helpers ----


def encode_image(bgr: np.ndarray, kind: str = "jpeg", jpeg_quality: int = 80) -> bytes:
    import cv2  # only image streams need OpenCV

    ext, params = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]) if kind == "jpeg" else (".png", [])
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {bgr.shape} image as {kind}")
    return buf.tobytes()


def _as_rows(values: np.ndarray, dim: int, what: str) -> tuple[bytes, int]:
    """(dim,) or (n, dim) values -> little-endian float32 bytes and n."""
    arr = np.asarray(values, dtype="<f4")
    if arr.ndim not in (1, 2) or arr.shape[-1] != dim or arr.size == 0:
        raise ValueError(f"{what} must have shape ({dim},) or (n, {dim}), got {arr.shape}")
    return arr.tobytes(), 1 if arr.ndim == 1 else arr.shape[0]


def _parse(raw: str | bytes) -> ServerEvent:
    if isinstance(raw, bytes):
        raise StreamError("the server sent a binary message; the protocol has none")
    try:
        return server_message_adapter.validate_json(raw)
    except ValidationError as exc:
        kind = _peek_type(raw)
        raise StreamError(f"unexpected server message (type {kind!r}): {exc.errors()[0]['msg']}") from exc


def _peek_type(raw: str) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(raw).get("type")
    return None


def _close_info(exc: ConnectionClosed) -> tuple[int | None, str]:
    return _frame_info(exc.rcvd)


def _close_info_ws(ws: ClientConnection) -> tuple[int | None, str]:
    return _frame_info(ws.protocol.close_rcvd)


def _frame_info(frame: Any) -> tuple[int | None, str]:
    if frame is None:
        return 1006, "connection lost without a close frame"
    return frame.code, frame.reason
