"""Streaming benchmark: N concurrent loopback keypoint clients at real-time pace against `mgstream serve`.

For each serving mode (window: the window model rescored every hop; step: the incremental step model)
a server is started with the shipped default model and driven by N clients streaming synthetic
keypoints (``models.synth``, so the trained model fires real events) at ``--fps``. Per N it prints
p50/p99 frame-to-event latency (client-side: from sending the frame that completed the deciding
chunk to receiving the event), the frame drop rate, the server's CPU and the clients' CPU (cores
busy during the streaming window), and stops past saturation (drops above 1 %, p99 above 1 s or
streams that never finished). Clients run in several processes, each pacing all of its streams
from one ticker (a few wake-ups per frame period, not one per stream), so that they take as little
CPU from the server as possible. A same-run comparison of stream-steps/s for batched ONNX against
per-stream torch eager follows. Results go to benchmarks/out/streams.json and a plot of p99 latency
against streams (benchmarks/out/streams_p99.png; ``--docs-plot`` writes a small copy for the docs).

    .venv/bin/python benchmarks/streams.py --modes window,step --seconds 8 --docs-plot docs/img/streams_p99.png
    .venv/bin/python benchmarks/streams.py --plot-only   # redraw the plot from benchmarks/out/streams.json

Only 127.0.0.1 is used. Every loop is bounded in count and in time (``--budget-s`` caps the sweep).
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

OUT = REPO / "benchmarks" / "out"
TICKS = os.sysconf("SC_CLK_TCK")
GOAL_P99_MS = 50.0
DEFAULT_LEVELS = {"window": "1,10,20,40,60,80", "step": "1,50,100,200,300,400,500,600"}
PHASE_SLOTS = 8  # a client process wakes PHASE_SLOTS times per frame period and sends to the streams due


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def load_avg() -> tuple[float, float, float]:
    return os.getloadavg()


_BREAKDOWN = {  # server histograms whose mean per level tells where a frame's time goes
    "queue_ms": "mgstream_queue_wait_seconds",
    "infer_ms": "mgstream_inference_seconds",
    "batch": "mgstream_batch_size",
    "server_f2e_ms": "mgstream_frame_to_event_seconds",
}


_F2E_BUCKET = 'mgstream_frame_to_event_seconds_bucket{le="'
_LAG_BUCKET = 'mgstream_event_loop_lag_seconds_bucket{le="'


def scrape(http: str) -> dict[str, float]:
    """Sums and counts of the breakdown histograms, and the frame-to-event buckets, from /metrics."""
    import httpx

    values: dict[str, float] = {}
    for line in httpx.get(f"{http}/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        summary = name.endswith(("_sum", "_count")) and name.rsplit("_", 1)[0] in _BREAKDOWN.values()
        if summary or name.startswith((_F2E_BUCKET, _LAG_BUCKET)):
            values[name] = float(value)
    return values


def breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean of each breakdown histogram over the observations made between two scrapes, the
    server's own p99 frame-to-event latency as the upper edge of the bucket that holds it, and the
    worst event-loop lag as the upper edge of the highest bucket that got an observation."""
    out = {}
    for key, metric in _BREAKDOWN.items():
        count = after.get(f"{metric}_count", 0) - before.get(f"{metric}_count", 0)
        total = after.get(f"{metric}_sum", 0) - before.get(f"{metric}_sum", 0)
        scale = 1.0 if key == "batch" else 1000.0
        out[key] = total / count * scale if count else float("nan")
    buckets = _cumulative(before, after, _F2E_BUCKET)
    total = buckets[-1][1] if buckets else 0.0
    edge = next((le for le, n in buckets if n >= 0.99 * total), float("nan")) if total else float("nan")
    out["server_p99_le_ms"] = edge * 1000.0
    lag = _cumulative(before, after, _LAG_BUCKET)
    total = lag[-1][1] if lag else 0.0
    worst = next((le for le, n in lag if n >= total), float("nan")) if total else float("nan")
    out["loop_lag_max_le_ms"] = worst * 1000.0
    return out


def _cumulative(before: dict[str, float], after: dict[str, float], prefix: str) -> list[tuple[float, float]]:
    """(upper edge, observations at or below it between the two scrapes), ascending."""
    return sorted(
        (float(name[len(prefix) : -2]), after[name] - before.get(name, 0.0))
        for name in after
        if name.startswith(prefix)
    )


