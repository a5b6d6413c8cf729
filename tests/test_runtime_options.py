"""The ONNX session is built with the threading the settings ask for (a CPU server's default: one quiet thread)."""

from __future__ import annotations

from pathlib import Path

from service.config import Settings
from service.runtime.onnx import load_runtime


def _threading(runtime) -> tuple[int, str]:  # noqa: ANN001
    options = runtime._session.get_session_options()
    return options.intra_op_num_threads, options.get_session_config_entry("session.intra_op.allow_spinning")


def test_default_session_uses_one_thread_that_does_not_spin(tiny_model: Path) -> None:
    runtime = load_runtime(Settings(model_path=tiny_model, providers=["CPUExecutionProvider"]))
    assert _threading(runtime) == (1, "0")


def test_thread_settings_reach_the_session(tiny_model: Path) -> None:
    settings = Settings(
        model_path=tiny_model, providers=["CPUExecutionProvider"], intra_op_threads=2, intra_op_spinning=True
    )
    assert _threading(load_runtime(settings)) == (2, "1")
