"""Step mode end to end: `mgstream serve` in a subprocess finds ``<model>.step.onnx`` beside the window
model, streams run the step model with per-stream cached state, and every client gets exactly the
events of the step batch path over its own steps. Window mode stays available for the same files."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.detector import Detector  # noqa: E402
from models.export_step import export_step_onnx  # noqa: E402
from models.nn.config import ModelConfig  # noqa: E402
from service.contract.features import keypoints_to_steps  # noqa: E402
from service.detection.step_events import detect_steps_step_sync  # noqa: E402
from service.runtime.onnx import OnnxModelRuntime  # noqa: E402
from service.runtime.step_runtime import StepModelRuntime, step_model_path  # noqa: E402
from tests.streamkit import Gesture, keypoint_payloads, offline_ends, run_server, stream_payloads, synth_keypoints  # noqa: E402

FRAMES = 400


@pytest.fixture(scope="module")
def model_pair(exported_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's exported window model (copied, so its other users stay window-only) plus the step
    export of the same weights beside it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)  # the same construction as conftest's exported_model: the same weights
        det = Detector(ModelConfig(channels=32, window_steps=64, strides=(1, 2, 4, 8), sta_reduction=8)).eval()
        window = tmp_path_factory.mktemp("pair") / "pair.onnx"
        shutil.copy(exported_model, window)
        runtime = OnnxModelRuntime(window, ["CPUExecutionProvider"])
        x = np.random.default_rng(0).normal(size=(2, 64, 372)).astype(np.float32)
        with torch.no_grad():
            ref = det.predict(torch.from_numpy(x))[0].numpy()
        assert np.abs(runtime.run({"features": x})["scores"] - ref).max() < 1e-4  # really the same weights
        export_step_onnx(det, step_model_path(window), runtime.card, 4)
    finally:
        torch.set_num_threads(before)
    return window


def _sequence(seed: int) -> np.ndarray:
    return synth_keypoints(FRAMES, [Gesture(1, 50, 150), Gesture(2, 220, 330)], seed=seed)


def test_server_streams_in_step_mode_exactly_like_the_step_batch_path(model_pair: Path, tmp_path: Path) -> None:
    step = StepModelRuntime(step_model_path(model_pair), ["CPUExecutionProvider"])
    kps = [_sequence(9), _sequence(10)]
    steps = [keypoints_to_steps(kp) for kp in kps]
    scores = []
    for s in steps:
        state = step.layout.initial_state()
        for c in range(len(s) // 4):
            out = step.run({"features": s[None, c * 4 : c * 4 + 4], **{k: v[None] for k, v in state.items()}})
            state = {"state": out["state_out"][0], "phase": out["phase_out"][0]}
            scores.append(out["scores"][0][out["valid"][0]])
    threshold = float(np.quantile(np.concatenate(scores), 0.9))
    expected = [
        offline_ends(detect_steps_step_sync(step, s, step.card, step.layout, score_threshold=threshold)) for s in steps
    ]
    env = {"MGSTREAM_INBOUND_QUEUE_FRAMES": "100000"}
    with run_server(model_pair, tmp_path, env=env) as srv:  # mode auto: the step model is used

        async def both():
            return await asyncio.gather(
                *(stream_payloads(srv.ws, keypoint_payloads(kp), start={"score_threshold": threshold}) for kp in kps)
            )

        results = asyncio.run(both())
        log = srv.log()
    assert "step mode" in log
    for result, want in zip(results, expected, strict=True):
        assert result.of("ready")[0]["mode"] == "step"
        assert result.messages[-1]["frames_dropped"] == 0
        assert want and result.ends() == want


def test_window_mode_stays_available_beside_a_step_model(model_pair: Path, tmp_path: Path) -> None:
    from service.detection.offline import detect_steps_sync

    runtime = OnnxModelRuntime(model_pair, ["CPUExecutionProvider"])
    kp = _sequence(11)
    threshold = float(np.quantile(runtime.run({"features": np.zeros((1, 64, 372), np.float32)})["scores"], 0.9))
    expected = offline_ends(detect_steps_sync(runtime, keypoints_to_steps(kp), runtime.card, score_threshold=threshold))
    env = {"MGSTREAM_INBOUND_QUEUE_FRAMES": "100000", "MGSTREAM_MODE": "window"}
    with run_server(model_pair, tmp_path, env=env) as srv:
        result = asyncio.run(stream_payloads(srv.ws, keypoint_payloads(kp), start={"score_threshold": threshold}))
    assert result.of("ready")[0]["mode"] == "window"
    assert expected and result.ends() == expected


def test_step_mode_refuses_to_start_without_a_step_model(exported_model: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone.onnx"
    shutil.copy(exported_model, lone)
    with pytest.raises(RuntimeError, match="step"), run_server(lone, tmp_path, env={"MGSTREAM_MODE": "step"}):
        pass


def test_default_model_streams_in_step_mode_exactly_like_its_batch_path(default_model: Path, tmp_path: Path) -> None:
    from models.synth import generate_sequence

    path = step_model_path(default_model)
    if not path.is_file():
        pytest.skip(f"SKIPPED LOUDLY: the shipped step model {path} is missing")
    step = StepModelRuntime(path, ["CPUExecutionProvider"])
    kp, _ = generate_sequence(424_242, 1800)
    expected = offline_ends(detect_steps_step_sync(step, keypoints_to_steps(kp), step.card, step.layout))
    with run_server(default_model, tmp_path, env={"MGSTREAM_INBOUND_QUEUE_FRAMES": "100000"}) as srv:
        result = asyncio.run(stream_payloads(srv.ws, keypoint_payloads(kp)))
        (served,) = httpx.get(f"{srv.http}/v1/models", timeout=10).json()["data"]
    assert result.of("ready")[0]["mode"] == "step"  # auto mode picks the shipped step model
    assert served["mode"] == "step" and served["card"]["step_model"] is None  # the window card is listed
    assert result.messages[-1]["frames_dropped"] == 0
    assert expected and result.ends() == expected
    print(f"\nstep streaming = step batch path on a 60 s synthetic sequence: {len(expected)} gesture_end events")


def test_a_step_model_from_another_export_is_not_served(model_pair: Path, tmp_path: Path) -> None:
    """A step file whose card differs from the window model's (e.g. left over from an earlier export):
    auto mode falls back to window mode, step mode refuses to start."""
    import dataclasses

    from service.app import load_step_runtime_for
    from service.config import Settings
    from service.contract.model_card import ModelCardError

    window = tmp_path / "stale.onnx"
    shutil.copy(model_pair, window)
    runtime = OnnxModelRuntime(window, ["CPUExecutionProvider"])
    torch.manual_seed(0)
    det = Detector(ModelConfig(channels=32, window_steps=64, strides=(1, 2, 4, 8), sta_reduction=8)).eval()
    export_step_onnx(det, step_model_path(window), dataclasses.replace(runtime.card, created="earlier"), 4)
    assert load_step_runtime_for(runtime, Settings(model_path=window, mode="auto")) is None
    with pytest.raises(ModelCardError, match="re-export"):
        load_step_runtime_for(runtime, Settings(model_path=window, mode="step"))
    shutil.copy(step_model_path(model_pair), step_model_path(window))  # the matching export is served
    step = load_step_runtime_for(runtime, Settings(model_path=window, mode="auto"))
    assert step is not None and step.layout.chunk_steps == 4
