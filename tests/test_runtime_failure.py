"""A model that fails inside ONNX Runtime: the stream gets `error`, then a dead runtime ends the process.

The model is real (tests/streamkit.py's tiny detector with a poison switch): any batch holding a
feature above 1e3 makes a Reshape in the graph fail, exactly as a broken model or device would.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np

from service.contract.features import DEFAULT_SPEC
from tests.streamkit import TINY_WINDOW, build_tiny_model, run_server, stream_payloads

POISON = np.full(DEFAULT_SPEC.feature_dim, 1e4, dtype="<f4").tobytes()
CLEAN = np.zeros(DEFAULT_SPEC.feature_dim, dtype="<f4").tobytes()


def test_failed_batches_error_the_stream_and_a_dead_runtime_exits_for_a_restart(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "poisonable.onnx", poison_above=1e3)
    # Every window still holding the poisoned step fails (W / hop of them); one more makes it dead.
    max_failures = TINY_WINDOW // 4 + 4
    env = {"MGSTREAM_MAX_RUNTIME_FAILURES": str(max_failures), "MGSTREAM_INBOUND_QUEUE_FRAMES": "10000"}
    with run_server(model, tmp_path, env=env) as srv:
        # A clean stream first: the same model serves normally.
        clean = asyncio.run(stream_payloads(srv.ws, [CLEAN] * 64, input_kind="features"))
        assert clean.close_code == 1000 and not clean.of("error")

        # A poisoned step fails the windows that hold it: the stream gets `error`s and goes on, and
        # once the step has left the window, scoring works again.
        once = asyncio.run(
            stream_payloads(srv.ws, [POISON] * 4 + [CLEAN] * (2 * TINY_WINDOW), input_kind="features")
        )
        errors = once.of("error")
        assert errors and all(e["code"] == "inference_failed" and not e["fatal"] for e in errors)
        assert len(errors) < max_failures and once.close_code == 1000
        assert httpx.get(f"{srv.http}/healthz", timeout=5).status_code == 200

        # Failures in a row kill the runtime: the stream is closed with 1011 ...
        dead = asyncio.run(stream_payloads(srv.ws, [POISON] * (8 * TINY_WINDOW), input_kind="features"))
        assert dead.close_code == 1011
        # ... and the process exits (for compose's `restart: unless-stopped` to bring it back).
        deadline = time.monotonic() + 30
        while srv.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert srv.proc.poll() is not None, "the server kept running with a dead runtime"
        log = srv.log()
        assert "model runtime is dead" in log and "Reshape" in log
