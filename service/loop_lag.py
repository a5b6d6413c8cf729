"""Event-loop lag: how late a periodic timer fires.

Everything per message runs on the server's one event loop, so its lag is the first sign of an
overloaded or blocked loop, and it tells a latency spike caused on the loop from one caused
elsewhere (the inference thread, the OS). Exported as ``mgstream_event_loop_lag_seconds``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LAG_INTERVAL_S = 0.1


async def watch_loop_lag(observe: Callable[[float], None], interval_s: float = LAG_INTERVAL_S) -> None:
    """Sleep ``interval_s`` again and again; ``observe`` how many seconds each wake-up came late."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - due))
