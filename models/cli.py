"""Trainer subcommands (synth, train, evaluate, export); heavy imports stay inside each command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _quiet_threads() -> None:
    # Spinning OpenMP workers collapse throughput on a shared 2-core machine; set before torch loads.
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def evaluate(
    model: Annotated[Path, typer.Argument(dir_okay=False, help="Checkpoint (.pt) or exported model (.onnx).")],
    data: Annotated[Path, typer.Option(help="SMG-layout root, or the feature directory with --annotations.")] = Path(
        "data/synth"
    ),
    split: Annotated[str, typer.Option(help="Split to evaluate (test for final numbers).")] = "test",
    annotations: Annotated[
        Path | None, typer.Option(help="ActionFormer-style JSON (generic layout); --data is then the .npy dir.")
    ] = None,
    units: Annotated[str, typer.Option(help="Generic layout: segment units, seconds or frames.")] = "seconds",
    mode: Annotated[str, typer.Option(help="offline, windowed or both (offline needs a .pt).")] = "both",
    hop: Annotated[int, typer.Option(min=1, help="Windowed mode: steps between windows.")] = 16,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report here.")] = None,
) -> None:
    """Evaluate a model on a split: SMG F1 (toolkit rule), strict F1, mAP, per-class F1."""
    _quiet_threads()
    import json

    from rich.console import Console

    from models.datasets import DataError
    from models.run_eval import evaluate_outputs, load_model, sequence_outputs
    from models.train import DataConfig, load_split

    console = Console(stderr=True)
    try:
        loaded = load_model(model)
        cfg = DataConfig(
            format="generic" if annotations else "smg",
            root=str(data),
            annotations=str(annotations) if annotations else None,
            units=units,
        )
        seqs = load_split(cfg, split, loaded.input_dim)
        modes = ["offline", "windowed"] if mode == "both" else [mode]
        if loaded.offline is None and "offline" in modes:
            if mode == "offline":
                raise ValueError("offline mode needs a checkpoint (.pt); an ONNX window model runs windowed")
            modes = ["windowed"]
        results = {}
        for m in modes:
            outputs = sequence_outputs(loaded, seqs, m, hop)
            results[m] = evaluate_outputs(outputs, seqs, loaded.postprocess)
    except (DataError, ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    for m, r in results.items():
        f1, strict = r["smg_f1"], r["strict_f1"]
        console.print(
            f"{m:9s} split={split} sequences={len(seqs)}: SMG F1 {f1['f1']:.4f} (P {f1['precision']:.3f}, "
            f"R {f1['recall']:.3f}), strict F1 {strict['f1']:.4f}, mAP@0.3:0.7 {r['map']['mean']:.4f}"
        )
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"split": split, "hop": hop, "results": results}, indent=2))


def export(
    checkpoint: Annotated[Path, typer.Argument(dir_okay=False, help="Checkpoint written by train (best.pt).")],
    out: Annotated[Path, typer.Option(help="ONNX file to write.")] = Path("models/default/mgstream-default.onnx"),
    name: Annotated[str | None, typer.Option(help="Model name for the card (default: from the run).")] = None,
    version: Annotated[str | None, typer.Option(help="Model version (default: from the run).")] = None,
    eval_data: Annotated[
        Path | None, typer.Option(help="SMG-layout root whose held-out split is scored into the card's metrics.")
    ] = None,
    eval_split: Annotated[str, typer.Option(help="Held-out split for --eval-data.")] = "test",
    hop: Annotated[int, typer.Option(min=1, help="Windowed evaluation: steps between windows.")] = 16,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the held-out report here.")] = None,
    step: Annotated[
        bool, typer.Option("--step/--no-step", help="Also export the incremental step model beside it (x.step.onnx).")
    ] = True,
    chunk: Annotated[int, typer.Option(min=1, help="Step model: feature steps per call (a power of two).")] = 4,
) -> None:
    """Export the window model to ONNX with its model card, and check torch/onnxruntime parity.

    With --eval-data, the held-out split is scored offline (checkpoint over whole sequences) and
    causal-windowed (the exported ONNX, window W every --hop steps) and written into the card."""
    _quiet_threads()
    from rich.console import Console

    from models.detector import load_checkpoint
    from models.export import export_checkpoint

    console = Console(stderr=True)
    try:
        ckpt = load_checkpoint(checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    card, diff = export_checkpoint(
        ckpt, out, name or ckpt.meta.get("name", "mgstream-detector"), version or ckpt.meta.get("version", "0.1.0")
    )
    if eval_data is not None:
        import json

        from models.export import update_card
        from models.run_eval import evaluate_outputs, load_onnx, load_torch, sequence_outputs
        from models.train import DataConfig, load_split

        seqs = load_split(DataConfig(root=str(eval_data)), eval_split, card.feature.feature_dim)
        reports = {
            "offline": evaluate_outputs(
                sequence_outputs(load_torch(checkpoint), seqs, "offline", hop), seqs, card.postprocess
            ),
            "windowed": evaluate_outputs(
                sequence_outputs(load_onnx(out), seqs, "windowed", hop), seqs, card.postprocess
            ),
        }
        metrics = dict(card.metrics)
        for m, r in reports.items():
            metrics[f"{eval_split}_smg_f1_{m}"] = round(r["smg_f1"]["f1"], 4)
            metrics[f"{eval_split}_strict_f1_{m}"] = round(r["strict_f1"]["f1"], 4)
            metrics[f"{eval_split}_map_{m}"] = round(r["map"]["mean"], 4)
        metrics.update({"eval_hop_steps": hop, "eval_split_sequences": len(seqs)})
        card = update_card(out, metrics=metrics)
        for m, r in reports.items():
            console.print(
                f"{eval_split} {m:9s}: SMG F1 {r['smg_f1']['f1']:.4f}, strict F1 {r['strict_f1']['f1']:.4f}, "
                f"mAP {r['map']['mean']:.4f}"
            )
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps({"split": eval_split, "hop": hop, "results": reports}, indent=2))
    size = out.stat().st_size / 1e6
    console.print(
        f"wrote {out} ({size:.2f} MB): window {card.window_steps}, strides {list(card.strides)}, "
        f"causal={card.causal}; torch/onnxruntime max abs diff {diff:.2e}"
    )
    if step:
        from models.export_step import export_step_beside

        step_out, step_card, step_diff = export_step_beside(ckpt, out, chunk)
        layout = step_card.step_model or {}
        console.print(
            f"wrote {step_out}: chunk {layout.get('chunk_steps')}, state {layout.get('state_size')} floats per "
            f"stream; torch/onnxruntime max abs diff {step_diff:.2e}"
        )


def synth(
    output: Annotated[Path, typer.Argument(file_okay=False, help="Output directory (SMG layout).")],
    sequences: Annotated[int, typer.Option("--sequences", "-n", min=1, help="Number of sequences.")] = 60,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same bytes.")] = 0,
    minutes: Annotated[float, typer.Option(min=0.01, help="Length of each sequence in minutes.")] = 3.0,
    frames: Annotated[
        int | None, typer.Option(min=8, help="Length of each sequence in frames (overrides --minutes).")
    ] = None,
    long_tail: Annotated[
        bool, typer.Option("--long-tail/--balanced", help="SMG-like imbalanced class counts, or uniform.")
    ] = False,
    train_fraction: Annotated[float, typer.Option(min=0.0, help="Share of sequences in train.")] = 0.7,
    val_fraction: Annotated[float, typer.Option(min=0.0, help="Share of sequences in val.")] = 0.15,
    test_fraction: Annotated[float, typer.Option(min=0.0, help="Share of sequences in test.")] = 0.15,
) -> None:
    """Write procedural synthetic skeleton sequences (17 SMG classes) in SMG's layout."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from models.synth import SynthConfig, write_dataset

    cfg = SynthConfig(long_tail=long_tail)
    num_frames = frames if frames is not None else max(8, int(round(minutes * 60 * cfg.fps)))
    console = Console(stderr=True)
    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("synth", total=sequences)
            desc = write_dataset(
                output,
                sequences,
                seed,
                num_frames,
                long_tail=long_tail,
                splits=(train_fraction, val_fraction, test_fraction),
                config=cfg,
                progress=lambda k: bar.advance(task, k),
            )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    counts = desc["class_counts"]
    sizes = desc["split_sizes"]
    console.print(
        f"wrote {sequences} sequences x {num_frames} frames to {output} "
        f"(train {sizes['train']}, val {sizes['val']}, test {sizes['test']}; "
        f"{sum(counts.values())} instances, per class {min(counts.values())}..{max(counts.values())})"
    )


