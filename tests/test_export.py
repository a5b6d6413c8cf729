"""ONNX export of the window model: torch/onnxruntime parity, dynamic batch, complete card, torch-free loading."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads stall on 2 shared cores

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from models.detector import Checkpoint, Detector  # noqa: E402
from models.export import export_checkpoint  # noqa: E402
from models.nn.config import ModelConfig  # noqa: E402
from service.contract.features import DEFAULT_SPEC  # noqa: E402
from service.contract.model_card import ModelCard, PostProcess, anchor_steps  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "default" / "mgstream-default.onnx"
TINY = ModelConfig(channels=16, strides=(1, 2, 4), window_steps=32, head_layers=1, sta_reduction=4)

# Runs in a fresh interpreter: the server side must load a model with onnxruntime alone.
TORCH_FREE_LOAD = """
import json, sys
import numpy as np
import onnxruntime as ort
from service.contract.model_card import ModelCard
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
card = ModelCard.from_metadata(sess.get_modelmeta().custom_metadata_map)
x = np.zeros((2, card.window_steps, card.feature.feature_dim), np.float32)
scores, offsets = sess.run(["scores", "offsets"], {"features": x})
assert "torch" not in sys.modules, "torch was imported"
print(json.dumps({"scores": list(scores.shape), "offsets": list(offsets.shape), "anchors": card.num_anchors}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Detector, Path, ModelCard, float]:
    torch.manual_seed(0)
    model = Detector(TINY)
    model.set_feature_stats(np.linspace(-1, 1, 372), np.linspace(0.5, 2, 372))
    model.eval()
    path = tmp_path_factory.mktemp("export") / "tiny.onnx"
    meta = {"training_data": "random weights (test)", "metrics": {"note": "untrained"}}
    pp = PostProcess(score_threshold=0.35, nms_method="soft-nms", min_duration_steps=2.0)
    card, diff = export_checkpoint(Checkpoint(model, pp, meta), path, name="tiny", version="9.9.9")
    return model, path, card, diff


def test_parity_with_torch_and_dynamic_batch(exported) -> None:
    model, path, _, diff = exported
    assert diff <= 1e-4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for batch in (1, 5):
        x = (3 * rng.normal(size=(batch, TINY.window_steps, TINY.input_dim))).astype(np.float32)
        scores, offsets = sess.run(["scores", "offsets"], {"features": x})
        with torch.no_grad():
            ref_s, ref_o = model.predict(torch.from_numpy(x))
        np.testing.assert_allclose(scores, ref_s.numpy(), atol=1e-4)
        np.testing.assert_allclose(offsets, ref_o.numpy(), atol=1e-4)
        assert scores.shape == (batch, len(anchor_steps(TINY.window_steps, TINY.strides)), 17)


def test_io_names_and_single_file(exported) -> None:
    _, path, _, _ = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "features" and inp.shape[1:] == [TINY.window_steps, TINY.input_dim]
    assert not isinstance(inp.shape[0], int)  # dynamic batch
    assert [o.name for o in sess.get_outputs()] == ["scores", "offsets"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.onnx"]  # weights inlined


def test_card_is_complete_and_rebuilds_the_model(exported) -> None:
    model, path, card, _ = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    read = ModelCard.from_metadata(sess.get_modelmeta().custom_metadata_map)
    assert read.name == "tiny" and read.version == "9.9.9" and read.created
    assert read.feature == DEFAULT_SPEC and read.window_steps == 32 and read.strides == (1, 2, 4)
    assert read.causal is True and len(read.classes) == 17
    assert read.postprocess == PostProcess(score_threshold=0.35, nms_method="soft-nms", min_duration_steps=2.0)
    assert read.training_data == "random weights (test)" and read.metrics == {"note": "untrained"}
    assert read.architecture["type"] == "dyfadet-sta"
    assert Detector.from_config(read.architecture).cfg == model.cfg


def test_loads_with_onnxruntime_alone(exported) -> None:
    _, path, card, _ = exported
    out = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_LOAD, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    shapes = json.loads(out.stdout.strip().splitlines()[-1])
    assert shapes == {"scores": [2, card.num_anchors, 17], "offsets": [2, card.num_anchors, 2], "anchors": 56}


def test_shipped_default_model_loads_without_torch_and_has_a_complete_card() -> None:
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} not shipped in this checkout")
    assert SHIPPED.stat().st_size < 8_000_000
    out = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_LOAD, str(SHIPPED)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    sess = ort.InferenceSession(str(SHIPPED), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata(sess.get_modelmeta().custom_metadata_map)
    assert card.causal and card.feature == DEFAULT_SPEC and len(card.classes) == 17
    assert card.training_data and "synthetic" in card.training_data
    assert {"val_smg_f1", "test_smg_f1_offline", "test_smg_f1_windowed"} <= set(card.metrics)
    assert card.architecture["type"] == "dyfadet-sta" and card.version


def test_shipped_default_model_rebuilds_in_torch_with_its_exact_weights() -> None:
    """A fresh clone can derive further exports (the step model) from the shipped ONNX alone."""
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} not shipped in this checkout")
    from models.export import detector_from_onnx

    model, card = detector_from_onnx(SHIPPED, check=True)  # raises above 1e-4 torch/onnxruntime difference
    assert model.cfg.window_steps == card.window_steps and model.cfg.causal
