"""End to end against `mgstream serve` in a subprocess: many concurrent real-time clients each get
exactly their own offline events; JPEG frames through the pose featurizer; the exported detector
architecture; and, with the trained default model, streaming = offline and the quality bar."""

from __future__ import annotations

import asyncio

import cv2
import numpy as np
import pytest

from service.api.protocol import CloseCode
from service.config import Settings
from service.contract.features import keypoints_to_steps
from service.detection.offline import detect_steps_sync, full_sequence_detections, gesture_ends
from service.runtime.onnx import OnnxModelRuntime
from tests.streamkit import (
    Gesture,
    keypoint_payloads,
    offline_ends,
    run_server,
    stream_payloads,
    synth_keypoints,
)

CLIENTS = 20
FRAMES = 150  # five seconds at 30 fps per client


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with run_server(tiny_model, tmp_path_factory.mktemp("srv"), env={"MGSTREAM_MAX_SESSIONS": "32"}) as srv:
        yield srv


def client_sequence(i: int) -> np.ndarray:
    start = 10 + 4 * i
    return synth_keypoints(FRAMES, [Gesture(1 + i % 2, start, start + 40 + 2 * i)], seed=100 + i)


def test_concurrent_realtime_clients_each_get_exactly_their_own_events(server, tiny_runtime) -> None:
    sequences = [client_sequence(i) for i in range(CLIENTS)]

    async def main():
        return await asyncio.gather(
            *(
                stream_payloads(server.ws, keypoint_payloads(kp), pace=True, start={"stream_id": f"client-{i}"})
                for i, kp in enumerate(sequences)
            )
        )

    results = asyncio.run(main())
    for i, (kp, result) in enumerate(zip(sequences, results, strict=True)):
        end = result.messages[-1]
        assert end["type"] == "end" and end["frames_dropped"] == 0, f"client {i}: {end}"
        assert result.close_code == CloseCode.NORMAL
        assert all(m.get("stream_id") == f"client-{i}" for m in result.messages if m["type"] != "error")
        expected = offline_ends(detect_steps_sync(tiny_runtime, keypoints_to_steps(kp), tiny_runtime.card))
        assert result.ends() == expected, f"client {i}"
        assert [e["class_id"] for e in expected] == [1 + i % 2]  # its own gesture, nobody else's
    assert server.metric("mgstream_sessions_active") == 0
    assert server.metric("mgstream_batch_size_count") > 0
    calls = server.metric("mgstream_keypoint_transform_streams_count")
    assert calls > 0 and server.metric("mgstream_keypoint_transform_streams_sum") >= calls


@pytest.mark.parametrize("frames_per_message", [4, 7])
def test_several_keypoint_frames_per_message_give_the_same_events(server, tiny_runtime, frames_per_message) -> None:
    """A step's frames sent together (4) or groups that straddle steps (7): the same events as one
    frame per message, every frame counted."""
    kp = client_sequence(3)
    result = asyncio.run(
        stream_payloads(server.ws, keypoint_payloads(kp), pace=True, frames_per_message=frames_per_message)
    )
    assert result.of("error") == []
    end = result.messages[-1]
    assert end["type"] == "end" and end["frames_received"] == end["frames_processed"] == FRAMES
    expected = offline_ends(detect_steps_sync(tiny_runtime, keypoints_to_steps(kp), tiny_runtime.card))
    assert expected and result.ends() == expected


