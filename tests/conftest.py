"""Shared fixtures: real ONNX detectors for the server tests (others may append fixtures below)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import DEFAULT_MODEL
from tests.streamkit import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-presence test detector (tests/streamkit.py): real ONNX, real card, meaningful events."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_runtime(tiny_model: Path):
    from service.runtime.onnx import OnnxModelRuntime

    return OnnxModelRuntime(tiny_model, ["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trainer's real detector architecture, randomly initialised and exported by models/export.py."""
    try:
        import torch

        from models.detector import Detector
        from models.export import build_card, export_onnx
        from models.nn.config import ModelConfig
        from service.contract.model_card import PostProcess
    except ImportError as exc:  # the trainer's modules are optional for the server tests
        pytest.skip(f"models/export.py not usable here: {exc}")
    torch.manual_seed(0)
    model = Detector(ModelConfig(channels=32, window_steps=64, strides=(1, 2, 4, 8), sta_reduction=8)).eval()
    card = build_card(model, PostProcess(score_threshold=0.3), meta={}, name="mgstream-random-test")
    return export_onnx(model, tmp_path_factory.mktemp("exported") / "random.onnx", card)


@pytest.fixture(scope="session")
def default_model() -> Path:
    if not DEFAULT_MODEL.is_file():
        pytest.skip(
            f"SKIPPED LOUDLY: the trained default model {DEFAULT_MODEL} is missing; the acceptance tests "
            "that need it (streaming = offline on synthetic data, quality >= 0.9 x offline F1) did not run"
        )
    return DEFAULT_MODEL
