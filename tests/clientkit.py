"""Helpers for client and browser tests: a server on a chosen port (so it can be restarted in place)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.streamkit import REPO


def serve(model: Path, port: int, tmp: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``mgstream serve`` on 127.0.0.1:``port``, returned once /readyz answers 200."""
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(model), "--data-dir", str(tmp / "data")]  # fmt: skip
    log_path = tmp / f"serve-{port}-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"server not ready in 90 s:\n{log_path.read_text(errors='replace')}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """SIGKILL by default: a crash, with no close frame sent to anyone."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
