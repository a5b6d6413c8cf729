"""WebSocket ``/v1/streams``: admission, start/ready, binary frames in, gesture events out.

One connection runs four tasks that share only its :class:`StreamSession`:

- receiver: reads messages, answers bad ones with ``error`` (the stream goes on), queues frames
  (a keypoint or feature message may carry several; live policy: the oldest frames are dropped
  when the inbound queue is full);
- worker: featurizes frames (blocking featurizers in the worker pool), appends steps to the ring,
  and at every hop submits the window to the scheduler and awaits it (one request in flight);
  the tracker's events go to the outbox;
- sender: writes the outbox (statuses merged, finals never dropped, 4429 on overflow);
- status: puts a ``status`` message every ``status_every_s``.

The handler waits until one of them ends the stream or a close is requested (end of stream,
reaper, shutdown, protocol violation), then closes with the code from :class:`CloseCode`.
docs/protocol.md documents every message and code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from service.api.deps import auth_required, key_is_valid, presented_key
from service.api.protocol import (
    CloseCode,
    EndedMessage,
    EndMessage,
    ErrorCode,
    ErrorMessage,
    ReadyMessage,
    StartMessage,
    client_message_adapter,
    unpack_header,
)
from service.batching.scheduler import SchedulerClosed
from service.contract.model_card import OFFSETS_OUTPUT, SCORES_OUTPUT, WINDOW_INPUT
from service.detection.events import StreamDetector
from service.detection.step_events import StepStream
from service.features.base import FrameError, UnsupportedInput
from service.features.factory import create_featurizer
from service.log_config import stream_id_var
from service.runtime.base import InferenceFailed, RuntimeDead
from service.streams.outbox import Outgoing
from service.streams.session import InboundFrame, StreamSession

log = logging.getLogger("mgstream.streams")

router = APIRouter()

# Error codes sent with a fatal `error` just before the matching close code.
_FATAL_ERRORS = {
    CloseCode.PROTOCOL_VIOLATION: ErrorCode.BAD_MESSAGE,
    CloseCode.INTERNAL_ERROR: ErrorCode.INTERNAL,
    CloseCode.OVERLOADED: ErrorCode.OVERLOADED,
    CloseCode.UNAUTHORIZED: ErrorCode.UNAUTHORIZED,
    CloseCode.SHUTDOWN: ErrorCode.INTERNAL,
    CloseCode.IDLE_TIMEOUT: ErrorCode.BAD_MESSAGE,
    CloseCode.SESSION_TOO_LONG: ErrorCode.BAD_MESSAGE,
}
_END_GRACE_S = 10.0  # after `end`, time the client gets to read its last events
_CLOSE_GRACE_S = 1.0  # other closes: time to deliver the fatal error message


class ClientGone(Exception):
    """The peer disconnected."""


async def _refuse(ws: WebSocket, code: int, error: str, reason: str) -> None:
    """Refusal decided before the session exists: accept only to deliver a readable code and reason."""
    await ws.accept()
    with contextlib.suppress(Exception):
        await ws.send_text(ErrorMessage(code=error, message=reason, fatal=True).model_dump_json())
        await ws.close(code, reason)


@router.websocket("/v1/streams")
async def streams(ws: WebSocket) -> None:
    state = ws.app.state
    settings, metrics, registry = state.settings, state.metrics, state.registry
    if not state.ready:
        shutting = state.shutting_down
        metrics.rejections.labels(reason="not_ready").inc()
        await _refuse(
            ws,
            CloseCode.SHUTDOWN if shutting else CloseCode.OVERLOADED,
            ErrorCode.OVERLOADED,
            "server shutting down" if shutting else "server starting",
        )
        return
    authenticated = not auth_required(settings)
    key = presented_key(ws)
    if not authenticated and key is not None:
        if not key_is_valid(key, settings):
            metrics.rejections.labels(reason="unauthorized").inc()
            await _refuse(ws, CloseCode.UNAUTHORIZED, ErrorCode.UNAUTHORIZED, "invalid API key")
            return
        authenticated = True
    session = registry.admit()
    if session is None:
        metrics.rejections.labels(reason="overloaded").inc()
        reason = f"server at capacity ({settings.max_sessions} streams); retry later"
        await _refuse(ws, CloseCode.OVERLOADED, ErrorCode.OVERLOADED, reason)
        return
    session.authenticated = authenticated
    token = stream_id_var.set(session.stream_id)
    try:
        await ws.accept()
        await StreamHandler(ws, session, state).run()
    finally:
        registry.remove(session)
        stream_id_var.reset(token)


class StreamHandler:
    def __init__(self, ws: WebSocket, session: StreamSession, state) -> None:  # noqa: ANN001 - app.state
        self.ws = ws
        self.session = session
        self.state = state
        self.settings = state.settings
        self.metrics = state.metrics
        self.card = state.runtime.card
        self.scheduler = state.scheduler
        self.step_scheduler = getattr(state, "step_scheduler", None)  # step mode when set
        self.pool = state.featurizer_pool
        self.started = asyncio.Event()
        self.gone = False

    # ---------------------------------------------------------------- orchestration

    async def run(self) -> None:
        s = self.session
        tasks = {
            asyncio.create_task(self._receiver(), name="receiver"),
            asyncio.create_task(self._worker(), name="worker"),
            asyncio.create_task(self._status(), name="status"),
        }
        sender = asyncio.create_task(self._sender(), name="sender")
        closer = asyncio.create_task(s.close_requested.wait(), name="closer")
        alive = {*tasks, sender, closer}
        try:
            while not s.close_requested.is_set() and not self.gone:
                done, alive = await asyncio.wait(alive, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is closer or task.cancelled():
                        continue
                    exc = task.exception()
                    if isinstance(exc, (ClientGone, WebSocketDisconnect)):
                        self.gone = True
                    elif exc is not None:
                        log.error("stream task %s failed", task.get_name(), exc_info=exc)
                        self.metrics.errors.labels(kind="internal").inc()
                        s.request_close(CloseCode.INTERNAL_ERROR, "internal error")
                    elif task is sender:  # the sender returns after writing `end`
                        s.request_close(CloseCode.NORMAL, "end of stream")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not self.gone:
                await self._close(sender)
        finally:
            for task in (*tasks, sender, closer):
                task.cancel()
            await asyncio.gather(*tasks, sender, closer, return_exceptions=True)
            if s.featurizer is not None:
                with contextlib.suppress(Exception):
                    await self.pool.release(s.featurizer)
            c = s.counters
            log.info(
                "stream %s ended (%s): %d frames received, %d processed, %d dropped, %d windows, %d events, "
                "%d bad messages, %.1f s",
                s.stream_id,
                "client gone"
                if self.gone
                else f"{s.close_request.code} {s.close_request.reason}"
                if s.close_request
                else "?",
                c.frames_received,
                c.frames_processed,
                c.frames_dropped,
                c.windows,
                c.events,
                c.bad_messages,
                time.monotonic() - s.started_at,
            )

    async def _close(self, sender: asyncio.Task) -> None:
        request = self.session.close_request
        code, reason = (request.code, request.reason) if request else (CloseCode.INTERNAL_ERROR, "internal error")
        if code == CloseCode.NORMAL:
            grace = _END_GRACE_S
        else:
            grace = _CLOSE_GRACE_S
            if code != CloseCode.SLOW_CONSUMER:
                error = _FATAL_ERRORS.get(code, ErrorCode.INTERNAL)
                self._final(
                    ErrorMessage(stream_id=self.session.stream_id, code=error, message=reason, fatal=True),
                    force=True,
                )
        if code != CloseCode.SLOW_CONSUMER and not sender.done():
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(self._drained(), grace)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, reason[:120]), 5.0)

    async def _drained(self) -> None:
        while len(self.session.outbox):
            await asyncio.sleep(0.01)  # close path only: bounded by the grace timeout

    # ---------------------------------------------------------------- outbound

    def _final(self, message, arrival: float | None = None, force: bool = False) -> None:  # noqa: ANN001
        """Queue a message that must not be dropped; an overflowing outbox closes the stream with 4429.

        ``force`` (the fatal error before a close) skips that rule: the close is already under way.
        """
        if message.type in ("gesture_start", "gesture_end"):
            self.session.counters.events += 1
        queued = self.session.outbox.put_final(Outgoing(message.model_dump_json(), message.type, arrival))
        if not queued and not force and self.session.close_request is None:
            self.metrics.errors.labels(kind="slow_consumer").inc()
            self.session.request_close(CloseCode.SLOW_CONSUMER, "client does not read its events")

    def _bad(self, code: str, message: str, seq: int | None = None) -> None:
        """A bad message: report it, count it, and close with 1008 past ``max_bad_messages``."""
        s = self.session
        s.counters.bad_messages += 1
        self.metrics.errors.labels(kind=code).inc()
        self._final(
            ErrorMessage(stream_id=s.stream_id if s.started else None, code=code, message=message[:500], seq=seq)
        )
        if s.counters.bad_messages >= self.settings.max_bad_messages:
            s.request_close(CloseCode.PROTOCOL_VIOLATION, f"{s.counters.bad_messages} bad messages")

    async def _sender(self) -> None:
        outbox, metrics = self.session.outbox, self.metrics
        while True:
            item = await outbox.get()
            try:
                await self.ws.send_text(item.text)
            except (WebSocketDisconnect, RuntimeError, OSError) as exc:
                raise ClientGone() from exc
            if item.kind in ("gesture_start", "gesture_end"):
                metrics.events.labels(type=item.kind).inc()
                if item.frame_arrival is not None:
                    metrics.frame_to_event.observe(time.monotonic() - item.frame_arrival)
            if item.kind == "end":
                return

    async def _status(self) -> None:
        await self.started.wait()
        interval = max(self.session.config.status_every_s, self.settings.status_interval_s)
        while True:
            await asyncio.sleep(interval)  # a timer: one merged status per interval
            self.session.outbox.put_status(Outgoing(self.session.status().model_dump_json(), "status"))

    # ---------------------------------------------------------------- inbound

    async def _receiver(self) -> None:
        s, limit = self.session, self.settings.max_message_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                raise ClientGone()
            if s.close_request is not None:
                return  # closing: the handler takes over
            s.touch()
            data, text = message.get("bytes"), message.get("text")
            size = len(data) if data is not None else len(text or "")
            if size > limit:
                self._bad(ErrorCode.TOO_BIG, f"message of {size} bytes exceeds max_message_bytes={limit}")
                continue
            if data is not None:
                self._on_binary(data)
            elif text is not None and await self._on_text(text):
                return  # `end`: the worker flushes and finishes; nothing more is read

    def _on_binary(self, data: bytes) -> None:
        s = self.session
        if not s.started:
            self._bad(ErrorCode.NOT_STARTED, "binary frame before `start`; send a start message first")
            return
        try:
            seq, timestamp, frames, payload = unpack_header(data)
        except ValueError as exc:
            self._bad(ErrorCode.BAD_HEADER, str(exc))
            return
        if frames > s.featurizer.max_frames_per_message:  # started, so featurizer and config are set
            message = f"the header says {frames} frames; {s.config.input} messages carry one"
            self._bad(ErrorCode.BAD_HEADER, message, seq=seq)
            return
        self.metrics.frames.inc(frames)
        dropped = s.push_frame(InboundFrame(seq, timestamp, bytes(payload), time.monotonic(), frames))
        if dropped:
            self.metrics.frames_dropped.labels(reason="lag").inc(dropped)

    async def _on_text(self, text: str) -> bool:
        """Handle one JSON message; True once the client sent `end`."""
        try:
            message = client_message_adapter.validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0] if exc.errors() else {"msg": str(exc), "loc": ()}
            where = ".".join(str(p) for p in first.get("loc", ())) or "message"
            self._bad(ErrorCode.BAD_MESSAGE, f"invalid message ({where}): {first['msg']}")
            return False
        if isinstance(message, EndMessage):
            if not self.session.started:
                self._bad(ErrorCode.NOT_STARTED, "`end` before `start`")
                return False
            self.session.mark_ended()
            return True
        await self._on_start(message)
        return False

    async def _on_start(self, start: StartMessage) -> None:
        s = self.session
        if s.started:
            self._bad(ErrorCode.ALREADY_STARTED, "the stream is already started; `start` is sent once")
            return
        if not s.authenticated:
            if not key_is_valid(start.api_key, self.settings):
                self.metrics.rejections.labels(reason="unauthorized").inc()
                s.request_close(CloseCode.UNAUTHORIZED, "missing or invalid API key")
                return
            s.authenticated = True
        if start.classes and any(not 1 <= c <= self.card.num_classes for c in start.classes):
            self._bad(ErrorCode.BAD_MESSAGE, f"classes must be ids in 1..{self.card.num_classes}")
            return
        serving = self.state.serving
        if start.input not in serving.input_kinds:
            self._bad(ErrorCode.UNSUPPORTED, f"this model takes {', '.join(serving.input_kinds)}, not {start.input}")
            return
        try:
            # Building a featurizer may load graphs (MediaPipe): off the event loop.
            featurizer = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: create_featurizer(start.input, self.card, self.settings, clip_batcher=self.state.clip_batcher),
            )
        except UnsupportedInput as exc:
            self._bad(ErrorCode.UNSUPPORTED, str(exc))
            return
        detector = StreamDetector(
            self.card,
            hop_steps=serving.hop_steps,
            score_threshold=start.score_threshold,
            classes=start.classes,
            fps=start.fps,
        )
        s.configure(start, featurizer, detector)
        if self.step_scheduler is not None:
            s.step = StepStream(
                self.card,
                self.step_scheduler.runtime.layout,
                hop_steps=serving.hop_steps,
                score_threshold=start.score_threshold,
                classes=start.classes,
                fps=start.fps,
            )
        stream_id_var.set(s.stream_id)
        self._final(
            ReadyMessage(
                stream_id=s.stream_id,
                model=self.card.name,
                model_version=self.card.version,
                input=start.input,
                fps=start.fps,
                frames_per_step=self.card.feature.frames_per_step,
                window_steps=detector.window_steps,
                hop_steps=detector.hop_steps,
                mode="step" if s.step is not None else "window",
                feature_dim=self.card.feature.feature_dim,
                keypoint_dim=self.card.feature.keypoint_dim,
                classes=list(self.card.classes),
                max_message_bytes=self.settings.max_message_bytes,
            )
        )
        log.info(
            "stream %s started: input=%s fps=%g window=%d hop=%d",
            s.stream_id,
            start.input,
            start.fps,
            detector.window_steps,
            detector.hop_steps,
        )
        self.started.set()

    # ---------------------------------------------------------------- processing

    async def _worker(self) -> None:
        s = self.session
        await self.started.wait()
        featurizer = s.featurizer
        while (frame := await s.next_frame()) is not None:
            started = time.perf_counter()
            try:
                steps = await self.pool.push(featurizer, frame.payload, frame.frames)
            except FrameError as exc:
                self._bad(ErrorCode.BAD_FRAME, str(exc), seq=frame.seq)
                continue
            except UnsupportedInput as exc:
                self._bad(ErrorCode.UNSUPPORTED, str(exc), seq=frame.seq)
                continue
            self.metrics.featurize.observe(time.perf_counter() - started)
            s.counters.frames_processed += frame.frames
            for step in steps:
                if not await self._append(step, frame.arrival):
                    return
        # End of stream: pending steps, the last partial hop, then close every open gesture.
        arrival = time.monotonic()
        for step in await self.pool.finish(featurizer):
            if not await self._append(step, arrival):
                return
        n = s.ring.total
        final = n > s.step.steps_in if s.step is not None else s.detector.needs_final(n)
        if final and not await self._score(n, arrival):
            return
        for event in s.step.finish(n) if s.step is not None else s.detector.finish(n):
            self._final(event.to_message(s.stream_id), arrival)
        c = s.counters
        self._final(
            EndedMessage(
                stream_id=s.stream_id,
                frames_received=c.frames_received,
                frames_processed=c.frames_processed,
                frames_dropped=c.frames_dropped,
                events=c.events,
            )
        )

    async def _append(self, step, arrival: float) -> bool:  # noqa: ANN001 - (D,) array
        s = self.session
        try:
            s.ring.append(step)
        except ValueError as exc:
            self._bad(ErrorCode.BAD_FRAME, str(exc))
            return True
        n = s.ring.total
        due = n % s.step.chunk == 0 if s.step is not None else s.detector.is_due(n)
        if due:
            return await self._score(n, arrival)
        return True

    async def _score(self, n: int, arrival: float) -> bool:
        """Score the window ending at step ``n`` (step mode: run the chunk ending there); False when the
        stream cannot go on."""
        s = self.session
        try:
            events = []
            if s.step is not None:  # every chunk not yet fed (one, unless a failed call left a gap)
                while s.step.steps_in < n:
                    chunk, real = s.step.next_chunk(s.ring)
                    out = await self.step_scheduler.submit(s.key, s.step.request(chunk))
                    for event in s.step.consume(out, real):
                        self._final(event.to_message(s.stream_id), arrival)
            else:
                out = await self.scheduler.submit(s.key, {WINDOW_INPUT: s.ring.last(s.detector.window_steps)})
        except InferenceFailed as exc:
            self.metrics.errors.labels(kind="inference_failed").inc()
            self._final(
                ErrorMessage(
                    stream_id=s.stream_id,
                    code=ErrorCode.INFERENCE_FAILED,
                    message=f"inference for the steps ending at {n} failed: {exc}",
                )
            )
            return True
        except RuntimeDead:
            s.request_close(CloseCode.INTERNAL_ERROR, "model runtime failed; the server restarts")
            return False
        except SchedulerClosed:
            s.request_close(CloseCode.SHUTDOWN, "server shutting down")
            return False
        s.counters.windows += 1
        if s.step is None:
            events = s.detector.update(n, out[SCORES_OUTPUT], out[OFFSETS_OUTPUT])
        for event in events:
            self._final(event.to_message(s.stream_id), arrival)
        return True
