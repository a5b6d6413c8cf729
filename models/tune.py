"""Tune post-processing (score threshold, NMS kind/IoU, minimum duration) for SMG F1 on validation.

Numpy only. The expensive part, decoding with (soft-)NMS, runs once per (method, IoU, minimum
duration) at the lowest threshold; higher thresholds are then exact filters of that result,
because greedy (soft-)NMS processes segments in descending score, so segments below a threshold
never change those above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from models.evaluation import toolkit_f1
from models.infer import SequenceOutputs, detections, to_frame_rows
from service.contract.model_card import PostProcess

DEFAULT_THRESHOLDS = tuple(float(x) for x in np.round(np.arange(0.05, 0.951, 0.05), 2))


@dataclass(frozen=True)
class TuneGrid:
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    methods: tuple[str, ...] = ("nms", "soft-nms")
    nms_ious: tuple[float, ...] = (0.3, 0.5, 0.7)  # hard NMS only
    soft_sigmas: tuple[float, ...] = (0.3,)  # soft-NMS only
    min_durations: tuple[float, ...] = (0.0, 2.0, 4.0)  # steps


@dataclass
class TuneResult:
    postprocess: PostProcess
    f1: float
    table: list[dict] = field(default_factory=list)  # every setting tried, with its F1


def best_threshold(
    outputs: list[SequenceOutputs],
    ground_truth: dict[str, list],
    pp: PostProcess,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
) -> tuple[float, float, list[tuple[float, float]]]:
    """(best threshold, its SMG F1, [(threshold, F1)]) for fixed NMS settings."""
    low = min(thresholds)
    rows = {o.video_id: to_frame_rows(o, detections(o, pp, low)) for o in outputs}
    curve = []
    for thr in thresholds:
        preds = {vid: [r for r in rs if r[3] >= thr] for vid, rs in rows.items()}
        curve.append((thr, toolkit_f1(preds, ground_truth).f1))
    best = max(curve, key=lambda c: (c[1], -abs(c[0] - 0.5)))
    return best[0], best[1], curve


def tune_postprocess(
    outputs: list[SequenceOutputs],
    ground_truth: dict[str, list],
    base: PostProcess | None = None,
    grid: TuneGrid | None = None,
) -> TuneResult:
    """Grid search maximising pooled SMG F1 over ``outputs`` (validation sequences)."""
    base = base or PostProcess()
    grid = grid or TuneGrid()
    best: TuneResult | None = None
    table = []
    for method in grid.methods:
        variants = (
            [{"nms_iou": v} for v in grid.nms_ious]
            if method == "nms"
            else [{"soft_nms_sigma": v} for v in grid.soft_sigmas]
        )
        for variant in variants:
            for min_dur in grid.min_durations:
                pp = replace(base, nms_method=method, min_duration_steps=float(min_dur), **variant)
                thr, f1, _ = best_threshold(outputs, ground_truth, pp, grid.thresholds)
                pp = replace(pp, score_threshold=float(thr))
                table.append({**pp.__dict__, "f1": f1})
                if best is None or f1 > best.f1 + 1e-12:
                    best = TuneResult(pp, f1)
    assert best is not None
    best.table = table
    return best
