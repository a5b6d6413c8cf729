"""Evaluate a trained model (checkpoint ``.pt`` or exported ``.onnx``) on a data split.

Modes: ``offline`` runs the causal model once over each whole sequence (checkpoints only: the
ONNX window model has a fixed window); ``windowed`` runs window W every hop H steps, as a server
in window mode does (see models/infer.py). Metrics: SMG toolkit F1, strict F1, mAP, per class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.datasets import Sequence
from models.evaluation import evaluate_detections
from models.infer import SequenceOutputs, WindowRunner, detections, to_frame_rows, windowed_outputs
from service.contract.model_card import PostProcess


@dataclass
class LoadedModel:
    runner: WindowRunner  # (B, W, D) -> scores, offsets
    window: int
    strides: tuple[int, ...]
    postprocess: PostProcess
    input_dim: int
    offline: object | None = None  # models.detector.Detector, for whole-sequence runs


def load_onnx(path: str | Path, threads: int = 0) -> LoadedModel:
    import onnxruntime as ort

    from service.contract.model_card import OFFSETS_OUTPUT, SCORES_OUTPUT, WINDOW_INPUT, ModelCard

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata(sess.get_modelmeta().custom_metadata_map)

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, o = sess.run([SCORES_OUTPUT, OFFSETS_OUTPUT], {WINDOW_INPUT: x.astype(np.float32)})
        return s, o

    return LoadedModel(run, card.window_steps, card.strides, card.postprocess, card.feature.feature_dim)


def load_torch(path: str | Path) -> LoadedModel:
    import torch

    from models.detector import load_checkpoint

    ckpt = load_checkpoint(path)
    model = ckpt.model

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            s, o = model.predict(torch.from_numpy(x.astype(np.float32)))
        return s.numpy(), o.numpy()

    cfg = model.cfg
    return LoadedModel(run, cfg.window_steps, cfg.strides, ckpt.postprocess, cfg.input_dim, offline=model)


def load_model(path: str | Path) -> LoadedModel:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model {path} does not exist")
    return load_onnx(path) if path.suffix == ".onnx" else load_torch(path)


def sequence_outputs(model: LoadedModel, seqs: list[Sequence], mode: str, hop: int) -> list[SequenceOutputs]:
    out = []
    for s in seqs:
        if s.steps.shape[1] != model.input_dim:
            raise ValueError(f"{s.video_id}: feature dim {s.steps.shape[1]} != model input dim {model.input_dim}")
        if mode == "offline":
            if model.offline is None:
                raise ValueError("offline mode needs a checkpoint (.pt); an ONNX window model runs windowed")
            from models.detector import run_sequence

            scores, offsets, anchors = run_sequence(model.offline, s.steps)
        elif mode == "windowed":
            scores, offsets, anchors = windowed_outputs(model.runner, s.steps, model.window, hop, model.strides)
        else:
            raise ValueError(f"mode must be offline or windowed, got {mode!r}")
        out.append(
            SequenceOutputs(
                s.video_id, scores, offsets, anchors, s.steps.shape[0], s.frames_per_step, s.frame_offset, s.num_frames
            )
        )
    return out


def evaluate_outputs(outputs: list[SequenceOutputs], seqs: list[Sequence], pp: PostProcess) -> dict:
    preds = {o.video_id: to_frame_rows(o, detections(o, pp)) for o in outputs}
    gt = {s.video_id: s.ground_truth() for s in seqs}
    result = evaluate_detections(preds, gt)
    low = PostProcess(**{**pp.__dict__, "score_threshold": 0.01})
    ranked = {o.video_id: to_frame_rows(o, detections(o, low)) for o in outputs}
    result["map"] = evaluate_detections(ranked, gt)["map"]
    return result
