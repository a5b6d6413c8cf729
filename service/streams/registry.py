"""Admission, lookup and reaping of streaming sessions.

Admission happens before the WebSocket is accepted: past ``max_sessions`` (or while shutting
down) :meth:`admit` returns None and the handler answers 1013 / 1001 without building anything.
The reaper closes sessions past their idle or maximum-duration deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time

from service.api.protocol import CloseCode
from service.metrics import Metrics
from service.streams.session import StreamSession

log = logging.getLogger(__name__)


class SessionRegistry:
    def __init__(self, *, max_sessions: int, metrics: Metrics | None = None, session_defaults: dict) -> None:
        self.max_sessions = max_sessions
        self.metrics = metrics
        self._defaults = session_defaults  # StreamSession keyword arguments (queue sizes, deadlines)
        self._sessions: dict[str, StreamSession] = {}
        self._empty = asyncio.Event()
        self._empty.set()
        self.admitting = True
        self._reaper: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[StreamSession]:
        return list(self._sessions.values())

    def get(self, key: str) -> StreamSession | None:
        return self._sessions.get(key)

    def admit(self) -> StreamSession | None:
        """A new session, or None when full or shutting down (the caller reports why)."""
        if not self.admitting or len(self._sessions) >= self.max_sessions:
            return None
        session = StreamSession(**self._defaults)
        self._sessions[session.key] = session
        self._empty.clear()
        self._gauge()
        return session

    def remove(self, session: StreamSession) -> None:
        """Forget a session and free its buffers. Idempotent."""
        if self._sessions.pop(session.key, None) is not None:
            session.release()
            self._gauge()
        if not self._sessions:
            self._empty.set()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.sessions_active.set(len(self._sessions))

    # ---------------------------------------------------------- reaper

    def start_reaper(self, interval_s: float) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever(interval_s), name="reaper")

    def reap(self, now: float | None = None) -> int:
        """Ask every expired session to close; returns how many."""
        now = time.monotonic() if now is None else now
        count = 0
        for session in self.sessions():
            expired = session.expired(now)
            if expired is not None and session.close_request is None:
                log.info("closing stream %s: %s", session.stream_id, expired.reason)
                session.request_close(expired.code, expired.reason)
                count += 1
        return count

    async def _reap_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)  # a periodic timer, not a work queue poll
            self.reap()

    # ---------------------------------------------------------- shutdown

    async def close_all(
        self, code: int = CloseCode.SHUTDOWN, reason: str = "server shutting down", timeout: float = 5.0
    ) -> bool:
        """Stop admitting, ask every session to close, wait until they are gone; True if all left in time."""
        self.admitting = False
        for session in self.sessions():
            session.request_close(code, reason)
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning("%d sessions still open after %.1f s", len(self._sessions), timeout)
            return False

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
