"""Step mode on the serving side: a real step ONNX, the real scheduler stacking per-stream states,
and the step event path, against the batch path and the full causal forward."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.detector import Detector, run_sequence  # noqa: E402
from models.export import build_card  # noqa: E402
from models.export_step import export_step_onnx  # noqa: E402
from models.nn.config import ModelConfig  # noqa: E402
from service.batching.scheduler import Scheduler  # noqa: E402
from service.contract.model_card import PostProcess  # noqa: E402
from service.detection.decode import decode  # noqa: E402
from service.detection.step_events import StepStream, detect_steps_step_sync  # noqa: E402
from service.runtime.step_runtime import StepModelRuntime, step_model_path  # noqa: E402

WINDOW = 32


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(2)
    det = Detector(ModelConfig(channels=16, window_steps=WINDOW, strides=(1, 2, 4, 8), sta_reduction=4)).eval()
    with torch.no_grad():
        for head in (det.cls_head, det.reg_head):
            for layer in head.layers:
                layer.alpha.fill_(0.8)
    return det


@pytest.fixture(scope="module")
def runtime(detector: Detector, tmp_path_factory: pytest.TempPathFactory) -> StepModelRuntime:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        card = build_card(detector, PostProcess(score_threshold=0.5, min_duration_steps=0.0), {}, name="step-serve")
        path = export_step_onnx(detector, step_model_path(tmp_path_factory.mktemp("m") / "m.onnx"), card, 4)
    finally:
        torch.set_num_threads(before)
    return StepModelRuntime(path, ["CPUExecutionProvider"])


def _steps(seed: int, t: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(t, 372)).astype(np.float32)


def _threshold(detector: Detector, steps: np.ndarray) -> float:
    scores, _, _ = run_sequence(detector, steps)
    return float(np.quantile(scores, 0.995))


def test_runtime_checks_io_and_warms_up(runtime: StepModelRuntime) -> None:
    layout = runtime.layout
    assert [s.name for s in runtime.inputs] == ["features", "state", "phase"]
    assert runtime.inputs[1].shape == (layout.state_size,)
    stream = StepStream(runtime.card, layout)
    runtime.check_request(stream.request(np.zeros((4, 372), np.float32)))
    with pytest.raises(ValueError):
        runtime.check_request(stream.request(np.zeros((5, 372), np.float32)))
    assert set(runtime.warm_up([1, 3])) == {1, 3}


def test_step_decisions_decode_the_full_forward(
    detector: Detector, runtime: StepModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At every decision point the step stream decodes exactly the full causal forward's outputs whose
    anchors lie in the last window: nothing is lost or recomputed differently. A decision whose window
    holds the same above-threshold positions as the previous one reuses its detections."""
    from service.detection import step_events

    decodes = []
    real_decode = step_events.decode
    monkeypatch.setattr(step_events, "decode", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    steps = _steps(1, 96)
    thr = _threshold(detector, steps)
    ref_scores, ref_offsets, ref_anchors = run_sequence(detector, steps)
    stream = StepStream(runtime.card, runtime.layout, score_threshold=thr)
    checked = 0
    for c in range(len(steps) // 4):
        out = runtime.run({k: v[None] for k, v in stream.request(steps[c * 4 : (c + 1) * 4]).items()})
        stream.consume({k: v[0] for k, v in out.items()})
        n = (c + 1) * 4
        keep = (ref_anchors >= n - WINDOW) & (ref_anchors < n)
        pp = runtime.card.postprocess
        want = decode(ref_scores[keep], ref_offsets[keep], ref_anchors[keep], pp, score_threshold=thr)
        got = stream.detections(n)
        assert [(d.class_id, round(d.start_step, 3), round(d.end_step, 3)) for d in got] == [
            (d.class_id, round(d.start_step, 3), round(d.end_step, 3)) for d in want
        ]
        checked += len(want)
    assert checked >= 5  # the comparison covered real detections
    assert 0 < len(decodes) < len(steps) // 4  # some decisions reused the previous decode


def test_scheduler_stacks_stream_states_and_matches_the_batch_path(
    detector: Detector, runtime: StepModelRuntime
) -> None:
    """Three live streams, joining at different times (different phases), share batches through the
    generic scheduler; each gets exactly the events of the batch path over its own steps."""
    lengths, delays = [70, 53, 64], [0, 2, 5]
    streams_steps = [_steps(10 + i, t) for i, t in enumerate(lengths)]
    thr = _threshold(detector, streams_steps[0])

    async def live() -> tuple[list[list], int]:
        scheduler = Scheduler(runtime, max_batch=4, max_wait_ms=20.0)
        scheduler.start()

        async def one(i: int) -> list:
            steps = streams_steps[i]
            stream = StepStream(runtime.card, runtime.layout, score_threshold=thr)
            events = []
            for _ in range(delays[i]):
                await asyncio.sleep(0)
            for start in range(0, len(steps), 4):
                chunk = np.zeros((4, 372), np.float32)
                real = min(4, len(steps) - start)
                chunk[:real] = steps[start : start + real]
                out = await scheduler.submit(f"s{i}", stream.request(chunk))
                events += stream.consume(out, real)
            return events + stream.finish(len(steps))

        results = await asyncio.gather(*(one(i) for i in range(len(lengths))))
        batches = scheduler.batches
        await scheduler.stop()
        return list(results), batches

    live_events, batches = asyncio.run(live())
    assert batches < sum(-(-t // 4) for t in lengths)  # streams really shared batches
    total = 0
    for i, steps in enumerate(streams_steps):
        offline = detect_steps_step_sync(runtime, steps, runtime.card, runtime.layout, score_threshold=thr)
        assert live_events[i] == offline
        total += len(offline)
    assert total >= 4
    assert any(e.type == "gesture_end" for e in live_events[0])


def test_state_is_per_stream_and_fixed_size(runtime: StepModelRuntime) -> None:
    stream = StepStream(runtime.card, runtime.layout)
    sizes = set()
    for c in range(30):
        out = runtime.run({k: v[None] for k, v in stream.request(_steps(c, 4)).items()})
        stream.consume({k: v[0] for k, v in out.items()})
        sizes.add(sum(v.nbytes for v in stream.state.values()))
    assert sizes == {4 * (runtime.layout.state_size + 1)}
    assert float(stream.state["phase"][0]) == (30 * 4) % runtime.layout.max_stride


def test_hop_must_be_a_multiple_of_the_chunk(runtime: StepModelRuntime) -> None:
    with pytest.raises(ValueError, match="multiple of the chunk"):
        StepStream(runtime.card, runtime.layout, hop_steps=6)


def test_model_path_convention(tmp_path: Path) -> None:
    assert step_model_path(tmp_path / "mgstream-default.onnx").name == "mgstream-default.step.onnx"


def test_batch_job_path_through_the_scheduler_equals_the_direct_batch_path(
    detector: Detector, runtime: StepModelRuntime
) -> None:
    from service.detection.step_events import detect_steps_step

    steps = _steps(21, 61)
    thr = _threshold(detector, steps)
    decisions = []

    async def job() -> list:
        scheduler = Scheduler(runtime, max_batch=4, max_wait_ms=2.0)
        scheduler.start()
        try:
            return await detect_steps_step(
                steps,
                card=runtime.card,
                layout=runtime.layout,
                scheduler=scheduler,
                key="job-1",
                on_decision=lambda: decisions.append(1),
                score_threshold=thr,
            )
        finally:
            await scheduler.stop()

    events = asyncio.run(job())
    assert events == detect_steps_step_sync(runtime, steps, runtime.card, runtime.layout, score_threshold=thr)
    assert events and len(decisions) == -(-61 // 4)  # progress: one call per decision point
