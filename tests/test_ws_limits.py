"""Limits of a real server process: API keys, admission (1013), idle timeout (4408), a vanished client
(no session left behind), and a client that never reads (4429, memory bounded)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import websockets

from service.api.protocol import CloseCode, ErrorCode, pack_frame
from tests.streamkit import Gesture, keypoint_payloads, read_all, run_server, synth_keypoints

KEY = "secret-key-1"
MAX_SESSIONS = 3
AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    env = {
        "MGSTREAM_API_KEYS": json.dumps([KEY]),
        "MGSTREAM_MAX_SESSIONS": str(MAX_SESSIONS),
        "MGSTREAM_IDLE_TIMEOUT_S": "2",
        "MGSTREAM_OUTBOUND_QUEUE_MESSAGES": "8",
        "MGSTREAM_MAX_BAD_MESSAGES": "100000000",
    }
    with run_server(tiny_model, tmp_path_factory.mktemp("srv"), env=env) as srv:
        yield srv


def start(**extra) -> str:
    return json.dumps({"type": "start", "input": "keypoints", **extra})


def wait_for_no_sessions(server, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{server.http}/readyz", timeout=5).json()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{server.http}/readyz", timeout=5).json()["sessions"] == 0
    assert server.metric("mgstream_sessions_active") == 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_api_key_by_header_query_or_start_message(server) -> None:
    async def opens(url: str, headers=None, key_in_start=None) -> tuple[str, int | None]:  # noqa: ANN001
        async with websockets.connect(url, additional_headers=headers) as ws:
            try:  # a refused key may close the socket before `start` is even sent
                await ws.send(start(api_key=key_in_start) if key_in_start else start())
                first = json.loads(await ws.recv())
                if first["type"] == "ready":
                    await ws.send(json.dumps({"type": "end"}))
                    await read_all(ws)
                    return "ready", ws.close_code
                await read_all(ws)
                return first.get("code", first["type"]), ws.close_code
            except websockets.ConnectionClosed:
                pass
            messages, code, _ = await read_all(ws)
            errors = [m["code"] for m in messages if m["type"] == "error"]
            return (errors[0] if errors else "none"), code

    assert asyncio.run(opens(server.ws, headers=AUTH)) == ("ready", CloseCode.NORMAL)
    assert asyncio.run(opens(f"{server.ws}?api_key={KEY}")) == ("ready", CloseCode.NORMAL)
    assert asyncio.run(opens(server.ws, key_in_start=KEY)) == ("ready", CloseCode.NORMAL)
    assert asyncio.run(opens(server.ws)) == (ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED)
    assert asyncio.run(opens(server.ws, key_in_start="wrong")) == (ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED)
    assert asyncio.run(opens(server.ws, headers={"X-API-Key": "wrong"})) == (
        ErrorCode.UNAUTHORIZED,
        CloseCode.UNAUTHORIZED,
    )
    assert httpx.get(f"{server.http}/v1/models").status_code == 401
    assert httpx.get(f"{server.http}/v1/models", headers=AUTH).status_code == 200
    wait_for_no_sessions(server)


def test_admission_beyond_max_sessions_is_refused_with_1013(server) -> None:
    async def main():
        held = [await websockets.connect(server.ws, additional_headers=AUTH) for _ in range(MAX_SESSIONS)]
        for ws in held:
            await ws.send(start())
            assert json.loads(await ws.recv())["type"] == "ready"
        async with websockets.connect(server.ws, additional_headers=AUTH) as extra:
            refused = await read_all(extra)
        for ws in held:
            await ws.close()
        return refused

    before = server.metric("mgstream_rejections_total", 'reason="overloaded"')
    messages, code, reason = asyncio.run(main())
    assert code == CloseCode.OVERLOADED and "capacity" in reason
    assert messages == [
        {
            "type": "error",
            "stream_id": None,
            "code": ErrorCode.OVERLOADED,
            "message": reason,
            "fatal": True,
            "seq": None,
        }
    ]
    assert server.metric("mgstream_rejections_total", 'reason="overloaded"') == before + 1
    wait_for_no_sessions(server)


def test_idle_stream_is_closed_with_4408(server) -> None:
    async def main():
        async with websockets.connect(server.ws, additional_headers=AUTH) as ws:
            await ws.send(start())
            return await read_all(ws)  # sends nothing more

    messages, code, _ = asyncio.run(main())
    assert code == CloseCode.IDLE_TIMEOUT
    assert messages[0]["type"] == "ready" and messages[-1]["fatal"]
    wait_for_no_sessions(server)


def test_vanished_client_leaves_no_session_behind(server) -> None:
    payloads = keypoint_payloads(synth_keypoints(200, [Gesture(1, 20, 150)], seed=1))

    async def main():
        ws = await websockets.connect(server.ws, additional_headers=AUTH)
        await ws.send(start())
        await ws.recv()
        for i, p in enumerate(payloads):
            await ws.send(pack_frame(i, i / 30, p))
        ws.transport.abort()  # no close frame: the client just disappears mid-stream

    asyncio.run(main())
    wait_for_no_sessions(server)


def test_client_that_never_reads_is_closed_with_memory_bounded(server) -> None:
    """Every corrupt frame earns an `error` (a final message, never dropped); the client reads none of
    them, so the server's outbox fills and the stream is closed with 4429 instead of growing."""
    rss_before = rss_kib(server.proc.pid)
    sent = 0

    async def main() -> None:
        nonlocal sent
        ws = await websockets.connect(server.ws, additional_headers=AUTH, max_queue=1)
        await ws.send(start())
        try:
            while sent < 400_000 and not server.metric("mgstream_errors_total", 'kind="slow_consumer"'):
                for _ in range(2000):
                    await ws.send(b"\x01\x00")  # a truncated header each time
                    sent += 1
        except websockets.ConnectionClosed:
            pass
        ws.transport.abort()

    asyncio.run(main())
    assert server.metric("mgstream_errors_total", 'kind="slow_consumer"') == 1
    wait_for_no_sessions(server)
    growth_mib = (rss_kib(server.proc.pid) - rss_before) / 1024
    assert growth_mib < 64, f"server grew by {growth_mib:.0f} MiB after {sent} unread errors"
    assert "4429 client does not read its events" in server.log()


