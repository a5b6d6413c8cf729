"""The event-loop lag watcher reports a blocked loop, and little lag on an idle one."""

from __future__ import annotations

import asyncio
import time

from service.loop_lag import watch_loop_lag


def test_a_blocked_loop_shows_as_lag() -> None:
    async def main() -> list[float]:
        lags: list[float] = []
        watcher = asyncio.create_task(watch_loop_lag(lags.append, interval_s=0.02))
        await asyncio.sleep(0.1)  # idle: the timer fires about on time
        time.sleep(0.3)  # a handler that blocks the loop
        await asyncio.sleep(0.1)
        watcher.cancel()
        return lags

    lags = asyncio.run(main())
    assert len(lags) >= 4
    assert max(lags) >= 0.25  # the wake-up due during the block came at least that late
    assert min(lags) < 0.05 and all(lag >= 0 for lag in lags)
