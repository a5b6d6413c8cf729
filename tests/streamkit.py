"""Test kit for the streaming server: a tiny real ONNX detector, synthetic keypoints, a uvicorn process.

The tiny detector is a genuine contract-conforming window model built with ``onnx.helper``: causal,
dynamic batch, fixed window, metadata card. It scores class 1 while the left hand is visible and
class 2 while the right hand is visible, and its start offsets count how long the hand has been up
(causally), so streamed events have meaningful bounds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from service.contract.features import (
    FRAME_DIM,
    HAND_DIM,
    KEYPOINT_DIM,
    LEFT_HAND_OFFSET,
    POSE_LANDMARKS,
    RIGHT_HAND_OFFSET,
    FeatureSpec,
)
from service.contract.model_card import ModelCard, PostProcess

REPO = Path(__file__).resolve().parent.parent
TINY_WINDOW = 64
TINY_STRIDES = (1, 2, 4, 8)
LEFT_FLAG = FRAME_DIM - 2  # presence flags sit at the end of the frame-feature mean half
RIGHT_FLAG = FRAME_DIM - 1


def tiny_card(window_steps: int = TINY_WINDOW, strides: tuple[int, ...] = TINY_STRIDES) -> ModelCard:
    return ModelCard(
        name="mgstream-tiny-test",
        version="0.0.1",
        created="2026-11-30T00:00:00Z",
        feature=FeatureSpec(),
        window_steps=window_steps,
        strides=strides,
        causal=True,
        postprocess=PostProcess(score_threshold=0.6, nms_iou=0.5, min_duration_steps=1.0),
        architecture={"kind": "hand-presence test detector"},
        training_data="none (hand-set weights)",
    )


def build_tiny_model(path: Path, card: ModelCard | None = None, *, poison_above: float | None = None) -> Path:
    """Write the tiny detector to ``path`` and return it.

    With ``poison_above``, inference fails inside ONNX Runtime (a Reshape to an impossible shape)
    whenever a batch holds a feature larger than that value: a real runtime failure on demand."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    card = card or tiny_card()
    w, d = card.window_steps, card.feature.feature_dim
    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    const("flag_idx", np.array([LEFT_FLAG, RIGHT_FLAG], dtype=np.int64))
    const("other_idx", np.arange(card.num_classes - 2, dtype=np.int64))
    const("axis2", np.array([2], dtype=np.int64))
    const("pos1", np.arange(1, w + 1, dtype=np.float32))
    const("pos1_col", np.arange(1, w + 1, dtype=np.float32)[:, None])
    const("causal", np.tril(np.ones((w, w), dtype=np.float32)))
    for name, val in {
        "gain": 12.0,
        "bias": -6.0,
        "ramp": 0.05,
        "cap": 40.0,
        "ow": 0.01,
        "ob": -8.0,
        "zero": 0.0,
        "one": 1.0,
        "half": 0.5,
    }.items():
        const(name, np.array(val, dtype=np.float32))
    nodes += [
        helper.make_node("Gather", ["features", "flag_idx"], ["flags"], axis=2),  # (B, W, 2)
        # Run length of each hand up to every step, causally: t + 1 - (last step without the hand + 1).
        helper.make_node("Greater", ["flags", "half"], ["on_b"]),
        helper.make_node("Cast", ["on_b"], ["on"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "on"], ["off"]),
        helper.make_node("Mul", ["off", "pos1_col"], ["off_pos"]),  # (B, W, 2): t + 1 where the hand is down
        helper.make_node("Transpose", ["off_pos"], ["off_t"], perm=[0, 2, 1]),
        helper.make_node("Unsqueeze", ["off_t", "axis2"], ["off_u"]),  # (B, 2, 1, W)
        helper.make_node("Mul", ["off_u", "causal"], ["off_m"]),  # (B, 2, W, W): only steps <= t
        helper.make_node("ReduceMax", ["off_m"], ["last_off"], axes=[3], keepdims=0),
        helper.make_node("Sub", ["pos1", "last_off"], ["run_t"]),
        helper.make_node("Transpose", ["run_t"], ["counts"], perm=[0, 2, 1]),  # (B, W, 2)
    ]
    score_parts, offset_parts = [], []
    for s in card.strides:
        a = f"s{s}"
        const(f"{a}_idx", np.arange(s - 1, w, s, dtype=np.int64))  # anchor i of stride s sits at (i+1)s-1
        nodes += [
            helper.make_node("Gather", ["flags", f"{a}_idx"], [f"{a}_f"], axis=1),
            helper.make_node("Gather", ["counts", f"{a}_idx"], [f"{a}_c"], axis=1),
            helper.make_node("Gather", ["features", f"{a}_idx"], [f"{a}_x"], axis=1),
            helper.make_node("Gather", [f"{a}_x", "other_idx"], [f"{a}_xo"], axis=2),
            helper.make_node("Mul", [f"{a}_f", "gain"], [f"{a}_g"]),
            helper.make_node("Add", [f"{a}_g", "bias"], [f"{a}_gb"]),
            helper.make_node("Min", [f"{a}_c", "cap"], [f"{a}_cc"]),
            helper.make_node("Mul", [f"{a}_cc", "ramp"], [f"{a}_r"]),
            helper.make_node("Add", [f"{a}_gb", f"{a}_r"], [f"{a}_lr"]),  # (B, Ns, 2) logits of classes 1, 2
            helper.make_node("Mul", [f"{a}_xo", "ow"], [f"{a}_o1"]),
            helper.make_node("Add", [f"{a}_o1", "ob"], [f"{a}_other"]),  # (B, Ns, C-2) low logits
            helper.make_node("Concat", [f"{a}_lr", f"{a}_other"], [f"{a}_logits"], axis=2),
            helper.make_node("ReduceMax", [f"{a}_c"], [f"{a}_run"], axes=[2], keepdims=1),
            helper.make_node("Sub", [f"{a}_run", "one"], [f"{a}_run1"]),
            helper.make_node("Relu", [f"{a}_run1"], [f"{a}_start"]),  # the run began run - 1 steps back
            helper.make_node("Mul", [f"{a}_start", "zero"], [f"{a}_z"]),
            helper.make_node("Add", [f"{a}_z", "one"], [f"{a}_end"]),
            helper.make_node("Concat", [f"{a}_start", f"{a}_end"], [f"{a}_off"], axis=2),
        ]
        score_parts.append(f"{a}_logits")
        offset_parts.append(f"{a}_off")
    nodes += [
        helper.make_node("Concat", score_parts, ["logits"], axis=1),
        helper.make_node("Sigmoid", ["logits"], ["scores" if poison_above is None else "clean_scores"]),
        helper.make_node("Concat", offset_parts, ["offsets"], axis=1),
    ]
    n = card.num_anchors
    if poison_above is not None:
        # scores = Reshape(clean, [-1, rows, C]) with rows = n (the identity) or n + 1 when the batch
        # holds a poisoned value: B * n * C elements never fill rows of n + 1 anchors (B < n + 1).
        const("poison_at", np.array(poison_above, dtype=np.float32))
        const("minus_one", np.array([-1], dtype=np.int64))
        const("anchors_n", np.array([n], dtype=np.int64))
        const("classes_c", np.array([card.num_classes], dtype=np.int64))
        nodes += [
            helper.make_node("ReduceMax", ["features"], ["peak"], keepdims=0),
            helper.make_node("Greater", ["peak", "poison_at"], ["poisoned"]),
            helper.make_node("Cast", ["poisoned"], ["extra"], to=TensorProto.INT64),
            helper.make_node("Add", ["anchors_n", "extra"], ["rows"]),
            helper.make_node("Concat", ["minus_one", "rows", "classes_c"], ["shape"], axis=0),
            helper.make_node("Reshape", ["clean_scores", "shape"], ["scores"]),
        ]
    graph = helper.make_graph(
        nodes,
        "mgstream_tiny",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", w, d])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", n, card.num_classes]),
            helper.make_tensor_value_info("offsets", TensorProto.FLOAT, ["batch", n, 2]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mgstream-tests")
    model.ir_version = 8
    for key, value in card.to_metadata().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------- synthetic keypoints


@dataclass(frozen=True)
class Gesture:
    class_id: int  # 1: left hand up, 2: right hand up (what the tiny model detects)
    start_frame: int
    end_frame: int  # exclusive


def synth_keypoints(n_frames: int, gestures: list[Gesture], seed: int = 0) -> np.ndarray:
    """(n_frames, 258) canonical keypoints of a seated person; a hand is visible only during its gestures."""
    rng = np.random.default_rng(seed)
    kp = np.full((n_frames, KEYPOINT_DIM), np.nan, dtype=np.float32)
    base = np.stack(
        [
            rng.uniform(0.35, 0.65, POSE_LANDMARKS),
            rng.uniform(0.2, 0.8, POSE_LANDMARKS),
            np.zeros(POSE_LANDMARKS),
            np.full(POSE_LANDMARKS, 0.9),
        ],
        axis=1,
    ).astype(np.float32)
    base[11, :2], base[12, :2] = (0.6, 0.45), (0.4, 0.45)  # shoulders
    for t in range(n_frames):
        pose = base.copy()
        pose[:, :2] += rng.normal(0, 0.002, (POSE_LANDMARKS, 2))
        kp[t, : POSE_LANDMARKS * 4] = pose.reshape(-1)
    for g in gestures:
        offset = LEFT_HAND_OFFSET if g.class_id == 1 else RIGHT_HAND_OFFSET
        centre = (0.62, 0.3) if g.class_id == 1 else (0.38, 0.3)
        for t in range(max(0, g.start_frame), min(n_frames, g.end_frame)):
            hand = np.zeros((HAND_DIM // 3, 3), dtype=np.float32)
            hand[:, 0] = centre[0] + rng.normal(0, 0.01, HAND_DIM // 3)
            hand[:, 1] = centre[1] + rng.normal(0, 0.01, HAND_DIM // 3)
            kp[t, offset : offset + HAND_DIM] = hand.reshape(-1)
    return kp


def random_gestures(n_frames: int, seed: int, count: int = 3, min_len: int = 30, max_len: int = 90) -> list[Gesture]:
    """Non-overlapping hand gestures spread over the sequence, different per seed."""
    rng = np.random.default_rng(seed)
    slot = n_frames // count
    out = []
    for i in range(count):
        length = int(rng.integers(min_len, max_len))
        start = i * slot + int(rng.integers(10, max(11, slot - length - 10)))
        out.append(Gesture(int(rng.integers(1, 3)), start, min(start + length, n_frames)))
    return out


# ---------------------------------------------------------------- server process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/streams"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics (``labels`` e.g. ``reason="lag"``); 0.0 when absent."""
        text = httpx.get(f"{self.http}/metrics", timeout=10).text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0


@contextlib.contextmanager
def run_server(
    model: Path, tmp: Path, env: dict[str, str] | None = None, timeout: float = 60.0
) -> Iterator[ServerProcess]:
    """``mgstream serve`` on a free loopback port, waited on /readyz, stopped with SIGTERM."""
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        str(model),
        "--data-dir",
        str(tmp / "data"),
    ]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, port, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.http}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready within {timeout} s:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- WebSocket clients


@dataclass
class StreamResult:
    messages: list[dict]
    close_code: int | None
    close_reason: str

    def of(self, *types: str) -> list[dict]:
        return [m for m in self.messages if m["type"] in types]

    def ends(self) -> list[dict]:
        """gesture_end events without the stream id (comparable with offline events)."""
        return [{k: v for k, v in m.items() if k != "stream_id"} for m in self.of("gesture_end")]


def keypoint_payloads(kp: np.ndarray) -> list[bytes]:
    return [frame.astype("<f4").tobytes() for frame in kp]


def offline_ends(events) -> list[dict]:
    """Offline StreamEvents as the wire would carry them (minus the stream id)."""
    import json

    out = []
    for e in events:
        if e.type == "gesture_end":
            data = json.loads(e.to_message("offline").model_dump_json())
            data.pop("stream_id")
            out.append(data)
    return out


async def read_all(ws) -> tuple[list[dict], int | None, str]:  # noqa: ANN001 - websockets connection
    import json

    import websockets

    messages = []
    try:
        async for raw in ws:
            messages.append(json.loads(raw))
    except websockets.ConnectionClosed:
        pass
    return messages, ws.close_code, ws.close_reason or ""


async def stream_payloads(
    url: str,
    payloads: list[bytes],
    *,
    input_kind: str = "keypoints",
    fps: float = 30.0,
    pace: bool = False,
    start: dict | None = None,
    headers: dict | None = None,
    frames_per_message: int = 1,
) -> StreamResult:
    """One client: start, every payload with its header (optionally at real-time pace), end, read all.

    ``frames_per_message`` > 1 joins that many consecutive payloads (keypoint frames or feature
    steps) into one message, sent when its last frame is due."""
    import asyncio
    import json

    import websockets

    from service.api.protocol import pack_frame

    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "input": input_kind, "fps": fps, **(start or {})}))
        reader = asyncio.ensure_future(read_all(ws))
        t0 = time.monotonic()
        for i in range(0, len(payloads), frames_per_message):
            group = payloads[i : i + frames_per_message]
            if pace:
                delay = t0 + (i + len(group) - 1) / fps - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await ws.send(pack_frame(i, i / fps, b"".join(group), len(group)))
        await ws.send(json.dumps({"type": "end"}))
        messages, code, reason = await asyncio.wait_for(reader, 120)
    return StreamResult(messages, code, reason)
