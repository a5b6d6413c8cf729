"""End to end through the CLI: synth -> train a few steps -> export (+ held-out scoring) -> onnxruntime -> evaluate."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads stall on 2 shared cores

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from typer.testing import CliRunner  # noqa: E402

from models.datasets import load_smg  # noqa: E402
from models.infer import windowed_outputs  # noqa: E402
from models.run_eval import load_onnx, load_torch  # noqa: E402
from service.cli import app  # noqa: E402
from service.contract.model_card import ModelCard  # noqa: E402

TINY_RUN = {
    "name": "e2e-tiny",
    "version": "0.0.1",
    "model": {"channels": 16, "strides": [1, 2, 4], "window_steps": 32, "head_layers": 1, "sta_reduction": 4},
    "train": {"iterations": 6, "batch_size": 4, "warmup_iterations": 2, "eval_every": 3, "threads": 2, "lr": 0.003},
}


def invoke(args: list[str]):
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_synth_train_export_onnxruntime_evaluate(tmp_path: Path) -> None:
    data = tmp_path / "synth"
    invoke(["synth", str(data), "--sequences", "5", "--frames", "640", "--seed", "3"])
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "data": {"root": str(data)}}))

    run = tmp_path / "run"
    invoke(["train", "--config", str(config), "--out", str(run), "--no-progress"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metrics"]["iterations"] == 6 and len(metrics["history"]) == 2  # validated at 3 and 6
    assert 0.0 <= metrics["metrics"]["val_smg_f1"] <= 1.0

    onnx_path = tmp_path / "tiny.onnx"
    report = tmp_path / "heldout.json"
    invoke(
        ["export", str(run / "best.pt"), "--out", str(onnx_path), "--eval-data", str(data), "--hop", "8"]
        + ["--json", str(report)]
    )
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata(sess.get_modelmeta().custom_metadata_map)
    assert card.name == "e2e-tiny" and card.window_steps == 32 and card.causal
    assert "synthetic" in card.training_data and "val_smg_f1" in card.metrics
    assert {"test_smg_f1_offline", "test_smg_f1_windowed", "eval_hop_steps"} <= set(card.metrics)
    # The incremental step model is exported beside it, carrying the same card plus its state layout.
    step_sess = ort.InferenceSession(str(tmp_path / "tiny.step.onnx"), providers=["CPUExecutionProvider"])
    step_card = ModelCard.from_metadata(step_sess.get_modelmeta().custom_metadata_map)
    assert step_card.step_model is not None and step_card.step_model["chunk_steps"] == 4
    assert step_card.architecture == card.architecture and step_card.metrics == card.metrics
    held_out = json.loads(report.read_text())["results"]
    assert set(held_out) == {"offline", "windowed"}
    assert {"smg_f1", "strict_f1", "map", "per_class_f1"} <= set(held_out["windowed"])

    # The ONNX window model and the torch checkpoint agree on real (synthetic) features, window by window.
    (seq,) = [s for s in load_smg(data, "test")]
    onnx_model, torch_model = load_onnx(onnx_path), load_torch(run / "best.pt")
    s_onnx, o_onnx, a_onnx = windowed_outputs(onnx_model.runner, seq.steps, 32, 8, (1, 2, 4))
    s_torch, o_torch, a_torch = windowed_outputs(torch_model.runner, seq.steps, 32, 8, (1, 2, 4))
    np.testing.assert_array_equal(a_onnx, a_torch)
    np.testing.assert_allclose(s_onnx, s_torch, atol=1e-4)
    np.testing.assert_allclose(o_onnx, o_torch, atol=1e-4)
    assert a_onnx.max() < seq.steps.shape[0]

    out = tmp_path / "eval.json"
    invoke(["evaluate", str(onnx_path), "--data", str(data), "--split", "test", "--hop", "8", "--json", str(out)])
    evaluated = json.loads(out.read_text())["results"]
    assert list(evaluated) == ["windowed"]  # an ONNX window model has no whole-sequence mode
    assert evaluated["windowed"]["smg_f1"] == held_out["windowed"]["smg_f1"]


def test_train_rejects_feature_dim_mismatch(tmp_path: Path) -> None:
    data = tmp_path / "synth"
    invoke(["synth", str(data), "--sequences", "3", "--frames", "200", "--seed", "1"])
    config = tmp_path / "bad.yaml"
    bad = {**TINY_RUN, "model": {**TINY_RUN["model"], "input_dim": 100}, "data": {"root": str(data)}}
    config.write_text(yaml.safe_dump(bad))
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0
    # The error panel wraps with the terminal width (and the temp path's length): read it as one line.
    text = " ".join(result.output.replace("│", " ").split())
    assert "feature dim 372 does not match the expected 100" in text
