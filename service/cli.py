"""The ``mgstream`` console script. Each area owns its subcommands; heavy imports stay inside them."""

from __future__ import annotations

import typer

from client.detect_cli import detect
from client.stream_cli import stream
from models.cli import evaluate, export, synth, train
from service.features.extract_cli import extract
from service.serve_cli import serve

app = typer.Typer(
    name="mgstream",
    help="Real-time micro-gesture detection: serve, stream, detect, and train the detector.",
    no_args_is_help=True,
    add_completion=False,
)
for command in (serve, detect, stream, extract, synth, train, evaluate, export):
    app.command()(command)

if __name__ == "__main__":
    app()
