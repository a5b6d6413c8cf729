"""Coalesce the keypoint → step transform across streams: one numpy call per event-loop turn.

The transform costs mostly per call (a few dozen operations on arrays of a handful of frames), and
under load many streams complete a step in the same turn of the event loop. Each of them submits
its completed steps' frames here and awaits; the first submission schedules one flush at the end of
the current turn, which transforms everything submitted meanwhile in a single call and hands each
stream its rows. It runs on the event loop itself (a thread hop would cost more than the transform),
and the rows are bitwise what a per-stream call gives (every step depends on its own frames only).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]  # (k * rows_per_step, ...) rows -> (k, D) steps


class TransformCoalescer:
    def __init__(self, transform: Transform, on_flush: Callable[[int], None] | None = None) -> None:
        self.transform = transform
        self.on_flush = on_flush  # called with the number of streams served by each transform call
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self.calls = 0  # transform calls made
        self.submitted = 0  # submissions served (submitted / calls = mean coalesced streams per call)

    def submit(self, frames: np.ndarray) -> asyncio.Future:
        """Queue whole steps' frames; the future resolves to their (k, D) steps at the end of this turn."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((frames, future))
        return future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        live = [(frames, future) for frames, future in pending if not future.cancelled()]
        if not live:
            return
        self.calls += 1
        self.submitted += len(live)
        if self.on_flush is not None:
            self.on_flush(len(live))
        try:
            if len(live) == 1:
                parts = [self.transform(live[0][0])]
            else:
                rows = np.concatenate([frames for frames, _ in live])
                steps = self.transform(rows)
                per_step = len(rows) // len(steps)  # every submission holds whole steps
                parts = np.split(steps, np.cumsum([len(frames) // per_step for frames, _ in live])[:-1])
        except Exception as exc:  # noqa: BLE001 - every waiting stream gets the error
            for _, future in live:
                future.set_exception(exc)
            return
        for (_, future), part in zip(live, parts, strict=True):
            future.set_result(part)
