"""Center-sampled label assignment on the model card's anchor grid. Numpy only (torch-free).

Anchors come from ``service.contract.model_card.anchor_steps`` / ``anchor_strides``, the same
functions the server decodes with: anchor i of stride s sits at step p = (i+1)*s - 1.

For each ground-truth segment [start, end] (steps, window-relative) an anchor is positive when
1. it lies inside the segment (start <= p <= end);
2. it lies within ``radius * s`` of the sampling centre c = start + center_frac * (end - start).
   A causal anchor has seen the gesture only up to p, so centre sampling moves toward the end
   (center_frac 0.75 by default for causal models) to limit how much it must extrapolate;
3. max(p - start, end - p) lies in its level's regression range (steps).
Ties go to the shortest segment; segments of (almost) equal length give multi-hot classes.
Segments flagged ``ignore`` (cut by the window start, so the model cannot see their beginning)
make their would-be positives neither positive nor negative (weight 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.contract.model_card import anchor_steps, anchor_strides

INF = 1e8


def default_ranges(strides: tuple[int, ...] | list[int]) -> list[tuple[float, float]]:
    """Regression ranges in steps: [0, 4s_0], [4s_0, 8s_0], ... with the last level open-ended."""
    ranges = []
    for i, s in enumerate(strides):
        lo = 0.0 if i == 0 else 2.0 * s
        hi = INF if i == len(strides) - 1 else 4.0 * s
        ranges.append((lo, hi))
    return ranges


@dataclass(frozen=True)
class AssignConfig:
    center_frac: float = 0.75  # where along the segment centre sampling is centred (0.5 = middle)
    radius: float = 1.5  # in level strides
    ranges: tuple[tuple[float, float], ...] | None = None  # per level, steps; None -> default_ranges

    def level_ranges(self, strides: tuple[int, ...]) -> list[tuple[float, float]]:
        if self.ranges is None:
            return default_ranges(strides)
        if len(self.ranges) != len(strides):
            raise ValueError(f"{len(self.ranges)} regression ranges for {len(strides)} levels")
        return [(float(a), float(b)) for a, b in self.ranges]


@dataclass
class Targets:
    cls: np.ndarray  # (N, C) float32 one-/multi-hot, zeros for negatives
    reg: np.ndarray  # (N, 2) float32 distances (start, end) in level-stride units, valid where pos
    pos: np.ndarray  # (N,) bool
    weight: np.ndarray  # (N,) float32: 1 to train on, 0 to ignore (padding, cut segments)


def assign(
    segments: np.ndarray,
    labels: np.ndarray,
    window_steps: int,
    strides: tuple[int, ...],
    num_classes: int,
    cfg: AssignConfig = AssignConfig(),  # noqa: B008 - frozen dataclass, safe as a default
    valid_steps: int | None = None,
    ignore: np.ndarray | None = None,
) -> Targets:
    """Targets for one window. segments (M, 2) steps relative to the window; labels (M,) 1-based.

    ``valid_steps``: anchors at steps >= this (right padding) get weight 0.
    ``ignore``: (M,) bool, segments whose positives are excluded from the loss.
    """
    points = anchor_steps(window_steps, strides).astype(np.float64)
    point_strides = anchor_strides(window_steps, strides).astype(np.float64)
    n = points.shape[0]
    cls = np.zeros((n, num_classes), np.float32)
    reg = np.zeros((n, 2), np.float32)
    pos = np.zeros(n, bool)
    weight = np.ones(n, np.float32)
    if valid_steps is not None:
        weight[points >= valid_steps] = 0.0
    segments = np.asarray(segments, np.float64).reshape(-1, 2)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if segments.shape[0] == 0:
        return Targets(cls, reg, pos, weight)
    if labels.shape[0] != segments.shape[0]:
        raise ValueError(f"{segments.shape[0]} segments but {labels.shape[0]} labels")
    if labels.min() < 1 or labels.max() > num_classes:
        raise ValueError(f"labels must be in 1..{num_classes}, got {labels.min()}..{labels.max()}")
    ignore = np.zeros(segments.shape[0], bool) if ignore is None else np.asarray(ignore, bool)

    lo_hi = np.zeros((n, 2))
    offset = 0
    for (lo, hi), s in zip(cfg.level_ranges(tuple(strides)), strides, strict=True):
        count = window_steps // s
        lo_hi[offset : offset + count] = (lo, hi)
        offset += count

    start, end = segments[:, 0][None, :], segments[:, 1][None, :]  # (1, M)
    p = points[:, None]  # (N, 1)
    left, right = p - start, end - p  # (N, M)
    centre = start + cfg.center_frac * (end - start)
    r = cfg.radius * point_strides[:, None]
    inside = (left >= 0) & (right >= 0)
    near_centre = (p >= np.maximum(centre - r, start)) & (p <= np.minimum(centre + r, end))
    reach = np.maximum(left, right)
    in_range = (reach >= lo_hi[:, :1]) & (reach <= lo_hi[:, 1:])
    ok = inside & near_centre & in_range

    lengths = np.where(ok, (end - start), np.inf)  # (N, M)
    best = lengths.min(axis=1)
    matched = np.isfinite(best)
    winners = ok & (lengths <= best[:, None] + 1e-3)
    for j in range(segments.shape[0]):
        rows = winners[:, j]
        if not rows.any():
            continue
        if ignore[j]:
            weight[rows] = 0.0
            continue
        cls[rows, labels[j] - 1] = 1.0
    # Regression target from the (first) shortest segment.
    first = np.argmin(lengths, axis=1)
    rows = matched & ~ignore[first] & (weight > 0)
    idx = np.flatnonzero(rows)
    reg[idx, 0] = (left[idx, first[idx]] / point_strides[idx]).astype(np.float32)
    reg[idx, 1] = (right[idx, first[idx]] / point_strides[idx]).astype(np.float32)
    pos[idx] = True
    cls[~pos] = 0.0
    return Targets(cls, reg, pos, weight)
