"""Export the window model to ONNX with its model card, and check torch/onnxruntime parity.

ONNX I/O (see service/contract/model_card.py): input ``features`` float32 (B, W, D), dynamic batch,
fixed W; outputs ``scores`` (B, N, C) sigmoid and ``offsets`` (B, N, 2) in steps.
"""

from __future__ import annotations

import datetime as _dt
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.detector import Checkpoint, Detector
from service.contract.classes import SMG_CLASSES
from service.contract.features import FeatureSpec
from service.contract.model_card import (
    OFFSETS_OUTPUT,
    SCORES_OUTPUT,
    WINDOW_INPUT,
    ModelCard,
    PostProcess,
)

OPSET = 18


class WindowModel(nn.Module):
    """The exported graph: features -> (scores, offsets in steps)."""

    def __init__(self, model: Detector) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.predict(features)


def build_card(
    model: Detector,
    postprocess: PostProcess,
    meta: dict,
    name: str = "mgstream-detector",
    version: str = "0.1.0",
) -> ModelCard:
    cfg = model.cfg
    feature = FeatureSpec.from_dict(meta["feature"]) if "feature" in meta else FeatureSpec()
    if feature.feature_dim != cfg.input_dim:
        raise ValueError(f"feature spec dim {feature.feature_dim} != model input_dim {cfg.input_dim}")
    classes = tuple(meta.get("classes", SMG_CLASSES))
    if len(classes) != cfg.num_classes:
        raise ValueError(f"{len(classes)} class names for a {cfg.num_classes}-class model")
    arch = {"type": "dyfadet-sta", **cfg.to_dict()}
    return ModelCard(
        name=name,
        version=version,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        feature=feature,
        window_steps=cfg.window_steps,
        strides=cfg.strides,
        causal=cfg.causal,
        classes=classes,
        postprocess=postprocess,
        architecture=arch,
        training_data=str(meta.get("training_data", "")),
        metrics=dict(meta.get("metrics", {})),
    )


def export_onnx(
    model: Detector,
    path: str | Path,
    card: ModelCard,
    window_steps: int | None = None,
) -> Path:
    """Write a single-file ONNX (weights inlined) with the card in metadata key ``mgstream.card``."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = window_steps or model.cfg.window_steps
    if w != card.window_steps:
        raise ValueError(f"window {w} differs from the card's window {card.window_steps}")
    model = model.eval()
    wrapper = WindowModel(model).eval()
    example = torch.zeros(2, w, model.cfg.input_dim)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter logs a lot (and warns about torchvision); keep the CLI output readable.
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            external_data=False,
            opset_version=OPSET,
            input_names=[WINDOW_INPUT],
            output_names=[SCORES_OUTPUT, OFFSETS_OUTPUT],
            dynamic_shapes={"features": {0: batch}},
            verbose=False,
        )
    return finalize_onnx(program.model_proto, card, path, "window model")


def finalize_onnx(proto, card: ModelCard, path: str | Path, what: str) -> Path:  # noqa: ANN001 - onnx.ModelProto
    """Strip per-node debug metadata, write the model card into the metadata, check and save."""
    import onnx

    # Per-node debug metadata (stack traces) doubles the file size; the graph does not need it.
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.metadata_props[:]
    for key, value in card.to_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"{card.name} {card.version}: micro-gesture detector {what}"
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))
    return Path(path)


def parity_check(model: Detector, path: str | Path, batch: int = 3, seed: int = 0) -> float:
    """Max |torch - onnxruntime| over both outputs on random inputs; raises if above 1e-4."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, model.cfg.window_steps, model.cfg.input_dim)).astype(np.float32)
    with torch.no_grad():
        ref_scores, ref_offsets = model.eval().predict(torch.from_numpy(x))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, offsets = sess.run([SCORES_OUTPUT, OFFSETS_OUTPUT], {WINDOW_INPUT: x})
    diff = max(float(np.abs(scores - ref_scores.numpy()).max()), float(np.abs(offsets - ref_offsets.numpy()).max()))
    if diff > 1e-4:
        raise RuntimeError(f"ONNX parity check failed: max abs diff {diff:.2e} > 1e-4 ({path})")
    return diff


def export_checkpoint(ckpt: Checkpoint, path: str | Path, name: str, version: str) -> tuple[ModelCard, float]:
    card = build_card(ckpt.model, ckpt.postprocess, ckpt.meta, name=name, version=version)
    export_onnx(ckpt.model, path, card)
    return card, parity_check(ckpt.model, path)


def update_card(path: str | Path, **changes) -> ModelCard:
    """Rewrite fields of the card stored in an exported ONNX file (e.g. held-out metrics)."""
    from dataclasses import replace

    import onnx

    proto = onnx.load_model(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    card = replace(ModelCard.from_metadata(props), **changes)
    for entry in proto.metadata_props:
        if entry.key in card.to_metadata():
            entry.value = card.to_metadata()[entry.key]
    onnx.save_model(proto, str(path))
    return card


def detector_from_onnx(path: str | Path, check: bool = True) -> tuple[Detector, ModelCard]:
    """Rebuild the torch Detector of an exported window model from its card and initializers.

    Lets a fresh clone derive further exports (e.g. the step model) from the shipped ONNX alone,
    with exactly its weights. The exporter merges initializers with identical values; in a trained
    model the only such pair is ``dfa_w.agg_bias`` / ``dfa_wide.agg_bias`` of a DynE layer (both
    biases are summed, so they always receive the same gradient), which is restored from its
    sibling. ``check`` verifies torch against onnxruntime on random input (1e-4).
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model(str(path))
    card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    model = Detector.from_config(card.architecture).eval()
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    state = {}
    for key, ref in model.state_dict().items():
        value = inits.get(f"model.{key}")
        if value is None and key.endswith("dfa_wide.agg_bias"):
            value = inits.get(f"model.{key.replace('dfa_wide.agg_bias', 'dfa_w.agg_bias')}")
        if value is None:
            raise ValueError(f"{path}: weight {key} not found among the ONNX initializers")
        state[key] = torch.from_numpy(np.array(value, dtype=np.float32)).reshape(ref.shape)
    model.load_state_dict(state)
    if check:
        parity_check(model, path)
    return model, card
