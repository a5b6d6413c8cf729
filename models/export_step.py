"""Export the step form of the causal detector to ONNX, with its state layout in the model card.

The step ONNX sits next to the window ONNX (``X.onnx`` -> ``X.step.onnx``) and carries the same
card plus ``step_model`` (service/contract/step_layout.py): chunk size, state tensors, slots and
the segment map of the flat state vector. Batch is dynamic, the chunk size H is fixed.

Reproducible export of the shipped pair from the trained checkpoint::

    mgstream export runs/default/best.pt --out models/default/mgstream-default.onnx   # window model
    python -m models.export_step runs/default/best.pt models/default/mgstream-default.step.onnx --chunk 4

The step export reuses the card of the window ONNX beside it (name, version, metrics, post-processing)
when that was exported from the same architecture, and adds the ``step_model`` layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from models.detector import Checkpoint, Detector, load_checkpoint
from models.step import StepDetector
from service.contract.model_card import ModelCard
from service.contract.step_layout import (
    FEATURES_INPUT,
    OFFSETS_OUTPUT,
    PHASE_INPUT,
    PHASE_OUTPUT,
    SCORES_OUTPUT,
    STATE_INPUT,
    STATE_OUTPUT,
    VALID_OUTPUT,
)
from service.runtime.step_runtime import step_model_path

OPSET = 18
DEFAULT_CHUNK = 4
INPUTS = [FEATURES_INPUT, STATE_INPUT, PHASE_INPUT]
OUTPUTS = [SCORES_OUTPUT, OFFSETS_OUTPUT, VALID_OUTPUT, STATE_OUTPUT, PHASE_OUTPUT]


def step_path_for(window_path: str | Path) -> Path:
    """``models/default/x.onnx`` -> ``models/default/x.step.onnx``: where the server looks for it."""
    return step_model_path(window_path)


def step_card(card: ModelCard, step: StepDetector) -> ModelCard:
    return dataclasses.replace(card, step_model=step.layout.to_dict())


def export_step_onnx(model: Detector, path: str | Path, card: ModelCard, chunk_steps: int = DEFAULT_CHUNK) -> Path:
    """Write a single-file step ONNX (weights inlined); the card gains the ``step_model`` layout."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = StepDetector(model.eval(), chunk_steps).eval()
    card = step_card(card, step)
    # A non-zero example state, so no branch is specialised on zeros; batch 2 keeps batch symbolic.
    example = (
        torch.zeros(2, chunk_steps, model.cfg.input_dim),
        torch.zeros(2, step.state_size),
        torch.zeros(2, 1),
    )
    # The TorchScript exporter: the graph is static apart from the batch axis, and the dynamo
    # exporter takes minutes on this many small ops; onnx.load + checker validate the result.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        buffer = io.BytesIO()
        torch.onnx.export(
            step,
            example,
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=INPUTS,
            output_names=OUTPUTS,
            dynamic_axes={name: {0: "batch"} for name in INPUTS + OUTPUTS},
        )
    from models.export import finalize_onnx

    proto = onnx.load_from_string(buffer.getvalue())
    return finalize_onnx(proto, card, path, f"step model (chunk {chunk_steps})")


def step_parity_check(model: Detector, path: str | Path, chunks: int = 12, batch: int = 3, seed: int = 0) -> float:
    """Run ``chunks`` chunks through torch and onnxruntime, each feeding back its own state; return the
    max |diff| over valid outputs and states. Streams start at different chunks (mixed phases)."""
    import onnxruntime as ort

    from service.contract.step_layout import StepLayout

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    layout = StepLayout.from_dict(ModelCard.from_metadata(sess.get_modelmeta().custom_metadata_map).step_model)
    step = StepDetector(model.eval(), layout.chunk_steps).eval()
    rng = np.random.default_rng(seed)
    h, d = layout.chunk_steps, model.cfg.input_dim
    state = np.zeros((batch, layout.state_size), np.float32)
    phase = np.zeros((batch, 1), np.float32)
    t_state, t_phase = torch.from_numpy(state.copy()), torch.from_numpy(phase.copy())
    worst = 0.0
    for c in range(chunks):
        x = rng.normal(size=(batch, h, d)).astype(np.float32)
        for b in range(batch):  # stream b joins at chunk b: fresh state until then
            if c <= b:
                state[b] = 0.0
                phase[b] = 0
                t_state[b] = 0.0
                t_phase[b] = 0
        scores, offsets, valid, state, phase = sess.run(
            OUTPUTS, {FEATURES_INPUT: x, STATE_INPUT: state, PHASE_INPUT: phase}
        )
        with torch.no_grad():
            ts, to, tv, t_state, t_phase = step(torch.from_numpy(x), t_state, t_phase)
        if not np.array_equal(valid, tv.numpy()) or not np.array_equal(phase, t_phase.numpy()):
            raise RuntimeError(f"step ONNX parity: valid flags or phase differ at chunk {c} ({path})")
        worst = max(
            worst,
            float(np.abs(scores - ts.numpy())[valid].max(initial=0.0)),
            float(np.abs(offsets - to.numpy())[valid].max(initial=0.0)),
            float(np.abs(state - t_state.numpy()).max()),
        )
        state = state.astype(np.float32)
        t_state = torch.from_numpy(state.copy())  # keep both paths on one state trajectory
    if worst > 1e-4:
        raise RuntimeError(f"step ONNX parity check failed: max abs diff {worst:.2e} > 1e-4 ({path})")
    return worst