def test_jpeg_frames_through_the_pose_featurizer(server, tiny_runtime) -> None:
    from skimage import data

    from service.features.factory import create_featurizer

    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    payloads = []
    for i in range(24):
        canvas = np.full((480, 640, 3), 128, np.uint8)
        canvas[:480, 64 + i : 576 + i] = cv2.resize(photo, (512, 480))
        payloads.append(cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
    result = asyncio.run(stream_payloads(server.ws, payloads, input_kind="jpeg", fps=8.0, pace=True))
    assert result.of("error") == []
    end = result.messages[-1]
    assert end["type"] == "end" and end["frames_processed"] == 24 and end["frames_dropped"] == 0
    # The same JPEGs through the same featurizer offline give the same events.
    featurizer = create_featurizer("jpeg", tiny_runtime.card, Settings())
    steps = [s for p in payloads for s in featurizer.push_payload(p)] + featurizer.flush()
    featurizer.close()
    assert len(steps) == 6 and np.isfinite(steps).all()
    events = detect_steps_sync(tiny_runtime, np.stack(steps), tiny_runtime.card, fps=8.0)
    assert result.ends() == offline_ends(events)


@pytest.mark.slow
def test_exported_detector_streams_exactly_like_offline(exported_model, tmp_path) -> None:
    """The trainer's architecture (random weights, low threshold: many events) through the server."""
    kp = synth_keypoints(400, [Gesture(1, 50, 150), Gesture(2, 220, 330)], seed=9)
    runtime = OnnxModelRuntime(exported_model, ["CPUExecutionProvider"])
    threshold = float(np.quantile(runtime.run({"features": np.zeros((1, 64, 372), np.float32)})["scores"], 0.9))
    expected = offline_ends(detect_steps_sync(runtime, keypoints_to_steps(kp), runtime.card, score_threshold=threshold))
    env = {"MGSTREAM_INBOUND_QUEUE_FRAMES": "100000"}
    with run_server(exported_model, tmp_path, env=env) as srv:
        result = asyncio.run(stream_payloads(srv.ws, keypoint_payloads(kp), start={"score_threshold": threshold}))
    assert result.messages[-1]["frames_dropped"] == 0
    assert expected and result.ends() == expected


# ---------------------------------------------------------------- acceptance with the trained model


def _synth(seed: int, frames: int) -> tuple[np.ndarray, list]:
    from models.synth import generate_sequence

    return generate_sequence(seed, frames)


def test_default_model_streaming_equals_offline(default_model, tmp_path) -> None:
    kp, _ = _synth(424_242, 1800)
    runtime = OnnxModelRuntime(default_model, ["CPUExecutionProvider"])
    expected = offline_ends(detect_steps_sync(runtime, keypoints_to_steps(kp), runtime.card))
    env = {"MGSTREAM_INBOUND_QUEUE_FRAMES": "100000", "MGSTREAM_MODE": "window"}  # step mode: test_step_e2e.py
    with run_server(default_model, tmp_path, env=env) as srv:
        result = asyncio.run(stream_payloads(srv.ws, keypoint_payloads(kp)))
    assert result.messages[-1]["frames_dropped"] == 0
    assert result.ends() == expected
    print(f"\nstreaming = offline on a 60 s synthetic sequence: {len(expected)} gesture_end events")


def test_default_model_streamed_f1_is_at_least_90_percent_of_offline(default_model, tmp_path) -> None:
    from models.evaluation import toolkit_f1

    runtime = OnnxModelRuntime(default_model, ["CPUExecutionProvider"])
    card, fps = runtime.card, runtime.card.feature.fps
    f = card.feature.frames_per_step
    streamed, offline, truth = {}, {}, {}
    with run_server(default_model, tmp_path, env={"MGSTREAM_INBOUND_QUEUE_FRAMES": "100000"}) as srv:
        for i in range(4):
            vid = f"heldout-{i}"
            kp, labels = _synth(900_000 + i, 1800)
            truth[vid] = [(c, s, e) for c, s, e in labels]
            result = asyncio.run(stream_payloads(srv.ws, keypoint_payloads(kp), fps=fps))
            streamed[vid] = [(e["class_id"], e["start_frame"], e["end_frame"], e["score"]) for e in result.ends()]
            offline[vid] = [
                (d.class_id, d.start_step * f, d.end_step * f, d.score)
                for d in full_sequence_detections(runtime, keypoints_to_steps(kp), card)
            ]
    f1_stream, f1_offline = toolkit_f1(streamed, truth).f1, toolkit_f1(offline, truth).f1
    print(
        f"\nMiGA/SMG F1 on 4 held-out synthetic minutes: streamed {f1_stream:.3f}, "
        f"offline full-sequence {f1_offline:.3f} (ratio {f1_stream / max(f1_offline, 1e-9):.3f})"
    )
    assert f1_stream >= 0.9 * f1_offline


def test_gesture_ends_helper_keeps_only_ends(tiny_runtime) -> None:
    steps = keypoints_to_steps(synth_keypoints(200, [Gesture(1, 20, 120)], seed=1))
    events = detect_steps_sync(tiny_runtime, steps, tiny_runtime.card)
    assert {e.type for e in gesture_ends(events)} == {"gesture_end"} and len(events) == 2
