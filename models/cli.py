"""Trainer subcommands (synth, train, evaluate, export); heavy imports stay inside each command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def evaluate() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")


def export() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")


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


def train() -> None:
    """Not built yet."""
    raise SystemExit("not built yet")
