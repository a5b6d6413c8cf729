"""The featurizer worker pool: off-loop, one thread per featurizer at a time, in order, errors propagate."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.contract.features import KEYPOINT_DIM, keypoints_to_steps
from service.features.base import FrameError
from service.features.passthrough import KeypointPassthrough
from service.features.pool import FeaturizerPool


class SlowKeypoints(KeypointPassthrough):
    """A blocking featurizer that records which threads entered it and whether two ever overlapped."""

    blocking = True

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()
        self.inside = 0
        self.overlapped = False
        self.closed = False

    def push_payload(self, payload, frames=1):
        self.inside += 1
        self.overlapped |= self.inside > 1
        self.threads.add(threading.current_thread().name)
        time.sleep(0.002)  # holds the worker long enough for others to try to enter
        try:
            return super().push_payload(payload, frames)
        finally:
            self.inside -= 1

    def close(self) -> None:
        self.closed = True


def test_pool_serialises_each_featurizer_and_keeps_order():
    rng = np.random.default_rng(0)
    streams = [rng.uniform(0, 1, (16, KEYPOINT_DIM)).astype(np.float32) for _ in range(3)]

    async def main():
        pool = FeaturizerPool(2)
        feats = [SlowKeypoints() for _ in streams]
        try:
            # every frame of every stream submitted at once: the pool must still order them per stream
            calls = [
                [pool.push(f, frame.tobytes()) for frame in kp] for f, kp in zip(feats, streams, strict=True)
            ]
            results = await asyncio.gather(*(asyncio.gather(*c) for c in calls))
            flushed = await asyncio.gather(*(pool.finish(f) for f in feats))
        finally:
            pool.shutdown()
        return feats, results, flushed, threading.current_thread().name

    feats, results, flushed, loop_thread = asyncio.run(main())
    for feat, kp, per_frame, tail in zip(feats, streams, results, flushed, strict=True):
        steps = [s for r in per_frame for s in r] + tail
        np.testing.assert_array_equal(np.stack(steps), keypoints_to_steps(kp))
        assert not feat.overlapped and feat.closed
        assert loop_thread not in feat.threads and all(t.startswith("featurize") for t in feat.threads)


def test_errors_reach_the_caller_and_the_pool_goes_on():
    async def main():
        pool = FeaturizerPool(1)
        feat = SlowKeypoints()
        try:
            with pytest.raises(FrameError, match="must be 1032 bytes"):
                await pool.push(feat, b"\x00" * 12)
            assert await pool.push(feat, np.zeros(KEYPOINT_DIM, np.float32).tobytes()) == []
            assert pool.in_flight == 0
            await pool.release(feat)
        finally:
            pool.shutdown()
        with pytest.raises(RuntimeError, match="shut down"):
            await pool.run(feat, feat.flush)
        return feat

    assert asyncio.run(main()).closed


def test_cheap_featurizers_run_inline():
    async def main():
        pool = FeaturizerPool(1)
        feat = KeypointPassthrough()
        try:
            return await pool.push(feat, np.zeros(KEYPOINT_DIM, np.float32).tobytes())
        finally:
            pool.shutdown()

    assert asyncio.run(main()) == []
