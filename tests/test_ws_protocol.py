"""The /v1/streams protocol against a real server process: handshake, streaming = offline on the tiny
model, every kind of bad message answered with a clear error while the stream goes on, ops endpoints."""

from __future__ import annotations

import asyncio
import json
import struct

import httpx
import numpy as np
import pytest
import websockets

from service.api.protocol import CloseCode, ErrorCode, pack_frame
from service.contract.features import keypoints_to_steps
from service.detection.offline import detect_steps_sync
from tests.streamkit import (
    Gesture,
    keypoint_payloads,
    offline_ends,
    read_all,
    run_server,
    stream_payloads,
    synth_keypoints,
)

MAX_BYTES = 65536
MAX_BAD = 20
GESTURES = [Gesture(2, 30, 100), Gesture(1, 160, 230)]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    env = {
        "MGSTREAM_INBOUND_QUEUE_FRAMES": "100000",  # never drop here: these tests compare exact events
        "MGSTREAM_MAX_MESSAGE_BYTES": str(MAX_BYTES),
        "MGSTREAM_MAX_BAD_MESSAGES": str(MAX_BAD),
    }
    with run_server(tiny_model, tmp_path_factory.mktemp("srv"), env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def keypoints() -> np.ndarray:
    return synth_keypoints(300, GESTURES, seed=5)


def expected(tiny_runtime, kp: np.ndarray, **options) -> list[dict]:
    return offline_ends(detect_steps_sync(tiny_runtime, keypoints_to_steps(kp), tiny_runtime.card, **options))


def test_stream_is_ready_then_gets_exactly_the_offline_events(server, tiny_runtime, keypoints) -> None:
    result = asyncio.run(stream_payloads(server.ws, keypoint_payloads(keypoints), start={"stream_id": "cam-1"}))
    ready = result.messages[0]
    assert ready["type"] == "ready" and ready["stream_id"] == "cam-1"
    assert (ready["window_steps"], ready["hop_steps"], ready["frames_per_step"]) == (64, 4, 4)
    assert ready["model"] == "mgstream-tiny-test" and ready["max_message_bytes"] == MAX_BYTES
    ends = result.ends()
    assert ends == expected(tiny_runtime, keypoints)
    assert [(e["class_id"], e["start_frame"], e["end_frame"]) for e in ends] == [(2, 32, 100), (1, 160, 228)]
    starts = {m["event_id"]: m for m in result.of("gesture_start")}
    assert set(starts) == {e["event_id"] for e in ends}
    assert all(m["stream_id"] == "cam-1" for m in result.messages if "stream_id" in m)
    final = result.messages[-1]
    assert final == {
        "type": "end",
        "stream_id": "cam-1",
        "frames_received": 300,
        "frames_processed": 300,
        "frames_dropped": 0,
        "events": 4,
    }
    assert result.close_code == CloseCode.NORMAL


def test_stream_options_are_applied(server, tiny_runtime, keypoints) -> None:
    start = {"classes": [1], "score_threshold": 0.9, "fps": 25.0}
    result = asyncio.run(stream_payloads(server.ws, keypoint_payloads(keypoints), fps=25.0, start=start))
    ends = result.ends()
    assert ends == expected(tiny_runtime, keypoints, classes=[1], score_threshold=0.9, fps=25.0)
    assert [e["class_id"] for e in ends] == [1] and ends[0]["start_time"] == pytest.approx(160 / 25)


async def _send_and_expect(ws, message, code: str) -> dict:  # noqa: ANN001
    await ws.send(message)
    reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    while reply["type"] == "status":
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert reply["type"] == "error", reply
    assert reply["code"] == code, reply
    assert not reply["fatal"] and reply["message"]
    return reply


def test_every_bad_message_gets_an_error_and_the_stream_goes_on(server, tiny_runtime, keypoints) -> None:
    good = keypoint_payloads(keypoints)

    async def main():
        async with websockets.connect(server.ws) as ws:
            # Before `start`.
            await _send_and_expect(ws, pack_frame(0, 0.0, good[0]), ErrorCode.NOT_STARTED)
            await _send_and_expect(ws, json.dumps({"type": "end"}), ErrorCode.NOT_STARTED)
            # Unknown message types, malformed JSON, text where binary belongs, bad start fields.
            await _send_and_expect(ws, json.dumps({"type": "pause"}), ErrorCode.BAD_MESSAGE)
            await _send_and_expect(ws, "{not json", ErrorCode.BAD_MESSAGE)
            await _send_and_expect(ws, json.dumps(keypoints[0].tolist()[:4]), ErrorCode.BAD_MESSAGE)
            await _send_and_expect(ws, json.dumps({"type": "start"}), ErrorCode.BAD_MESSAGE)
            await _send_and_expect(
                ws, json.dumps({"type": "start", "input": "keypoints", "classes": [99]}), ErrorCode.BAD_MESSAGE
            )
            await ws.send(json.dumps({"type": "start", "input": "keypoints", "stream_id": "rough"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            await _send_and_expect(ws, json.dumps({"type": "start", "input": "keypoints"}), ErrorCode.ALREADY_STARTED)
            # Binary problems.
            await _send_and_expect(ws, b"\x01\x00\x00", ErrorCode.BAD_HEADER)
            await _send_and_expect(ws, struct.pack("<BBHId", 9, 0, 0, 1, 0.0) + good[0], ErrorCode.BAD_HEADER)
            reply = await _send_and_expect(ws, pack_frame(7, 0.0, good[0][:100]), ErrorCode.BAD_FRAME)
            assert reply["seq"] == 7 and "1032 bytes" in reply["message"]
            inf = keypoints[0].copy()
            inf[5] = np.inf
            await _send_and_expect(ws, pack_frame(8, 0.0, inf.astype("<f4").tobytes()), ErrorCode.BAD_FRAME)
            # Several frames in one message: the size must match the header's count, Inf is located.
            two = good[0] + good[1]
            reply = await _send_and_expect(ws, pack_frame(20, 0.0, two, frames=3), ErrorCode.BAD_FRAME)
            assert reply["seq"] == 20 and "3096 bytes (3 x 258" in reply["message"]
            three = np.stack([keypoints[0], inf, keypoints[1]]).astype("<f4").tobytes()
            reply = await _send_and_expect(ws, pack_frame(21, 0.0, three, frames=3), ErrorCode.BAD_FRAME)
            assert "frame 1 of 3 in this message, index 5" in reply["message"]
            await _send_and_expect(ws, pack_frame(9, 0.0, b"\0" * (MAX_BYTES + 1)), ErrorCode.TOO_BIG)
            # The stream is intact: the real frames give exactly the offline events.
            for i, payload in enumerate(good):
                await ws.send(pack_frame(100 + i, i / 30, payload))
            await ws.send(json.dumps({"type": "end"}))
            return await read_all(ws)

    messages, code, _ = asyncio.run(main())
    ends = [{k: v for k, v in m.items() if k != "stream_id"} for m in messages if m["type"] == "gesture_end"]
    assert ends == expected(tiny_runtime, keypoints)
    final = messages[-1]
    assert final["type"] == "end" and final["frames_processed"] == len(good)
    assert code == CloseCode.NORMAL


def test_images_are_one_per_message(server) -> None:
    async def main():
        async with websockets.connect(server.ws) as ws:
            await ws.send(json.dumps({"type": "start", "input": "jpeg"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            reply = await _send_and_expect(ws, pack_frame(3, 0.0, b"\xff\xd8" * 8, frames=2), ErrorCode.BAD_HEADER)
            assert reply["seq"] == 3 and "jpeg messages carry one" in reply["message"]
            await ws.send(json.dumps({"type": "end"}))
            return await read_all(ws)

    messages, code, _ = asyncio.run(main())
    assert messages[-1]["type"] == "end" and messages[-1]["frames_received"] == 0
    assert code == CloseCode.NORMAL


def test_too_many_bad_messages_close_with_1008(server) -> None:
    async def main():
        async with websockets.connect(server.ws) as ws:
            for _ in range(MAX_BAD):
                await ws.send("garbage")
            return await read_all(ws)

    messages, code, _ = asyncio.run(main())
    errors = [m for m in messages if m["type"] == "error"]
    assert len(errors) == MAX_BAD + 1 and errors[-1]["fatal"]
    assert code == CloseCode.PROTOCOL_VIOLATION


def test_features_input_checks_the_dimension(server, tiny_runtime) -> None:
    steps = keypoints_to_steps(synth_keypoints(120, [Gesture(1, 20, 80)], seed=2))
    payloads = [s.astype("<f4").tobytes() for s in steps] + [b"\0" * 12]
    result = asyncio.run(stream_payloads(server.ws, payloads, input_kind="features"))
    errors = result.of("error")
    assert [e["code"] for e in errors] == [ErrorCode.BAD_FRAME] and errors[0]["seq"] == len(steps)
    expected_ends = offline_ends(detect_steps_sync(tiny_runtime, steps, tiny_runtime.card))
    assert result.ends() == expected_ends and len(expected_ends) == 1


def test_ops_endpoints(server) -> None:
    assert httpx.get(f"{server.http}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.http}/readyz").json()["status"] == "ready"
    model = httpx.get(f"{server.http}/v1/models").json()["data"][0]
    assert model["id"] == "mgstream-tiny-test" and model["card"]["window_steps"] == 64
    assert model["provider"] == "CPUExecutionProvider" and model["hop_steps"] == 4
    assert set(model["input_kinds"]) == {"jpeg", "png", "keypoints", "features"}
    text = httpx.get(f"{server.http}/metrics").text
    for name in (
        "mgstream_sessions_active",
        "mgstream_batch_size_bucket",
        "mgstream_queue_wait_seconds_bucket",
        "mgstream_inference_seconds_bucket",
        "mgstream_featurize_seconds_bucket",
        "mgstream_frame_to_event_seconds_bucket",
        "mgstream_runtime_up 1.0",
        "mgstream_event_loop_lag_seconds_bucket",
    ):
        assert name in text
    lag_count = next(line for line in text.splitlines() if line.startswith("mgstream_event_loop_lag_seconds_count"))
    assert float(lag_count.split()[-1]) > 0  # the watcher has been firing since startup


def test_header_frame_count_round_trips_and_zero_reads_as_one() -> None:
    from service.api.protocol import HEADER_SIZE, unpack_header

    seq, ts, frames, payload = unpack_header(pack_frame(5, 1.5, b"abcd" * 3, frames=3))
    assert (seq, ts, frames, bytes(payload)) == (5, 1.5, 3, b"abcd" * 3)
    legacy = struct.pack("<BBHId", 1, 0, 0, 6, 2.0) + b"x"  # the field was reserved and zero
    assert unpack_header(legacy)[2] == 1 and len(legacy) == HEADER_SIZE + 1
    for bad in (0, 70_000):
        with pytest.raises(ValueError, match="frames per message"):
            pack_frame(0, 0.0, b"", frames=bad)