# ---------------------------------------------------------------- client processes


def _payloads(seed: int, frames: int, per_message: int) -> list[tuple[int, bytes] | None]:
    """Entry k: (first frame, message) sent at frame k (the message ends with frame k), or None when
    frame k waits for the rest of its group."""
    from models.synth import generate_sequence

    kp, _ = generate_sequence(seed=seed, num_frames=frames)
    out: list[tuple[int, bytes] | None] = [None] * frames
    for first in range(0, frames, per_message):
        group = kp[first : first + per_message]
        message = pack_frame(first, first / 30.0, group.astype("<f4").tobytes(), len(group))
        out[first + len(group) - 1] = (first, message)
    return out


class _Client:
    """One stream: its frames, send times and the latencies of the events it received."""

    def __init__(self, seed: int, frames: int, per_message: int) -> None:
        self.payloads = _payloads(seed, frames, per_message)
        self.sent_at = np.zeros(frames)
        self.latencies: list[tuple[float, float]] = []  # (send time of the deciding frame, latency)
        self.ended: dict = {}
        self.ending = False  # `end` sent: later events are end-of-stream flushes, not live decisions
        self.ws = None
        self.mode = ""
        self.reader: asyncio.Task | None = None

    async def open(self, url: str, fps: float, compression: bool, threshold: float | None) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(url, max_size=2**22, open_timeout=60, compression="deflate" if compression else None)
        start = {"type": "start", "input": "keypoints", "fps": fps}
        if threshold is not None:
            start["score_threshold"] = threshold
        await self.ws.send(json.dumps(start))
        ready = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
        if ready.get("type") != "ready":
            raise RuntimeError(f"expected ready, got {ready}")
        self.mode = ready["mode"]
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            head = raw[:24]
            if '"gesture_' in head:
                if self.ending:
                    continue
                frame = json.loads(raw)["decided_at_frame"] - 1  # decided_at_frame counts frames seen
                if 0 <= frame < len(self.sent_at) and self.sent_at[frame]:
                    sent = self.sent_at[frame]
                    self.latencies.append((sent, time.perf_counter() - sent))
            elif '"end"' in head:
                self.ended = json.loads(raw)
                return

    async def finish(self, timeout: float) -> None:
        self.ending = True
        try:
            await self.ws.send(json.dumps({"type": "end"}))
            await asyncio.wait_for(self.reader, timeout)
        except Exception:  # noqa: BLE001 - an unfinished stream is reported as incomplete
            pass
        finally:
            await self.ws.close()


