"""Decode detector outputs into segments: threshold, top-k, (soft-)NMS, minimum duration. Numpy only.

The trainer's evaluation, the live server and batch jobs all call this, with the post-processing
settings stored in the model card.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.contract.model_card import PostProcess


@dataclass(frozen=True)
class Detection:
    """One segment in step units (continuous): frames are ``step * frames_per_step``."""

    class_id: int  # 1-based, as in SMG
    score: float
    start_step: float
    end_step: float


def segment_iou(seg: np.ndarray, others: np.ndarray) -> np.ndarray:
    """tIoU of one [start, end] segment against an (M, 2) array."""
    inter = np.clip(np.minimum(seg[1], others[:, 1]) - np.maximum(seg[0], others[:, 0]), 0, None)
    union = (seg[1] - seg[0]) + (others[:, 1] - others[:, 0]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def _hard_nms(segs: np.ndarray, scores: np.ndarray, pp: PostProcess) -> tuple[np.ndarray, np.ndarray]:
    """Greedy NMS in one pass over the candidates sorted by score (stable: ties keep their order, as
    the argmax loop of soft-NMS would pick them); scores never change, so no re-ranking is needed."""
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] >= pp.score_threshold]
    kept: list[int] = []
    while order.size and len(kept) < pp.max_detections:
        best, order = order[0], order[1:]
        kept.append(int(best))
        if order.size:
            order = order[segment_iou(segs[best], segs[order]) <= pp.nms_iou]
    return segs[kept].reshape(-1, 2), scores[kept]


def _nms_one_class(segs: np.ndarray, scores: np.ndarray, pp: PostProcess) -> tuple[np.ndarray, np.ndarray]:
    if pp.nms_method != "soft-nms":
        return _hard_nms(segs, scores, pp)
    segs, scores = segs.copy(), scores.copy()
    kept_segs, kept_scores = [], []
    while scores.size and len(kept_scores) < pp.max_detections:
        best = int(np.argmax(scores))
        if scores[best] < pp.score_threshold:
            break
        kept_segs.append(segs[best])
        kept_scores.append(scores[best])
        segs = np.delete(segs, best, axis=0)
        scores = np.delete(scores, best)
        if not scores.size:
            break
        iou = segment_iou(kept_segs[-1], segs)
        if pp.nms_method == "soft-nms":
            scores = scores * np.exp(-(iou**2) / pp.soft_nms_sigma)
        else:
            keep = iou <= pp.nms_iou
            segs, scores = segs[keep], scores[keep]
    return np.asarray(kept_segs).reshape(-1, 2), np.asarray(kept_scores)


def decode(
    scores: np.ndarray,
    offsets: np.ndarray,
    anchors: np.ndarray,
    pp: PostProcess,
    step_offset: float = 0.0,
    score_threshold: float | None = None,
) -> list[Detection]:
    """Decode one sequence's outputs.

    scores (N, C) probabilities, offsets (N, 2) distances in steps, anchors (N,) step indices
    (window-relative); ``step_offset`` shifts the result to stream-absolute steps.
    """
    threshold = pp.score_threshold if score_threshold is None else score_threshold
    flat = scores.reshape(-1)
    candidates = np.flatnonzero(flat >= threshold)
    if candidates.size == 0:  # the usual case between gestures: skip the rest on the hot path
        return []
    if candidates.size > pp.pre_nms_topk:
        candidates = candidates[np.argsort(-flat[candidates], kind="stable")[: pp.pre_nms_topk]]
    anchor_idx, class_idx = np.divmod(candidates, scores.shape[1])
    starts = anchors[anchor_idx] - offsets[anchor_idx, 0]
    ends = anchors[anchor_idx] + offsets[anchor_idx, 1]
    long_enough = (ends - starts) >= pp.min_duration_steps
    anchor_idx, class_idx = anchor_idx[long_enough], class_idx[long_enough]
    segs = np.stack([starts[long_enough], ends[long_enough]], axis=1)
    cand_scores = flat[candidates[long_enough]]

    pp_used = PostProcess(**{**pp.__dict__, "score_threshold": threshold})
    out: list[Detection] = []
    for c in np.unique(class_idx):
        mask = class_idx == c
        kept, kept_scores = _nms_one_class(segs[mask], cand_scores[mask], pp_used)
        out.extend(
            Detection(int(c) + 1, float(s), float(a) + step_offset, float(b) + step_offset)
            for (a, b), s in zip(kept, kept_scores, strict=True)
        )
    out.sort(key=lambda d: (-d.score, d.start_step, d.class_id))
    return out[: pp.max_detections]
