"""Per-anchor model outputs over whole sequences, offline or as sliding windows. Numpy only.

Two ways to get every anchor's (scores, offsets) for a sequence:
- offline: one causal forward over the whole sequence (``models.detector.run_sequence``);
- windowed (what a server in window mode computes): every ``hop`` steps, run the window model on
  the last ``window`` steps (zeros before the stream start) and keep the anchors that became final
  in that hop, i.e. those in the newest ``hop`` steps. Each anchor is computed once, with at least
  ``window - hop`` steps of history.
Both give ``SequenceOutputs`` in absolute steps; ``detections`` decodes them with the shared
numpy decoder and converts to frames for the SMG metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from service.contract.model_card import PostProcess, anchor_steps
from service.detection.decode import Detection, decode

# (B, W, D) float32 -> scores (B, N, C), offsets (B, N, 2): the window model (torch or onnxruntime)
WindowRunner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class SequenceOutputs:
    video_id: str
    scores: np.ndarray  # (N, C)
    offsets: np.ndarray  # (N, 2) steps
    anchors: np.ndarray  # (N,) absolute steps
    num_steps: int
    frames_per_step: int = 4
    frame_offset: float = 0.0
    num_frames: int | None = None


def windowed_outputs(
    run: WindowRunner,
    steps: np.ndarray,
    window: int,
    hop: int,
    strides: tuple[int, ...],
    batch: int = 16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sliding-window outputs for one (T, D) sequence -> scores, offsets, absolute anchors.

    ``hop`` must be a multiple of the largest stride (so every window's anchor grid lines up with
    the stream's) and at most ``window``.
    """
    t, d = steps.shape
    if hop % strides[-1] or not 0 < hop <= window:
        raise ValueError(f"hop {hop} must be a multiple of {strides[-1]} in (0, {window}]")
    rel = anchor_steps(window, strides)
    fresh = rel >= window - hop  # anchors that became final in the newest hop
    ends = np.arange(hop, t + hop, hop)  # window end (exclusive) after each hop
    padded = np.zeros((hop * len(ends) + window, d), np.float32)
    padded[window : window + t] = steps  # position p of the stream lives at padded[window + p]
    scores, offsets, anchors = [], [], []
    for i in range(0, len(ends), batch):
        chunk = ends[i : i + batch]
        x = np.stack([padded[e : e + window] for e in chunk])  # stream steps [e - window, e)
        s, o = run(x)
        for j, e in enumerate(chunk):
            scores.append(s[j][fresh])
            offsets.append(o[j][fresh])
            anchors.append(rel[fresh] + e - window)
    anchors_all = np.concatenate(anchors)
    keep = anchors_all < t
    order = np.argsort(anchors_all[keep], kind="stable")
    return (
        np.concatenate(scores)[keep][order],
        np.concatenate(offsets)[keep][order],
        anchors_all[keep][order],
    )


def whole_sequence_pp(pp: PostProcess) -> PostProcess:
    """Settings for decoding a whole sequence at once: no top-k or count caps meant for one window."""
    return replace(pp, pre_nms_topk=10**7, max_detections=10**7)


def detections(out: SequenceOutputs, pp: PostProcess, score_threshold: float | None = None) -> list[Detection]:
    return decode(out.scores, out.offsets, out.anchors, whole_sequence_pp(pp), 0.0, score_threshold)


def to_frame_rows(out: SequenceOutputs, dets: list[Detection]) -> list[tuple[int, float, float, float]]:
    """(class_id, start_frame, end_frame, score) rows, clipped to the sequence."""
    limit = out.num_frames if out.num_frames is not None else out.num_steps * out.frames_per_step
    rows = []
    for d in dets:
        s = min(max(d.start_step * out.frames_per_step + out.frame_offset, 0.0), limit)
        e = min(max(d.end_step * out.frames_per_step + out.frame_offset, 0.0), limit)
        rows.append((d.class_id, s, e, d.score))
    return rows
