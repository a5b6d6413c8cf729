"""``mgstream serve``: run the streaming server under uvicorn."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import typer


def serve(
    host: str = typer.Option(None, help="bind address (default 127.0.0.1; MGSTREAM_HOST)"),
    port: int = typer.Option(None, help="TCP port (default 8000; MGSTREAM_PORT)"),
    model: Path = typer.Option(None, help="window-model ONNX file (default: the shipped model)"),
    data_dir: Path = typer.Option(None, help="where batch jobs keep uploads and results"),
    max_sessions: int = typer.Option(None, help="concurrent streams before 1013"),
    max_batch: int = typer.Option(None, help="windows per inference batch"),
    max_wait_ms: float = typer.Option(None, help="longest wait for a batch to fill"),
    hop_steps: int = typer.Option(None, help="steps between two scored windows (default: from the model)"),
    providers: str = typer.Option(None, help="comma-separated ONNX Runtime providers, tried in order"),
    api_key: list[str] = typer.Option(None, help="accepted API key (repeat for several); none: no auth"),
    log_level: str = typer.Option(None, help="debug, info, warning, error"),
) -> None:
    """Serve live streams (WebSocket /v1/streams), ops endpoints and the demo page."""
    import uvicorn

    from service.app import create_app, drain_streams
    from service.config import Settings
    from service.log_config import logging_config, setup_logging

    overrides = {
        "host": host,
        "port": port,
        "model_path": model,
        "data_dir": data_dir,
        "max_sessions": max_sessions,
        "max_batch": max_batch,
        "max_wait_ms": max_wait_ms,
        "hop_steps": hop_steps,
        "log_level": log_level,
        "providers": [p.strip() for p in providers.split(",") if p.strip()] if providers else None,
        "api_keys": list(api_key) if api_key else None,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    # The inference and featurizer threads spend their time in native code without the GIL and need
    # it back only briefly; the default 5 ms switch interval makes each of them wait that long behind
    # a busy event loop, twice per batch (docs/benchmarks.md).
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
    # Every frame allocates short-lived objects; with the default threshold (700) the collector runs
    # hundreds of times a second under load, and a full pass walks every loaded module's objects.
    # Fewer young collections and a frozen startup heap (below) keep pauses rare and short.
    gc.set_threshold(settings.gc_gen0_threshold, *gc.get_threshold()[1:])
    setup_logging(settings.log_level)
    app = create_app(settings)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:  # noqa: ANN001
            await super().startup(sockets)
            gc.collect()
            gc.freeze()  # modules, model and warm-up objects live forever: the collector skips them

        async def shutdown(self, sockets=None) -> None:  # noqa: ANN001
            # Close streams with 1001 and their final messages before uvicorn drops the sockets.
            await drain_streams(app)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings.log_level),
        # Messages up to max_message_bytes are read and checked (an `error` above it);
        # the protocol layer closes with 1009 beyond four times that.
        ws_max_size=4 * settings.max_message_bytes,
        ws_per_message_deflate=settings.ws_compression,
        ws=settings.ws_protocol,
        timeout_graceful_shutdown=10,
    )
    server = Server(config)
    app.state.request_exit = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.runtime_dead:
        raise SystemExit(3)
    if not server.started:
        raise SystemExit(1)