async def _group(
    url: str,
    ids: list[int],
    n: int,
    start_wall: float,
    stagger: float,
    seconds: float,
    fps: float,
    compression: bool,
    threshold: float | None,
    per_message: int,
) -> dict:
    """Stream ``ids`` (of ``n`` streams in all) from one process; stream j starts ``stagger * j / n`` s in,
    all end together; latencies, server and client CPU count only the last ``seconds`` (all streams on)."""
    total_ticks = int((stagger + seconds) * fps) * PHASE_SLOTS
    first = {i: int(stagger * fps * PHASE_SLOTS * i / n) for i in ids}  # start tick of each stream
    clients = {i: _Client(i, -(-(total_ticks - first[i]) // PHASE_SLOTS), per_message) for i in ids}
    gate = asyncio.Semaphore(16)  # handshakes in flight per process

    async def open_one(c: _Client) -> None:
        async with gate:
            await c.open(url, fps, compression, threshold)

    await asyncio.gather(*(open_one(c) for c in clients.values()))
    # Streams grouped by their phase slot: one wake-up per slot sends to every stream due then.
    slots = [[(first[i], clients[i]) for i in ids if first[i] % PHASE_SLOTS == s] for s in range(PHASE_SLOTS)]
    t0 = time.perf_counter() + max(0.0, start_wall - time.time())
    measure_tick = int(stagger * fps) * PHASE_SLOTS
    t_measure = t0 + measure_tick / (fps * PHASE_SLOTS)
    cpu0 = time.process_time()
    for tick in range(total_ticks):  # bounded: (stagger + seconds) x fps x PHASE_SLOTS wake-ups
        if tick == measure_tick:
            cpu0 = time.process_time()
        delay = t0 + tick / (fps * PHASE_SLOTS) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        for start, c in slots[tick % PHASE_SLOTS]:
            if tick >= start:
                k = (tick - start) // PHASE_SLOTS
                if c.payloads[k] is not None:
                    first_frame, message = c.payloads[k]
                    c.sent_at[first_frame : k + 1] = time.perf_counter()
                    await c.ws.send(message)
    cpu1 = time.process_time()
    await asyncio.gather(*(c.finish(60.0) for c in clients.values()))
    done = list(clients.values())
    return {
        "latencies": [x for c in done for t, x in c.latencies if t >= t_measure],
        "received": sum(c.ended.get("frames_received", 0) for c in done),
        "dropped": sum(c.ended.get("frames_dropped", 0) for c in done),
        "incomplete": sum(not c.ended for c in done),
        "modes": sorted({c.mode for c in done}),
        "cpu_s": cpu1 - cpu0,
    }


def _client_process(args: tuple) -> dict:
    return asyncio.run(_group(*args))


# ---------------------------------------------------------------- one mode


def _sweep(
    model: Path, mode: str, per_message: int, levels: list[int], args: argparse.Namespace, pool, deadline: float
) -> list[dict]:
    from tests.streamkit import run_server

    rows: list[dict] = []
    env = {"MGSTREAM_MODE": mode, "MGSTREAM_MAX_SESSIONS": "4096", "MGSTREAM_LOG_LEVEL": "warning"}
    env.update(item.split("=", 1) for item in args.server_env)
    print(
        f"\n## Live keypoint streams, {mode} mode ({args.seconds:g} s per level, {args.fps:g} fps, "
        f"{per_message} frame(s) per message, clients in {args.client_processes} processes, "
        f"compression {'offered' if args.compression else 'off'}, "
        f"starts staggered over {args.stagger_s:g} s, score threshold {args.score_threshold or 'of the model'})"
    )
    print(
        "| streams | events | p50 ms | p99 ms | drop % | server CPU | client CPU | load 1m "
        "| batch | queue ms | infer ms | server f2e ms | server p99 ≤ ms | loop lag max ≤ ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp, run_server(model, Path(tmp), env=env) as srv:
        for n in levels:
            if time.monotonic() > deadline:
                print(f"\n(time budget reached; {mode} sweep stopped before {n} streams)")
                break
            groups = [list(range(i, n, args.client_processes)) for i in range(min(args.client_processes, n))]
            setup = 3.0 + n / 60  # time to spawn nothing (pool is warm), generate frames and hand-shake
            start_wall = time.time() + setup
            jobs = [
                pool.apply_async(
                    _client_process,
                    (
                        (
                            srv.ws,
                            g,
                            n,
                            start_wall,
                            args.stagger_s,
                            args.seconds,
                            args.fps,
                            args.compression,
                            args.score_threshold,
                            per_message,
                        ),
                    ),
                )
                for g in groups
            ]
            time.sleep(max(0.0, start_wall + args.stagger_s - time.time()))
            cpu0, t0, m0 = cpu_seconds(srv.proc.pid), time.monotonic(), scrape(srv.http)
            time.sleep(args.seconds)
            server_cores = (cpu_seconds(srv.proc.pid) - cpu0) / (time.monotonic() - t0)
            inside = breakdown(m0, scrape(srv.http))
            la = load_avg()[0]
            parts = [j.get(timeout=setup + args.stagger_s + args.seconds + 180) for j in jobs]
            served = {m for p in parts for m in p["modes"]}
            if served != {mode}:
                raise RuntimeError(f"asked for {mode} mode, the server answered {served}")
            lat = np.array([x for p in parts for x in p["latencies"]]) * 1000
            received = sum(p["received"] for p in parts)
            drop = 100 * sum(p["dropped"] for p in parts) / max(received, 1)
            incomplete = sum(p["incomplete"] for p in parts)
            client_cores = sum(p["cpu_s"] for p in parts) / max(args.seconds, 1e-9)
            p50, p99 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 99))) if lat.size else (np.nan, np.nan)
            row = {
                "streams": n,
                "events": int(lat.size),
                "p50_ms": p50,
                "p99_ms": p99,
                "drop_pct": drop,
                "incomplete": incomplete,
                "server_cores": server_cores,
                "client_cores": client_cores,
                "load1": la,
                **inside,
            }
            rows.append(row)
            note = f" ({incomplete} streams unfinished)" if incomplete else ""
            print(
                f"| {n} | {lat.size} | {p50:.1f} | {p99:.1f} | {drop:.2f} | {server_cores:.2f} | "
                f"{client_cores:.2f} | {la:.2f} | {inside['batch']:.1f} | {inside['queue_ms']:.1f} | "
                f"{inside['infer_ms']:.1f} | {inside['server_f2e_ms']:.1f} | {inside['server_p99_le_ms']:g} | "
                f"{inside['loop_lag_max_le_ms']:g} |{note}",
                flush=True,
            )
            if not lat.size:
                print(f"(no events at {n} streams: the model fired nothing; see --score-threshold)")
            if drop > 1.0 or p99 > 1000 or incomplete:
                print(f"\nsaturated at {n} streams (drops {drop:.2f} %, p99 {p99:.0f} ms, {incomplete} unfinished)")
                break
    ok = [r["streams"] for r in rows if r["p99_ms"] < GOAL_P99_MS and r["drop_pct"] == 0 and not r["incomplete"]]
    print(f"\n{mode}: most streams with p99 < {GOAL_P99_MS:g} ms and no drops: {max(ok) if ok else 'none'}")
    return rows


# ---------------------------------------------------------------- throughput comparison (issue 4)


def _rate(fn, steps_per_call: int, seconds: float) -> float:
    fn()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and calls < 100_000:
        fn()
        calls += 1
    return calls * steps_per_call / (time.perf_counter() - t0)


def throughput_benchmark(model_path: Path, batch: int, seconds: float) -> list[tuple[str, float]]:
    """Stream-steps/s of the shipped ONNX models (batched) against per-stream torch eager, same architecture."""
    from service.runtime.onnx import OnnxModelRuntime
    from service.runtime.step_runtime import StepModelRuntime, step_model_path

    hop = 4
    rng = np.random.default_rng(0)
    window = OnnxModelRuntime(model_path, ["CPUExecutionProvider"])
    w, d = window.card.window_steps, window.card.feature.feature_dim
    x = rng.normal(size=(batch, w, d)).astype(np.float32)
    rows = [
        (
            f"ONNX window model (W={w}), batches of {batch}",
            _rate(lambda: window.run({"features": x}), batch * hop, seconds),
        )
    ]
    step_path = step_model_path(model_path)
    if step_path.is_file():
        step = StepModelRuntime(step_path, ["CPUExecutionProvider"])
        h, s = step.layout.chunk_steps, step.layout.state_size
        feed = {
            "features": rng.normal(size=(batch, h, d)).astype(np.float32),
            "state": np.zeros((batch, s), np.float32),
            "phase": np.zeros((batch, 1), np.float32),
        }
        rows.append((f"ONNX step model (H={h}), batches of {batch}", _rate(lambda: step.run(feed), batch * h, seconds)))
    try:
        import torch

        from models.detector import Detector
        from models.nn.config import ModelConfig
        from models.step import StepDetector
    except ImportError as exc:
        print(f"\n(torch comparison skipped: {exc})")
        return rows
    torch.manual_seed(0)
    det = Detector(ModelConfig(window_steps=w)).eval()  # cost depends on architecture, not on weights
    xt = torch.from_numpy(x[:1])
    with torch.inference_mode():
        rows.append(("torch eager window, one stream per call", _rate(lambda: det.predict(xt), hop, seconds)))
        sd = StepDetector(det, 4).eval()
        st, ph = sd.initial_state(1)
        ft = torch.from_numpy(x[:1, :4])
        rows.append(("torch eager step, one stream per call", _rate(lambda: sd(ft, st, ph), 4, seconds)))
    print(f"\n## Detector throughput (default architecture, hop {hop} steps, {torch.get_num_threads()} torch threads)")
    print("| path | stream-steps/s | live streams at 7.5 steps/s |")
    print("|---|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r:,.0f} | {r / 7.5:,.0f} |")
    by = dict(rows)
    eager = by["torch eager window, one stream per call"]
    print(f"\nbatched ONNX window / per-stream torch eager window: {rows[0][1] / eager:.1f}x")
    if len(rows) > 3:
        print(f"batched ONNX step / per-stream torch eager window: {rows[1][1] / eager:.1f}x")
    return rows


# ---------------------------------------------------------------- plot


def _key(mode: str, per_message: int) -> str:
    return mode if per_message == 1 else f"{mode}, {per_message} frames/message"


def _label(key: str) -> str:
    mode, _, rest = key.partition(", ")
    return f"{mode} mode, " + (rest or "1 frame/message")


def plot(results: dict, path: Path, dpi: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = iter(("o-", "s-", "^-", "d-", "v-", "x-"))
    for key, rows in results.get("modes", {}).items():
        rows = [r for r in rows if r["p99_ms"] == r["p99_ms"]]  # drop NaN (no events)
        if rows:
            ax.plot([r["streams"] for r in rows], [r["p99_ms"] for r in rows], next(styles), label=_label(key))
    ax.axhline(GOAL_P99_MS, color="grey", ls="--", lw=1, label=f"goal p99 {GOAL_P99_MS:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent keypoint streams at 30 fps")
    ax.set_ylabel("p99 frame-to-event latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"plot: {path} ({path.stat().st_size // 1024} KiB)")


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="window model (its .step.onnx beside it)")
    parser.add_argument("--modes", default="window,step")
    parser.add_argument("--clients-window", default=DEFAULT_LEVELS["window"], help="levels of N in window mode")
    parser.add_argument("--clients-step", default=DEFAULT_LEVELS["step"], help="levels of N in step mode")
    parser.add_argument("--seconds", type=float, default=8.0, help="streaming time per level")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument(
        "--stagger-s",
        type=float,
        default=0.0,
        help="start the streams spread over this many seconds before the measured --seconds (all on then)",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="sent in `start`; default: the model's. Latency needs events, so a model that fires rarely "
        "on the synthetic streams needs a lower one",
    )
    parser.add_argument(
        "--frames-per-message",
        default="1",
        help="keypoint frames per WebSocket message, a comma list swept in turn for each mode; 4 sends each "
        "step's frames together, when its last is due",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra server setting, e.g. MGSTREAM_MAX_WAIT_MS=10 (repeatable)",
    )
    parser.add_argument("--client-processes", type=int, default=3)
    parser.add_argument(
        "--compression",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer permessage-deflate as the Python client and browsers do",
    )
    parser.add_argument("--budget-s", type=float, default=720.0, help="stop sweeping levels after this long")
    parser.add_argument("--batch", type=int, default=32, help="batch of the throughput comparison")
    parser.add_argument("--skip-torch", action="store_true", help="skip the throughput comparison")
    parser.add_argument("--out", type=Path, default=OUT / "streams.json")
    parser.add_argument("--docs-plot", type=Path, default=None, help="also write a small plot here")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plots from --out")
    args = parser.parse_args()

    title = "mgstream default model, keypoints at 30 fps, 2-core CPU, clients on the same cores"
    if args.plot_only:
        results = json.loads(args.out.read_text())
    else:
        model = args.model or DEFAULT_MODEL
        if not model.is_file():
            raise SystemExit(f"no model at {model}; train/export the default model or pass --model")
        import multiprocessing

        deadline = time.monotonic() + args.budget_s
        results = {
            "model": str(model.relative_to(REPO) if model.is_relative_to(REPO) else model),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_before": load_avg(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "modes": {},
        }
        print(f"model {model}; load average before: {' '.join(f'{x:.2f}' for x in results['load_before'])}")
        levels = {"window": args.clients_window, "step": args.clients_step}
        with multiprocessing.get_context("spawn").Pool(args.client_processes) as pool:
            for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
                for per_message in [int(k) for k in args.frames_per_message.split(",")]:
                    results["modes"][_key(mode, per_message)] = _sweep(
                        model, mode, per_message, [int(n) for n in levels[mode].split(",")], args, pool, deadline
                    )
        if not args.skip_torch:
            results["throughput"] = throughput_benchmark(model, args.batch, seconds=3.0)
        results["load_after"] = load_avg()
        print(f"\nload average after: {' '.join(f'{x:.2f}' for x in results['load_after'])}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"results: {args.out}")
    plot(results, OUT / "streams_p99.png", 120, title)
    if args.docs_plot:
        plot(results, args.docs_plot, 72, title)


if __name__ == "__main__":
    main()
