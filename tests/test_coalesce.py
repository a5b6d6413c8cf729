"""Cross-stream coalescing of the keypoint transform: one call per event-loop turn, every stream gets
exactly the steps it would get alone, in order, and failures or cancellations stay contained."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.contract.features import KEYPOINT_DIM, keypoints_to_steps
from service.features.coalesce import TransformCoalescer
from service.features.passthrough import KeypointPassthrough
from service.features.pool import FeaturizerPool


def _keypoints(seed: int, frames: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kp = rng.uniform(0.2, 0.8, (frames, KEYPOINT_DIM)).astype(np.float32)
    kp[::5, 132:195] = np.nan  # a hand missing now and then
    return kp


def test_streams_in_one_turn_share_one_call_and_get_their_own_steps() -> None:
    served: list[int] = []
    pool = FeaturizerPool(1, on_coalesced=served.append)
    streams = [(KeypointPassthrough(), _keypoints(i, 4 * (i + 1) + 2)) for i in range(6)]

    async def main() -> list[list[np.ndarray]]:
        async def one(featurizer: KeypointPassthrough, kp: np.ndarray) -> list[np.ndarray]:
            return await pool.push(featurizer, kp.astype("<f4").tobytes(), len(kp))

        return await asyncio.gather(*(one(f, kp) for f, kp in streams))

    results = asyncio.run(main())
    for (featurizer, kp), steps in zip(streams, results, strict=True):
        expected = keypoints_to_steps(kp)  # the trailing 2 frames wait in the stream's assembler
        assert len(steps) == len(expected) and featurizer._assembler.pending_frames == 2
        np.testing.assert_array_equal(np.stack(steps), expected)
    assert pool.coalescing == (1, 6) and served == [6]  # six streams, one transform call
    pool.shutdown()


def test_a_message_that_completes_no_step_does_not_wait() -> None:
    pool = FeaturizerPool(1)
    feat = KeypointPassthrough()
    kp = _keypoints(0, 3)
    assert asyncio.run(pool.push(feat, kp.astype("<f4").tobytes(), 3)) == []
    assert pool.coalescing == (0, 0)
    pool.shutdown()


def test_cancelled_waiter_is_skipped_and_errors_reach_every_waiter() -> None:
    calls = []

    def transform(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return rows.reshape(-1, 2, rows.shape[1]).sum(axis=1)

    async def cancelled_then_served() -> np.ndarray:
        coalescer = TransformCoalescer(transform)
        gone = coalescer.submit(np.ones((2, 3)))
        kept = coalescer.submit(np.full((4, 3), 2.0))
        gone.cancel()
        return await kept

    np.testing.assert_array_equal(asyncio.run(cancelled_then_served()), np.full((2, 3), 4.0))
    assert calls == [4]  # only the live waiter's rows were transformed

    def broken(rows: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom")

    async def failing() -> list:
        coalescer = TransformCoalescer(broken)
        futures = [coalescer.submit(np.ones((2, 3))) for _ in range(3)]
        return await asyncio.gather(*futures, return_exceptions=True)

    assert [str(e) for e in asyncio.run(failing())] == ["boom"] * 3


def test_bad_frames_are_refused_before_anything_is_queued() -> None:
    pool = FeaturizerPool(1)
    feat = KeypointPassthrough()
    kp = _keypoints(1, 4)
    kp[2, 9] = np.inf

    from service.features.base import FrameError

    with pytest.raises(FrameError, match="frame 2 of 4"):
        asyncio.run(pool.push(feat, kp.astype("<f4").tobytes(), 4))
    assert feat._assembler.pending_frames == 0 and pool.coalescing == (0, 0)
    pool.shutdown()