def export_step_checkpoint(
    ckpt: Checkpoint,
    path: str | Path,
    name: str,
    version: str,
    chunk_steps: int = DEFAULT_CHUNK,
    window_card: ModelCard | None = None,
) -> tuple[ModelCard, float]:
    """Export and parity-check. With ``window_card`` (the card of the window ONNX exported from the same
    checkpoint) the step model carries that card, metrics included, plus its ``step_model`` layout."""
    from models.export import build_card

    card = build_card(ckpt.model, ckpt.postprocess, ckpt.meta, name=name, version=version)
    if window_card is not None:
        if window_card.architecture != card.architecture:
            raise ValueError("the window model beside the output was not exported from this checkpoint's architecture")
        card = window_card
    export_step_onnx(ckpt.model, path, card, chunk_steps)
    return ModelCard.from_metadata(_metadata(path)), step_parity_check(ckpt.model, path)


def check_same_weights(model: Detector, window_path: str | Path, tol: float = 1e-4) -> float:
    """Max |window ONNX - torch| on a random window: proves the window model beside the step export
    comes from the same weights (same architecture is not enough)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(window_path), providers=["CPUExecutionProvider"])
    w = sess.get_inputs()[0].shape[1]
    x = np.random.default_rng(0).normal(size=(2, w, model.cfg.input_dim)).astype(np.float32)
    with torch.no_grad():
        ref = model.eval().predict(torch.from_numpy(x))[0].numpy()
    diff = float(np.abs(sess.run([SCORES_OUTPUT], {FEATURES_INPUT: x})[0] - ref).max())
    if diff > tol:
        raise ValueError(f"{window_path} was not exported from these weights (max score diff {diff:.2e})")
    return diff


def export_step_beside(
    ckpt: Checkpoint, window_path: str | Path, chunk_steps: int = DEFAULT_CHUNK
) -> tuple[Path, ModelCard, float]:
    """Export the step model next to a window model exported from the same checkpoint, where the
    server looks for it (``x.onnx`` -> ``x.step.onnx``), carrying the window model's card."""
    window_card = ModelCard.from_metadata(_metadata(window_path))
    check_same_weights(ckpt.model, window_path)
    out = step_path_for(window_path)
    card, diff = export_step_checkpoint(ckpt, out, window_card.name, window_card.version, chunk_steps, window_card)
    return out, card, diff


def _metadata(path: str | Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export the step (incremental) ONNX of a trained checkpoint.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path, help="e.g. models/default/mgstream-default.step.onnx")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="steps per call (power of two)")
    parser.add_argument("--name", default=None, help="card name (default: the window model's beside it)")
    parser.add_argument("--version", default=None, help="card version (default: the window model's beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # hundreds of tiny ops per chunk: extra threads only add synchronisation
    ckpt = load_checkpoint(args.checkpoint)
    window = args.output.with_name(args.output.name.replace(".step.onnx", ".onnx"))
    window_card = None
    if window.is_file() and window != args.output:
        window_card = ModelCard.from_metadata(_metadata(window))
        check_same_weights(ckpt.model, window)
    name = args.name or (window_card.name if window_card else ckpt.meta.get("name", "mgstream-detector"))
    version = args.version or (window_card.version if window_card else ckpt.meta.get("version", "0.1.0"))
    card, diff = export_step_checkpoint(ckpt, args.output, name, version, args.chunk, window_card)
    layout = card.step_model or {}
    print(
        f"wrote {args.output}: chunk {layout.get('chunk_steps')}, state {layout.get('state_size')} floats "
        f"per stream, {len(layout.get('slots', {}).get('level', []))} slots; torch/ORT max diff {diff:.2e}"
    )


if __name__ == "__main__":
    main()