def train(
    config: Annotated[Path, typer.Option(dir_okay=False, help="YAML run config (models/configs/*.yaml).")] = Path(
        "models/configs/default.yaml"
    ),
    out: Annotated[Path, typer.Option(file_okay=False, help="Run directory (best.pt, metrics.json).")] = Path(
        "runs/default"
    ),
    data: Annotated[Path | None, typer.Option(help="Override data.root of the config.")] = None,
    iterations: Annotated[int | None, typer.Option(min=1, help="Override train.iterations.")] = None,
    max_minutes: Annotated[float | None, typer.Option(min=0.01, help="Override train.max_minutes.")] = None,
    aug_alpha: Annotated[float | None, typer.Option(help="Enable log2 label augmentation with this alpha.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override train.seed.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train the detector; selects the best EMA weights and tunes post-processing on validation."""
    _quiet_threads()
    from dataclasses import replace

    from rich.console import Console

    from models.datasets import DataError
    from models.train import RunConfig
    from models.train import train as run_training

    console = Console(stderr=True)
    try:
        cfg = RunConfig.load(config)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    overrides = {
        k: v
        for k, v in {"iterations": iterations, "max_minutes": max_minutes, "aug_alpha": aug_alpha, "seed": seed}.items()
        if v is not None
    }
    cfg = replace(cfg, train=replace(cfg.train, **overrides))
    if data is not None:
        cfg = replace(cfg, data=replace(cfg.data, root=str(data)))
    try:
        result = run_training(cfg, out, progress=progress, log=console.print)
    except DataError as exc:
        raise typer.BadParameter(str(exc)) from exc
    tuned = result.tuned
    console.print(
        f"trained {result.iterations} iterations in {result.seconds / 60:.1f} min; "
        f"best validation SMG F1 {max(result.val_f1, 0):.4f}"
        + (f" (tuned: {tuned.f1:.4f}, {tuned.postprocess})" if tuned else "")
        + f"; wrote {result.checkpoint}"
    )
