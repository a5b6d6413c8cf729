"""The Python client and the ``mgstream stream`` CLI against a real server (uvicorn subprocess, loopback).

The server runs the tiny hand-presence detector from ``tests/streamkit.py``: class 1 while the left hand is
visible, class 2 while the right hand is. So synthetic keypoints with known hand intervals give known events.
The webcam path is exercised with a video file opened by the same ``cv2.VideoCapture`` call a camera uses.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from client import (
    Reconnect,
    Reconnected,
    StreamClosed,
    StreamRefused,
    connect,
    connect_sync,
)
from client.batch import BatchClient
from service.api.protocol import (
    CloseCode,
    EndedMessage,
    ErrorMessage,
    GestureEvent,
    ReadyMessage,
    StatusMessage,
)
from tests.clientkit import serve, stop
from tests.streamkit import REPO, Gesture, build_tiny_model, free_port, run_server, synth_keypoints

API_KEY = "test-key-123"
FPS = 30.0
# Two well separated hand-up intervals: a left-hand gesture (class 1), then a right-hand one (class 2).
GESTURES = [Gesture(1, 20, 60), Gesture(2, 90, 130)]
N_FRAMES = 150
# Library tests send at 3x real time: fast, yet far below what the server keeps up with, so the live
# policy drops nothing and the events are exact. (Unpaced floods make the server drop frames, by design.)
SEND_RATE = 3 * FPS


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with run_server(model, tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def guarded(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A server with an API key and room for a single stream."""
    env = {"MGSTREAM_API_KEYS": json.dumps([API_KEY]), "MGSTREAM_MAX_SESSIONS": "1"}
    with run_server(model, tmp_path_factory.mktemp("guarded"), env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def keypoints() -> np.ndarray:
    return synth_keypoints(N_FRAMES, GESTURES, seed=3)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 s at 15 fps of the astronaut photo drifting a few pixels: a stand-in for a webcam."""
    from skimage.data import astronaut

    base = cv2.resize(cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR), (320, 320))
    path = tmp_path_factory.mktemp("video") / "camera.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 15.0, (320, 320))
    for i in range(45):
        shift = np.float32([[1, 0, 4 * np.sin(i / 5)], [0, 1, 2 * np.cos(i / 7)]])
        writer.write(cv2.warpAffine(base, shift, (320, 320), borderMode=cv2.BORDER_REFLECT))
    writer.release()
    assert cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FRAME_COUNT) == 45
    return path


def _ends(events: list) -> list[GestureEvent]:
    return [e for e in events if isinstance(e, GestureEvent) and e.type == "gesture_end"]


def _assert_found_the_gestures(ends: list[GestureEvent]) -> None:
    """Each synthetic gesture is reported by an event of its class overlapping its true interval."""
    assert {e.class_id for e in ends} == {g.class_id for g in GESTURES}
    for truth in GESTURES:
        assert any(
            e.class_id == truth.class_id and e.start_frame < truth.end_frame and e.end_frame > truth.start_frame
            for e in ends
        ), (truth, ends)
    assert all(e.label and 0.0 < e.score <= 1.0 for e in ends)


class _Pacer:
    """Sleeps so that message i leaves at i / rate seconds after the first."""

    def __init__(self, rate: float) -> None:
        self.rate, self.start, self.count = rate, time.monotonic(), 0

    def delay(self) -> float:
        self.count += 1
        return max(0.0, self.start + self.count / self.rate - time.monotonic())


# ---------------------------------------------------------------- async and sync library


async def _stream_keypoints(url: str, kp: np.ndarray, **options) -> tuple[list, EndedMessage | None]:
    async with connect(url, input="keypoints", fps=FPS, **options) as stream:
        assert stream.ready is not None and stream.ready.keypoint_dim == kp.shape[1]
        pacer = _Pacer(SEND_RATE)
        for frame in kp:
            await stream.send_keypoints(frame)
            await asyncio.sleep(pacer.delay())
        ended = await stream.end()
        assert stream.active == {}  # every start got its end
        return [event async for event in stream], ended


def test_async_client_streams_keypoints_and_gets_events(server, keypoints: np.ndarray) -> None:
    events, ended = asyncio.run(_stream_keypoints(server.http, keypoints, stream_id="async-1"))
    assert isinstance(events[0], ReadyMessage) and events[0].stream_id == "async-1"
    assert ended is not None and ended.frames_received == N_FRAMES and ended.stream_id == "async-1"
    assert ended.frames_dropped == 0
    _assert_found_the_gestures(_ends(events))
    starts = {e.event_id: e for e in events if isinstance(e, GestureEvent) and e.type == "gesture_start"}
    assert set(starts) == {e.event_id for e in _ends(events)}
    assert all(e.stream_id == "async-1" for e in events if isinstance(e, GestureEvent))
    assert isinstance(events[-1], EndedMessage)


def test_async_client_sends_a_steps_frames_in_one_message(server, keypoints: np.ndarray) -> None:
    async def run() -> tuple[list, list, EndedMessage | None]:
        async with connect(server.http, input="keypoints", fps=FPS) as stream:
            assert stream.ready is not None
            per = stream.ready.frames_per_step
            pacer = _Pacer(SEND_RATE / per)
            seqs = []
            for i in range(0, len(keypoints), per):
                seqs.append(await stream.send_keypoints(keypoints[i : i + per]))
                await asyncio.sleep(pacer.delay())
            assert stream.frames_sent == len(keypoints)
            ended = await stream.end()
            return seqs, [e async for e in stream], ended

    seqs, events, ended = asyncio.run(run())
    assert seqs == list(range(0, len(keypoints), 4))  # each message's seq is its first frame's
    assert ended is not None and ended.frames_received == N_FRAMES and ended.frames_dropped == 0
    one_by_one, _ = asyncio.run(_stream_keypoints(server.http, keypoints))
    assert [e.model_dump(exclude={"stream_id"}) for e in _ends(events)] == [
        e.model_dump(exclude={"stream_id"}) for e in _ends(one_by_one)
    ]
    _assert_found_the_gestures(_ends(events))


def test_sync_client_polls_while_sending(server, keypoints: np.ndarray) -> None:
    seen = []
    with connect_sync(server.ws, input="keypoints", fps=FPS, status_every_s=0.2) as stream:
        pacer = _Pacer(SEND_RATE)
        for i, frame in enumerate(keypoints):
            assert stream.send_keypoints(frame) == i  # seq numbers count from 0
            seen += stream.poll()
            time.sleep(pacer.delay())
        ended = stream.end()
        seen += list(stream.events(timeout=10))
    assert ended is not None and ended.frames_received == N_FRAMES and ended.frames_dropped == 0
    _assert_found_the_gestures(_ends(seen))
    assert any(isinstance(e, StatusMessage) for e in seen)


def test_client_side_validation(server) -> None:
    async def run() -> None:
        async with connect(server.http, input="keypoints") as stream:
            with pytest.raises(ValueError, match=r"shape \(258,\) or \(n, 258\)"):
                await stream.send_keypoints(np.zeros(10, np.float32))
            with pytest.raises(ValueError, match=r"got \(2, 3, 258\)"):
                await stream.send_keypoints(np.zeros((2, 3, 258), np.float32))
            with pytest.raises(ValueError, match="input='keypoints'"):
                await stream.send_jpeg(b"\xff\xd8")
            assert stream.frames_sent == 0

    asyncio.run(run())


def test_bad_frame_gets_an_error_and_the_stream_goes_on(server, keypoints: np.ndarray) -> None:
    async def run() -> tuple[list, EndedMessage | None]:
        async with connect(server.http, input="jpeg", fps=10) as stream:
            await stream.send_jpeg(b"this is not a jpeg")
            ok, buf = cv2.imencode(".jpg", np.full((120, 160, 3), 127, np.uint8))
            await stream.send_jpeg(buf.tobytes())
            ended = await stream.end()
            return [e async for e in stream], ended

    events, ended = asyncio.run(run())
    errors = [e for e in events if isinstance(e, ErrorMessage)]
    assert errors and errors[0].code == "bad_frame" and not errors[0].fatal
    assert ended is not None and ended.frames_received == 2


def test_feature_steps_stream(server, keypoints: np.ndarray) -> None:
    """Clients that compute features themselves send one step per message (frames_per_step frames each)."""
    from service.contract.features import keypoints_to_steps

    steps = keypoints_to_steps(keypoints)

    async def run() -> tuple[list, EndedMessage | None]:
        async with connect(server.http, input="features", fps=FPS) as stream:
            assert stream.ready is not None and stream.ready.feature_dim == steps.shape[1]
            pacer = _Pacer(SEND_RATE / stream.ready.frames_per_step)
            for step in steps:
                await stream.send_features(step)
                await asyncio.sleep(pacer.delay())
            ended = await stream.end()
            return [e async for e in stream], ended

    events, ended = asyncio.run(run())
    assert ended is not None and ended.frames_received == len(steps)
    _assert_found_the_gestures(_ends(events))


def test_rejected_start_is_refused_with_the_servers_reason(server) -> None:
    with pytest.raises(StreamRefused) as info:
        connect_sync(server.http, input="keypoints", classes=[99])
    assert info.value.error == "bad_message" and "classes" in info.value.reason
    assert not info.value.retryable


def test_unreachable_server_is_refused_without_code() -> None:
    port = free_port()  # nothing listens there

    async def run() -> None:
        await connect(f"127.0.0.1:{port}", input="keypoints")

    with pytest.raises(StreamRefused) as info:
        asyncio.run(run())
    assert info.value.code is None and "cannot connect" in info.value.reason and info.value.retryable


# ---------------------------------------------------------------- refusals: auth and overload


def test_missing_or_wrong_key_is_unauthorized(guarded) -> None:
    for key in (None, "wrong"):
        with pytest.raises(StreamRefused) as info:
            connect_sync(guarded.http, api_key=key, input="keypoints")
        assert info.value.code == CloseCode.UNAUTHORIZED, info.value
        assert not info.value.retryable


def test_overload_is_refused_with_1013(guarded, keypoints: np.ndarray) -> None:
    with connect_sync(guarded.http, api_key=API_KEY, input="keypoints") as first:
        first.send_keypoints(keypoints[0])
        with pytest.raises(StreamRefused) as info:
            connect_sync(guarded.http, api_key=API_KEY, input="keypoints")
        assert info.value.code == CloseCode.OVERLOADED, info.value
        assert info.value.retryable
    # The slot is free again once the first stream ended.
    with connect_sync(guarded.http, api_key=API_KEY, input="keypoints") as again:
        assert again.ready is not None


def test_cli_reports_refusal(guarded, tmp_path: Path, keypoints: np.ndarray) -> None:
    path = tmp_path / "kp.npy"
    np.save(path, keypoints[:30])
    result = _cli("stream", str(path), "--url", guarded.http, "--api-key", "wrong", "--fast")
    assert result.returncode == 1
    assert "4401" in result.stdout + result.stderr


# ---------------------------------------------------------------- server restarts and drops


def test_reconnects_after_a_server_restart_and_fails_loudly_without(
    model: Path, tmp_path: Path, keypoints: np.ndarray
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = serve(model, port, tmp_path)

    async def run() -> tuple[list, BaseException | None, int]:
        resilient = await connect(
            url, input="keypoints", reconnect=Reconnect(attempts=None, initial_delay_s=0.2, max_delay_s=1)
        )
        fragile = await connect(url, input="keypoints")
        for frame in keypoints[:40]:
            await resilient.send_keypoints(frame)
            await fragile.send_keypoints(frame)
        stop(first)  # killed: no close frame reaches the clients
        fragile_error: BaseException | None = None
        try:
            async for _ in fragile:
                pass
        except StreamClosed as exc:
            fragile_error = exc
        second = await asyncio.to_thread(serve, model, port, tmp_path)
        try:
            events = []
            while not any(isinstance(e, Reconnected) for e in events):
                events.append(await resilient.next_event(timeout=30))
            sent_after = 0
            for frame in keypoints[40:100]:
                sent_after += await resilient.send_keypoints(frame) is not None
            ended = await resilient.end()
            events += [e async for e in resilient]
            assert ended is not None and ended.frames_received == sent_after
            return events, fragile_error, resilient.reconnects
        finally:
            stop(second, signal.SIGTERM)

    events, fragile_error, reconnects = asyncio.run(run())
    assert isinstance(fragile_error, StreamClosed) and fragile_error.code == 1006
    assert reconnects == 1
    reconnected = next(e for e in events if isinstance(e, Reconnected))
    assert reconnected.close_code == 1006 and reconnected.ready.stream_id


# ---------------------------------------------------------------- batch upload through the client


def test_batch_upload_through_the_client(server, keypoints: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "session.npy"
    np.save(path, keypoints)
    with BatchClient(server.http) as api:
        job = api.submit(path)
        job = api.wait(job["id"], timeout=120)
        assert job["state"] == "done"
        detections = api.detections(job["id"])
        paths = api.download_results(job["id"], tmp_path / "out")
    fields = ("class_id", "start_frame", "end_frame", "score", "label")
    _assert_found_the_gestures([SimpleNamespace(**{k: d[k] for k in fields}) for d in detections])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the CLI


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "150"}
    env.pop("DISPLAY", None)  # no preview window in tests
    cmd = [sys.executable, "-m", "service.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_cli_replays_npy_at_real_time_pace(server, keypoints: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "kp.npy"
    np.save(path, keypoints)
    started = time.monotonic()
    result = _cli("stream", str(path), "--url", server.http, "--json")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    messages = _json_lines(result.stdout)
    _assert_found_the_gestures([GestureEvent(**m) for m in messages if m["type"] == "gesture_end"])
    ended = messages[-1]
    assert ended["type"] == "end" and ended["frames_received"] == N_FRAMES and ended["frames_dropped"] == 0
    # Paced, not dumped: 150 frames at 30 fps cannot all be sent before their 5 s of media time.
    assert elapsed >= (N_FRAMES - 1) / FPS
    # --fast sends everything at once; the server's live policy may drop frames, but it accounts for all.
    fast = _cli("stream", str(path), "--url", server.http, "--json", "--fast")
    assert fast.returncode == 0, fast.stderr
    ended = _json_lines(fast.stdout)[-1]
    assert ended["frames_received"] == N_FRAMES
    assert ended["frames_processed"] + ended["frames_dropped"] == N_FRAMES


def test_cli_sends_a_steps_frames_per_message(server, keypoints: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "kp.npy"
    np.save(path, keypoints)
    grouped = _cli("stream", str(path), "--url", server.http, "--json")  # default: one step per message
    single = _cli("stream", str(path), "--url", server.http, "--json", "--frames-per-message", "1")
    assert grouped.returncode == 0 and single.returncode == 0, grouped.stderr + single.stderr
    ends = [
        [{k: v for k, v in m.items() if k != "stream_id"} for m in _json_lines(r.stdout) if m["type"] == "gesture_end"]
        for r in (grouped, single)
    ]
    assert ends[0] and ends[0] == ends[1]
    ended = _json_lines(grouped.stdout)[-1]
    assert ended["frames_received"] == ended["frames_processed"] == N_FRAMES


def test_keypoint_replay_groups_one_feature_step_per_message_by_default(keypoints: np.ndarray, tmp_path: Path) -> None:
    from client.sources import KEYPOINT_DIM, ArraySource

    path = tmp_path / "kp.npy"
    np.save(path, keypoints[:10])

    def shapes(source: ArraySource) -> list[tuple[int, ...]]:
        async def collect() -> list[tuple[int, ...]]:
            return [item.data.shape async for item in source.frames()]

        return asyncio.run(collect())

    auto = ArraySource(path, realtime=False, frames_per_message=0)
    auto.frames_per_step = 4  # what the server's `ready` says
    assert shapes(auto) == [(4, KEYPOINT_DIM), (4, KEYPOINT_DIM), (2, KEYPOINT_DIM)]
    assert shapes(ArraySource(path, realtime=False, frames_per_message=1)) == [(KEYPOINT_DIM,)] * 10
    assert shapes(ArraySource(path, realtime=False, frames_per_message=3))[0] == (3, KEYPOINT_DIM)
    with pytest.raises(ValueError, match="at least 1, or 0"):
        ArraySource(path, frames_per_message=-1)


def test_cli_camera_path_with_a_video_standing_in_for_the_device(server, video: Path) -> None:
    """``--camera`` takes a path through the same cv2.VideoCapture code path as a device index."""
    result = _cli("stream", "--camera", str(video), "--url", server.http, "--fps", "5", "--json", "--no-preview")
    assert result.returncode == 0, result.stderr
    messages = _json_lines(result.stdout)
    assert messages[0]["type"] == "ready" and messages[0]["input"] == "jpeg"
    ended = messages[-1]
    # 3 s of a 15 fps source, subsampled to 5 fps: 15 frames (one more or less at the clip's edges).
    assert ended["type"] == "end" and 14 <= ended["frames_received"] <= 16
    assert ended["frames_processed"] + ended["frames_dropped"] == ended["frames_received"]
    assert any(m["type"] == "status" for m in messages)
    assert "streaming camera" in result.stderr


def test_cli_replays_a_video_file(server, video: Path) -> None:
    result = _cli("stream", str(video), "--url", server.http, "--fast", "--max-width", "160")
    assert result.returncode == 0, result.stderr
    assert "sent 45 frames" in result.stdout
    assert "45 received" in result.stdout


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    assert _cli("stream").returncode == 2  # neither FILE nor --camera
    missing = _cli("stream", str(tmp_path / "nope.mp4"))
    assert missing.returncode == 2 and "does not exist" in missing.stdout
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros(5, np.float32))
    assert _cli("stream", str(bad)).returncode == 2
