"""The scheduler's own logic, driven by a small deterministic runtime (the real ONNX path is in
test_events.py and the WebSocket tests): batch cuts, splitting, cancellation, failures, one in flight."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.batching.scheduler import DuplicateRequest, Scheduler, SchedulerClosed
from service.contract.model_card import WINDOW_INPUT
from service.metrics import Metrics
from service.runtime.base import InferenceFailed, ModelRuntime, RuntimeDead, RuntimeHealth, TensorSpec
from tests.streamkit import tiny_card


class RecordingRuntime(ModelRuntime):
    """Sums each window (so every request's answer is checkable), records batch sizes, fails on demand."""

    def __init__(self, max_failures: int = 3) -> None:
        self.card = tiny_card()
        self.health = RuntimeHealth(max_failures)
        self.batches: list[int] = []
        self.fail = False
        self.gate: threading.Event | None = None  # when set, a run waits for it (a slow batch)
        self.entered = threading.Event()

    @property
    def provider(self) -> str:
        return "test"

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(WINDOW_INPUT, (4, 3)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("total", ()),)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        batch = inputs[WINDOW_INPUT]
        self.batches.append(batch.shape[0])
        if self.fail:
            raise RuntimeError("device lost")
        return {"total": batch.reshape(batch.shape[0], -1).sum(axis=1)}


def window(value: float) -> dict[str, np.ndarray]:
    return {WINDOW_INPUT: np.full((4, 3), value, dtype=np.float32)}


def run(coro):
    return asyncio.run(coro)


def test_each_request_gets_its_own_slice_and_batches_pad_to_buckets() -> None:
    async def main():
        rt = RecordingRuntime()
        sched = Scheduler(rt, max_batch=8, max_wait_ms=50, buckets=[1, 2, 4, 8])
        sched.start()
        results = await asyncio.gather(*(sched.submit(f"s{i}", window(i)) for i in range(3)))
        await sched.stop()
        return rt, results

    rt, results = run(main())
    assert [float(r["total"]) for r in results] == [0.0, 12.0, 24.0]
    assert rt.batches == [4]  # three requests in one batch, padded to the warmed bucket of 4


def test_batch_is_cut_at_max_batch_without_waiting_for_the_deadline() -> None:
    async def main():
        rt = RecordingRuntime()
        sched = Scheduler(rt, max_batch=4, max_wait_ms=60_000, buckets=[4])
        sched.start()
        results = await asyncio.gather(*(sched.submit(f"s{i}", window(i)) for i in range(8)))
        await sched.stop()
        return rt, results

    rt, results = run(main())  # with a one-minute max_wait, only the max_batch rule can cut these
    assert rt.batches == [4, 4]
    assert [float(r["total"]) for r in results] == [12.0 * i for i in range(8)]


def test_lone_request_runs_at_its_deadline() -> None:
    async def main():
        rt = RecordingRuntime()
        sched = Scheduler(rt, max_batch=32, max_wait_ms=20, buckets=[1, 32])
        sched.start()
        result = await sched.submit("only", window(1))
        await sched.stop()
        return rt, result

    rt, result = run(main())
    assert rt.batches == [1] and float(result["total"]) == 12.0


def test_requests_arriving_during_a_batch_form_the_next_one() -> None:
    async def main():
        rt = RecordingRuntime()
        rt.gate = threading.Event()
        sched = Scheduler(rt, max_batch=8, max_wait_ms=0, buckets=[1, 2, 4, 8])
        sched.start()
        first = asyncio.create_task(sched.submit("a", window(1)))
        await asyncio.get_running_loop().run_in_executor(None, rt.entered.wait, 10)
        later = [asyncio.create_task(sched.submit(f"b{i}", window(2))) for i in range(3)]
        await asyncio.sleep(0)
        rt.gate.set()
        await asyncio.gather(first, *later)
        await sched.stop()
        return rt

    assert run(main()).batches == [1, 4]  # the three waiting requests went out together


@pytest.mark.parametrize("in_flight", [1, 2])
def test_the_next_batch_is_handed_over_while_one_runs_up_to_the_limit(in_flight: int) -> None:
    """With room for two batches, the next one is cut and queued on the inference thread while the
    first still runs (it starts without a trip through the event loop); with room for one it waits."""

    async def main() -> tuple[RecordingRuntime, int, list]:
        rt = RecordingRuntime()
        rt.gate = threading.Event()
        sched = Scheduler(rt, max_batch=8, max_wait_ms=0, buckets=[1, 2, 8], max_batches_in_flight=in_flight)
        sched.start()
        first = asyncio.create_task(sched.submit("a", window(1)))
        await asyncio.get_running_loop().run_in_executor(None, rt.entered.wait, 10)
        second = asyncio.create_task(sched.submit("b", window(2)))
        for _ in range(5):
            await asyncio.sleep(0)
        waiting = sched.queue_depth  # requests not yet cut into a batch
        third = asyncio.create_task(sched.submit("c", window(3)))
        for _ in range(5):
            await asyncio.sleep(0)
        rt.gate.set()
        results = await asyncio.gather(first, second, third)
        await sched.stop()
        return rt, waiting, results

    rt, waiting, results = run(main())
    assert [float(r["total"]) for r in results] == [12.0, 24.0, 36.0]
    if in_flight == 2:
        assert waiting == 0 and rt.batches == [1, 1, 1]  # b was handed over alone, c after a slot freed
    else:
        assert waiting == 1 and rt.batches == [1, 2]  # b waited for a, and c joined it
    with pytest.raises(ValueError, match="max_batches_in_flight"):
        Scheduler(rt, max_batches_in_flight=0)


def test_cancelled_requests_are_skipped() -> None:
    async def main():
        rt = RecordingRuntime()
        rt.gate = threading.Event()
        sched = Scheduler(rt, max_batch=8, max_wait_ms=0, buckets=[1, 2, 4, 8])
        sched.start()
        blocker = asyncio.create_task(sched.submit("blocker", window(0)))
        await asyncio.get_running_loop().run_in_executor(None, rt.entered.wait, 10)
        gone = asyncio.create_task(sched.submit("gone", window(1)))
        kept = asyncio.create_task(sched.submit("kept", window(2)))
        await asyncio.sleep(0)
        gone.cancel()  # its stream disconnected while it waited
        rt.gate.set()
        await blocker
        result = await kept
        await sched.stop()
        return rt, result, sched

    rt, result, sched = run(main())
    assert rt.batches == [1, 1] and float(result["total"]) == 24.0
    assert not sched.in_flight("gone")


def test_a_failed_batch_fails_every_request_and_repeated_failures_kill_the_runtime() -> None:
    dead_reasons: list[str] = []

    async def main():
        rt = RecordingRuntime(max_failures=2)
        rt.fail = True
        metrics = Metrics()
        sched = Scheduler(rt, max_batch=4, max_wait_ms=20, buckets=[4], metrics=metrics, on_dead=dead_reasons.append)
        sched.start()
        first = await asyncio.gather(*(sched.submit(f"s{i}", window(i)) for i in range(3)), return_exceptions=True)
        second = await asyncio.gather(sched.submit("t", window(1)), return_exceptions=True)
        with pytest.raises(RuntimeDead):
            await sched.submit("after", window(1))
        await sched.stop()
        return rt, first, second, metrics

    rt, first, second, metrics = run(main())
    assert all(isinstance(e, InferenceFailed) and "device lost" in str(e) for e in first)
    assert isinstance(second[0], InferenceFailed)
    assert not rt.health.alive and len(dead_reasons) == 1
    assert metrics.runtime_up._value.get() == 0


def test_success_resets_the_failure_count() -> None:
    async def main():
        rt = RecordingRuntime(max_failures=2)
        sched = Scheduler(rt, max_batch=1, max_wait_ms=0, buckets=[1])
        sched.start()
        for fail in (True, False, True, False):
            rt.fail = fail
            await asyncio.gather(sched.submit("s", window(1)), return_exceptions=True)
        await sched.stop()
        return rt

    assert run(main()).health.alive


def test_one_request_in_flight_per_stream_and_shapes_are_checked() -> None:
    async def main():
        rt = RecordingRuntime()
        rt.gate = threading.Event()
        sched = Scheduler(rt, max_batch=4, max_wait_ms=0, buckets=[4])
        sched.start()
        first = asyncio.create_task(sched.submit("s", window(1)))
        await asyncio.sleep(0)
        with pytest.raises(DuplicateRequest):
            await sched.submit("s", window(2))
        with pytest.raises(ValueError, match="shape"):
            await sched.submit("other", {WINDOW_INPUT: np.zeros((5, 3), np.float32)})
        with pytest.raises(ValueError, match="inputs"):
            await sched.submit("other", {"wrong": np.zeros((4, 3), np.float32)})
        rt.gate.set()
        await first
        again = await sched.submit("s", window(3))  # free again once answered
        await sched.stop()
        return again

    assert float(run(main())["total"]) == 36.0


def test_stop_refuses_new_work() -> None:
    async def main():
        rt = RecordingRuntime()
        sched = Scheduler(rt, max_batch=4, max_wait_ms=0, buckets=[4])
        sched.start()
        await sched.submit("s", window(1))
        await sched.stop()
        with pytest.raises(SchedulerClosed):
            await sched.submit("s", window(1))

    run(main())


def test_real_onnx_batches_equal_single_runs(tiny_runtime) -> None:
    """Batched results are bit-identical to batch-1 runs: streaming and offline can match exactly."""
    rng = np.random.default_rng(0)
    windows = rng.normal(size=(5, 64, 372)).astype(np.float32)
    windows[:, :, 184] = rng.uniform(0, 1, size=(5, 64)) > 0.5

    async def main():
        sched = Scheduler(tiny_runtime, max_batch=8, max_wait_ms=20, buckets=[1, 8])
        sched.start()
        out = await asyncio.gather(*(sched.submit(f"s{i}", {WINDOW_INPUT: w}) for i, w in enumerate(windows)))
        await sched.stop()
        return out

    batched = run(main())
    for w, got in zip(windows, batched, strict=True):
        single = tiny_runtime.run({WINDOW_INPUT: w[None]})
        np.testing.assert_array_equal(got["scores"], single["scores"][0])
        np.testing.assert_array_equal(got["offsets"], single["offsets"][0])
