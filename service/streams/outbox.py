"""A stream's bounded outbound queue, with a stated policy per message kind.

- ``status`` messages are merged: only the latest pending one is kept (a slow reader loses
  nothing it needs; counters are cumulative).
- final messages (gesture events, errors, ``end``) are never dropped. If ``max_finals`` of them are
  waiting, the reader is too slow to serve: :meth:`put_final` returns False and the session
  closes with 4429. Memory per stream therefore stays bounded.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Outgoing:
    text: str
    kind: str  # message type, for metrics
    frame_arrival: float | None = None  # monotonic arrival of the frame that led to it (latency metric)


class Outbox:
    def __init__(self, max_finals: int) -> None:
        self.max_finals = max_finals
        self._finals: deque[Outgoing] = deque()
        self._status: Outgoing | None = None
        self._ready = asyncio.Event()
        self.merged_status = 0

    def __len__(self) -> int:
        return len(self._finals) + (self._status is not None)

    def put_final(self, item: Outgoing) -> bool:
        if len(self._finals) >= self.max_finals:
            return False
        self._finals.append(item)
        self._ready.set()
        return True

    def put_status(self, item: Outgoing) -> None:
        if self._status is not None:
            self.merged_status += 1
        self._status = item
        self._ready.set()

    def pop_nowait(self) -> Outgoing | None:
        if self._finals:
            return self._finals.popleft()
        item, self._status = self._status, None
        return item

    async def get(self) -> Outgoing:
        while True:
            item = self.pop_nowait()
            if item is not None:
                return item
            self._ready.clear()
            await self._ready.wait()

    def clear(self) -> None:
        self._finals.clear()
        self._status = None
