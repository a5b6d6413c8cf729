"""Step (incremental) model vs window recomputation: cost per stream per hop, onnxruntime on CPU.

    python benchmarks/incremental.py [--windows 64 128 256 512] [--chunk 4] [--batches 1 32]
                                     [--checkpoint ckpt.pt | --model models/default/mgstream-default.onnx]

In window mode every hop of H steps re-runs a whole W-step window per stream; in step mode each
stream runs one H-step chunk with its cached state. Both ONNX models are exported here from the
same torch detector (the shipped window exporter, and models/export_step.py), with the trained
checkpoint's weights when given, else random weights of the shipped architecture (read from the
--model card when it exists, else the default ModelConfig): cost depends on the architecture only.
The step graph does not depend on W (its receptive field is finite); it is timed again next to each
window, in rounds that cycle over every (W, batch) cell, so all cells see the same machine load.
Timings are medians.
Prints a table and the two acceptance ratios, and writes benchmarks/out/incremental.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OUT_DIR = Path(__file__).resolve().parent / "out"


def _detector(args: argparse.Namespace):
    import torch

    from models.detector import Detector, load_checkpoint
    from models.nn.config import ModelConfig

    if args.checkpoint:
        return load_checkpoint(args.checkpoint).model, f"checkpoint {args.checkpoint}"
    torch.manual_seed(0)
    if args.model and Path(args.model).is_file():
        from service.runtime.onnx import read_card

        arch = {k: v for k, v in read_card(Path(args.model)).architecture.items() if k != "type"}
        return Detector(ModelConfig.from_dict(arch)).eval(), f"random weights, architecture of {args.model}"
    return Detector(ModelConfig()).eval(), "random weights, default ModelConfig"


def _with_window(det, window: int):
    """The same weights under a config whose exported window is ``window`` steps."""
    from models.detector import Detector

    other = Detector(dataclasses.replace(det.cfg, window_steps=window)).eval()
    other.load_state_dict(det.state_dict())
    return other


def _session(path: Path, threads: int, optimized: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized is not None:  # the graph as onnxruntime runs it, after its own fusions
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


class StepFeeds:
    """Realistic step inputs: states of streams that have run a while, at mixed phases."""

    def __init__(self, sess, layout, batch: int, dim: int, rng: np.random.Generator) -> None:
        h = layout.chunk_steps
        state = np.zeros((batch, layout.state_size), np.float32)
        phase = (np.arange(batch) * h % layout.max_stride)[:, None].astype(np.float32)
        for _ in range(2 * layout.max_stride // h + 2):
            x = rng.normal(size=(batch, h, dim)).astype(np.float32)
            _, _, _, state, phase = sess.run(None, {"features": x, "state": state, "phase": phase})
        self.feeds = {"features": rng.normal(size=(batch, h, dim)).astype(np.float32), "state": state, "phase": phase}


def _time_once(sess, feeds: dict) -> float:
    t0 = time.perf_counter()
    sess.run(None, feeds)
    return time.perf_counter() - t0


def measure(cells: dict, step_sess, step_feeds: dict, budget_s: float) -> dict:
    """Median seconds per call for every (W, batch) cell: window and step timed in interleaved rounds
    over all cells, so drifting load on the shared machine hits every cell alike.

    cells: (W, batch) -> (window session, window feeds); step_feeds: batch -> step feeds."""
    for (_, b), (sess, feeds) in cells.items():
        for _ in range(2):
            sess.run(None, feeds)
            step_sess.run(None, step_feeds[b])
    win: dict = {key: [] for key in cells}
    step: dict = {key: [] for key in cells}
    start = time.perf_counter()
    while min(len(v) for v in win.values()) < 5 or time.perf_counter() - start < budget_s * len(cells):
        for key, (sess, feeds) in cells.items():
            win[key].append(_time_once(sess, feeds))
            for _ in range(3):  # the step call is short: more samples for the same wall time
                step[key].append(_time_once(step_sess, step_feeds[key[1]]))
    return {key: (statistics.median(win[key]), statistics.median(step[key])) for key in cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--chunk", type=int, default=4, help="hop H in steps (the step model's chunk)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per cell")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=Path("models/default/mgstream-default.onnx"))
    parser.add_argument("--plot", type=Path, default=OUT_DIR / "incremental.png")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from models.export import build_card, export_onnx
    from models.export_step import export_step_onnx
    from models.step import StepDetector
    from service.contract.model_card import PostProcess
    from service.contract.step_layout import StepLayout

    det, source = _detector(args)
    cfg = det.cfg
    print(f"model: {source}; channels {cfg.channels}, strides {list(cfg.strides)}, chunk H={args.chunk}")
    print(f"machine: {os.cpu_count()} logical CPUs, onnxruntime intra-op threads {args.threads}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        card = build_card(det, PostProcess(), {}, name="bench")
        step_path = export_step_onnx(det, Path(tmp) / "m.step.onnx", card, args.chunk)
        step_sess = _session(step_path, args.threads, optimized=Path(tmp) / "m.step.optimized.onnx")
        layout = StepLayout.from_dict(StepDetector(det, args.chunk).layout.to_dict())
        print(
            f"step state: {layout.state_size} floats ({layout.state_size * 4 / 1024:.1f} KiB) per stream, "
            f"{layout.num_slots} output slots per chunk; step graph: {_node_count(step_path)} nodes exported, "
            f"{_node_count(Path(tmp) / 'm.step.optimized.onnx')} after onnxruntime's optimisation"
        )
        step_feeds = {b: StepFeeds(step_sess, layout, b, cfg.input_dim, rng).feeds for b in args.batches}
        cells = {}
        for w in args.windows:
            t0 = time.perf_counter()
            wdet = _with_window(det, w)
            wpath = export_onnx(wdet, Path(tmp) / f"w{w}.onnx", build_card(wdet, PostProcess(), {}, name="bench"))
            wsess = _session(wpath, args.threads)
            print(f"  exported window W={w} in {time.perf_counter() - t0:.0f} s", flush=True)
            for b in args.batches:
                cells[(w, b)] = (wsess, {"features": rng.normal(size=(b, w, cfg.input_dim)).astype(np.float32)})
        print(f"  timing {len(cells)} cells, interleaved, ~{args.budget * len(cells):.0f} s", flush=True)
        results = measure(cells, step_sess, step_feeds, args.budget)

    print(f"\nper stream per hop (H={args.chunk}): median ms; ratio = window / step")
    print(f"{'W':>5} {'batch':>5} {'window ms':>10} {'step ms':>9} {'ratio':>7}")
    for (w, b), (tw, ts) in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{w:>5} {b:>5} {tw / b * 1e3:>10.3f} {ts / b * 1e3:>9.3f} {tw / ts:>7.1f}x")
    lo, mid = min(args.windows), 256 if 256 in args.windows else max(args.windows)
    print()
    for b in args.batches:
        flat = results[(mid, b)][1] / results[(lo, b)][1]
        ratio = results[(mid, b)][0] / results[(mid, b)][1]
        print(
            f"batch {b:>3}: step cost(W={mid})/cost(W={lo}) = {flat:.2f} (goal <= 1.3); "
            f"window/step at W={mid}, H={args.chunk} = {ratio:.1f}x (goal >= 20x)"
        )
    _plot(results, args)


def _plot(results: dict[tuple[int, int], tuple[float, float]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for b, style in zip(args.batches, ["-", "--", ":", "-."], strict=False):
        ws = sorted(w for (w, bb) in results if bb == b)
        win = [results[(w, b)][0] / b * 1e3 for w in ws]
        step = [results[(w, b)][1] / b * 1e3 for w in ws]
        ax.plot(ws, win, "o" + style, color="tab:red", label=f"window, batch {b}")
        ax.plot(ws, step, "s" + style, color="tab:blue", label=f"step, batch {b}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("window W (steps)")
    ax.set_ylabel(f"ms per stream per hop (H={args.chunk})")
    ax.set_title("Window recomputation vs incremental step model (onnxruntime CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
