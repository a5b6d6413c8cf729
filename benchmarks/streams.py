"""Streaming benchmark: N concurrent loopback clients at real-time pace against `mgstream serve`.

Per N it prints p50/p99 frame-to-event latency (client-side: from sending the frame that completed
the deciding window to receiving the event), the frame drop rate and the server's CPU use, and
stops past saturation (drops above 1 % or p99 above 1 s). It then compares stream-steps per second
of batched ONNX Runtime against per-stream torch eager for the same architecture, in the same run.

    .venv/bin/python benchmarks/streams.py --clients 1,10,20,40,80 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.api.protocol import pack_frame  # noqa: E402
from service.config import DEFAULT_MODEL  # noqa: E402
from tests.streamkit import Gesture, build_tiny_model, run_server, synth_keypoints  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def busy_sequence(frames: int, seed: int) -> np.ndarray:
    """A gesture every ~2 s, alternating hands, so events (and latency samples) come often."""
    gestures, t, cls = [], 15 + seed % 20, 1 + seed % 2
    while t + 40 < frames:
        gestures.append(Gesture(cls, t, t + 30))
        t, cls = t + 60, 3 - cls
    return synth_keypoints(frames, gestures, seed=seed)


async def one_client(url: str, kp: np.ndarray, fps: float, seed: int) -> dict:
    import websockets

    sent_at = np.zeros(len(kp))
    latencies: list[float] = []
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "input": "keypoints", "fps": fps}))

        async def reader() -> dict:
            end = {}
            async for raw in ws:
                msg = json.loads(raw)
                if msg["type"] in ("gesture_start", "gesture_end"):
                    frame = msg["decided_at_frame"] - 1
                    if 0 <= frame < len(sent_at) and sent_at[frame]:
                        latencies.append(time.perf_counter() - sent_at[frame])
                elif msg["type"] == "end":
                    end = msg
            return end

        task = asyncio.ensure_future(reader())
        payloads = [f.astype("<f4").tobytes() for f in kp]
        t0 = time.perf_counter() + (seed % 30) / fps  # spread the clients' phases
        for i, payload in enumerate(payloads):
            delay = t0 + i / fps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent_at[i] = time.perf_counter()
            await ws.send(pack_frame(i, i / fps, payload))
        await ws.send(json.dumps({"type": "end"}))
        end = await asyncio.wait_for(task, 120)
    return {"latencies": latencies, "received": end.get("frames_received", 0), "dropped": end.get("frames_dropped", 0)}


async def _clients(url: str, ids: list[int], seconds: float, fps: float) -> list[dict]:
    frames = int(seconds * fps)
    return await asyncio.gather(*(one_client(url, busy_sequence(frames, i), fps, i) for i in ids))


def _client_process(args: tuple) -> list[dict]:
    return asyncio.run(_clients(*args))


def run_level(url: str, n: int, seconds: float, fps: float, processes: int) -> list[dict]:
    """Clients spread over several processes, so one client event loop is not the bottleneck."""
    import multiprocessing

    groups = [list(range(i, n, processes)) for i in range(min(processes, n))]
    with multiprocessing.get_context("spawn").Pool(len(groups)) as pool:
        parts = pool.map(_client_process, [(url, g, seconds, fps) for g in groups])
    return [r for part in parts for r in part]


def stream_benchmark(model: Path, levels: list[int], seconds: float, fps: float, processes: int) -> None:
    print(
        f"\n## Live streams ({seconds:g} s each, {fps:g} fps keypoints, model {model.name}, "
        f"clients in {processes} processes on the same machine)"
    )
    print("| streams | events | p50 ms | p99 ms | drop % | server CPU (cores) |")
    print("|---:|---:|---:|---:|---:|---:|")
    with (
        tempfile.TemporaryDirectory() as tmp,
        run_server(model, Path(tmp), env={"MGSTREAM_MAX_SESSIONS": "4096"}) as srv,
    ):
        for n in levels:
            cpu0, t0 = cpu_seconds(srv.proc.pid), time.monotonic()
            results = run_level(srv.ws, n, seconds, fps, processes)
            cores = (cpu_seconds(srv.proc.pid) - cpu0) / (time.monotonic() - t0)
            lat = np.concatenate([r["latencies"] for r in results]) * 1000 if results else np.zeros(0)
            received = sum(r["received"] for r in results)
            drop = 100 * sum(r["dropped"] for r in results) / max(received, 1)
            p50, p99 = (np.percentile(lat, 50), np.percentile(lat, 99)) if lat.size else (np.nan, np.nan)
            print(f"| {n} | {lat.size} | {p50:.1f} | {p99:.1f} | {drop:.2f} | {cores:.2f} |", flush=True)
            if drop > 1.0 or p99 > 1000:
                print(f"\nsaturated at {n} streams (drops {drop:.2f} %, p99 {p99:.0f} ms)")
                break


def throughput_benchmark(window: int, batch: int, seconds: float) -> None:
    """Stream-steps/s: batched ONNX Runtime vs per-stream torch eager, same architecture and weights."""
    try:
        import torch

        from models.detector import Detector
        from models.export import build_card, export_onnx
        from models.nn.config import ModelConfig
        from service.contract.model_card import PostProcess
        from service.runtime.onnx import OnnxModelRuntime
    except ImportError as exc:
        print(f"\n(torch comparison skipped: {exc})")
        return
    torch.manual_seed(0)
    model = Detector(ModelConfig(window_steps=window)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        card = build_card(model, PostProcess(), meta={}, name="bench")
        path = export_onnx(model, Path(tmp) / "bench.onnx", card)
        runtime = OnnxModelRuntime(path, ["CPUExecutionProvider"])
        hop = 4
        x = np.random.default_rng(0).normal(size=(batch, window, 372)).astype(np.float32)

        def rate(fn, windows_per_call: int) -> float:
            fn()
            calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                fn()
                calls += 1
            return calls * windows_per_call * hop / (time.perf_counter() - t0)

        onnx_rate = rate(lambda: runtime.run({"features": x}), batch)
        xt = torch.from_numpy(x[:1])
        with torch.inference_mode():
            torch_rate = rate(lambda: model.predict(xt), 1)
    print(f"\n## Detector throughput (W={window}, hop={hop} steps, default architecture, 2 threads)")
    print("| path | stream-steps/s | live streams at 7.5 steps/s |")
    print("|---|---:|---:|")
    for name, r in ((f"ONNX Runtime, batches of {batch}", onnx_rate), ("torch eager, one stream per call", torch_rate)):
        print(f"| {name} | {r:,.0f} | {r / 7.5:,.0f} |")
    print(f"\nbatched ONNX / per-stream torch: {onnx_rate / torch_rate:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model, else a tiny one")
    parser.add_argument("--clients", default="1,10,20,40,80,160")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--window", type=int, default=128, help="window of the throughput comparison")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    model = args.model or (DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None)
    with tempfile.TemporaryDirectory() as tmp:
        model = model or build_tiny_model(Path(tmp) / "tiny.onnx")
        stream_benchmark(
            model, [int(n) for n in args.clients.split(",")], args.seconds, args.fps, args.client_processes
        )
    if not args.skip_torch:
        throughput_benchmark(args.window, args.batch, seconds=5.0)


if __name__ == "__main__":
    main()
