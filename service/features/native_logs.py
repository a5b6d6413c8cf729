"""Filter the native log lines MediaPipe writes straight to file descriptor 2.

MediaPipe 0.10.21's C++ code logs through absl before ``absl::InitializeLog`` is called, so
``GLOG_minloglevel``/``TF_CPP_MIN_LOG_LEVEL`` do not reach it (checked: each new Holistic graph
still prints ~9 warning lines). Entry points (``serve``, ``extract``, benchmarks) may call
:func:`filter_native_stderr` once: fd 2 is routed through a pipe, the known harmless lines are
dropped and everything else is forwarded unchanged. Libraries never install it on their own.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading

_NOISE = re.compile(
    rb"^(?:[IW]\d{4} [\d:.]+\s+\d+ \w+\.cc:\d+\]"  # absl-format INFO/WARNING lines from the graphs
    rb"|INFO: Created TensorFlow Lite XNNPACK delegate"
    rb"|WARNING: All log messages before absl::InitializeLog)"
)
_lock = threading.Lock()
_installed = False


def is_noise(line: bytes) -> bool:
    return bool(_NOISE.match(line))


def _pump(read_fd: int, out_fd: int) -> None:
    with os.fdopen(read_fd, "rb", buffering=0) as src:
        pending = b""
        while chunk := src.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not is_noise(line))
            if kept:
                os.write(out_fd, kept)
        if pending and not is_noise(pending):
            os.write(out_fd, pending)


def filter_native_stderr() -> None:
    """Install the fd-2 filter once per process (idempotent) and quieten absl's Python logger."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        logging.getLogger("absl").setLevel(logging.ERROR)
        original = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        pump = threading.Thread(target=_pump, args=(read_fd, original), name="stderr-filter", daemon=True)
        pump.start()

        def restore() -> None:
            # Closing our end of the pipe lets the pump drain what is left, then stderr is direct again.
            os.dup2(original, 2)
            pump.join(timeout=1.0)

        atexit.register(restore)