def _negotiated_extensions(url: str) -> str | None:
    async def go() -> str | None:
        async with websockets.connect(url, additional_headers=AUTH, compression="deflate") as ws:
            return ws.response.headers.get("Sec-WebSocket-Extensions")

    return asyncio.run(go())


def _served(server) -> tuple[dict, dict]:
    """The `threads` and `websocket` blocks of /v1/models."""
    model = httpx.get(f"{server.http}/v1/models", headers=AUTH, timeout=10).json()["data"][0]
    return model["threads"], model["websocket"]


def test_compression_and_threading_follow_the_settings(server, tiny_model, tmp_path: Path) -> None:
    assert _negotiated_extensions(server.ws) is None  # binary frames: deflate would cost CPU for ~4 %
    threads, websocket = _served(server)
    assert websocket == {"implementation": "websockets-sansio", "compression": False}
    assert threads == {
        "intra_op": 1,
        "intra_op_spinning": False,
        "gil_switch_interval_ms": 0.5,
        "gc_threshold": [50_000, 10, 10],
    }
    env = {
        "MGSTREAM_API_KEYS": json.dumps([KEY]),
        "MGSTREAM_WS_COMPRESSION": "true",
        "MGSTREAM_INTRA_OP_THREADS": "2",
        "MGSTREAM_GIL_SWITCH_INTERVAL_MS": "2",
        "MGSTREAM_GC_GEN0_THRESHOLD": "1000",
        "MGSTREAM_WS_PROTOCOL": "websockets",
    }
    with run_server(tiny_model, tmp_path, env=env) as srv:
        assert "permessage-deflate" in (_negotiated_extensions(srv.ws) or "")
        threads, websocket = _served(srv)
        assert websocket == {"implementation": "websockets", "compression": True}
        assert threads == {
            "intra_op": 2,
            "intra_op_spinning": False,
            "gil_switch_interval_ms": 2.0,
            "gc_threshold": [1000, 10, 10],
        }
