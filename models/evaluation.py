"""Detection metrics: the official SMG toolkit F1, a strict one-to-one F1, and ActionFormer-style mAP.

Inputs are dicts ``video_id -> list of rows`` in one unit (frames, for SMG):
predictions ``(class_id, start, end, score)`` and ground truth ``(class_id, start, end)`` (a
fourth element in ground truth is ignored). Class ids are SMG's 1-based ids.

SMG toolkit F1 (``mikecheninoulu/SMG``, ``online recognition/SMG/THDutils.py``, ``tester_SMG``),
reproduced exactly:

- overlap ``alpha = (min(end_p, end_g) - max(start_p, start_g))
  / (max(end_p, end_g) - min(start_p, start_g))``,
  raw values, no +1; a hit needs the same class **and** ``alpha > 0.3`` (strictly: 0.3 is a miss).
  Disjoint segments give a negative alpha; a zero-length union (0/0) is a miss.
- For each ground truth, the predictions of its video are scanned and the scan stops at the first
  hit: a ground truth counts at most once, so several predictions on one ground truth give one
  hit (the rest are false positives).
- The toolkit's removal of the matched prediction (``numpy.delete`` without assignment) does
  nothing, so one prediction may be the hit of several ground truths. Hence the hit count is
  "ground truths with at least one matching prediction" and precision = hits / #predictions can
  exceed 1 in that degenerate case; it is kept, not clipped, to stay identical to the toolkit.
- Counts are pooled over all sequences (micro): P = hits / #predictions, R = hits / #ground truth,
  ``F1 = 2PR / (P + R + 1e-7)``. With no predictions (or no ground truth) the toolkit divides by
  zero; here P (or R) is 0.

Strict variant: per video, predictions in descending score (stable for ties) each take the
unmatched same-class ground truth with the highest alpha > threshold; each ground truth and each
prediction is used at most once; ``F1 = 2PR / (P + R)`` (0 when both are 0).

mAP (ActionFormer / ActivityNet ``compute_average_precision_detection``): per class, predictions
of all videos in descending score; each is a true positive for the unmatched ground truth with the
highest tIoU if that tIoU >= the threshold; AP is the area under the interpolated
precision-recall curve; mAP averages classes that have ground truth, at each tIoU in 0.3:0.7:0.1,
and then over thresholds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from service.contract.classes import NUM_CLASSES

SMG_OVERLAP_THRESHOLD = 0.3
TIOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
_TOOLKIT_EPS = 1e-7

Predictions = Mapping[str, Sequence[Sequence[float]]]
GroundTruth = Mapping[str, Sequence[Sequence[float]]]


@dataclass(frozen=True)
class F1Result:
    precision: float
    recall: float
    f1: float
    num_correct: int
    num_predictions: int
    num_ground_truth: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MAPResult:
    mean: float  # mAP averaged over the tIoU thresholds
    per_threshold: dict[float, float]  # tIoU -> mAP over classes
    per_class: dict[int, float]  # class -> AP averaged over thresholds

    def to_dict(self) -> dict:
        return {
            "mean": self.mean,
            "per_threshold": {f"{k:.2f}": v for k, v in self.per_threshold.items()},
            "per_class": {str(k): v for k, v in self.per_class.items()},
        }


def _rows(
    data: Mapping[str, Sequence[Sequence[float]]], with_score: bool, what: str
) -> dict[str, np.ndarray]:
    """Validate and convert to per-video arrays: columns class, start, end[, score]."""
    width = 4 if with_score else 3
    out: dict[str, np.ndarray] = {}
    for vid, rows in data.items():
        if isinstance(rows, np.ndarray) and rows.ndim == 2 and rows.shape[1] >= width:
            arr = rows[:, :width].astype(np.float64)
        else:
            for i, row in enumerate(rows):
                if len(row) < width:
                    raise ValueError(f"{what} [{vid}] row {i}: expected {width} values, got {len(row)}")
            arr = np.asarray([list(r)[:width] for r in rows], dtype=np.float64).reshape(-1, width)
        bad = np.flatnonzero(arr[:, 2] < arr[:, 1])
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{what} [{vid}] row {i}: end {arr[i, 2]} < start {arr[i, 1]}")
        bad = np.flatnonzero(arr[:, 0] != np.round(arr[:, 0]))
        if bad.size:
            raise ValueError(f"{what} [{vid}] row {int(bad[0])}: class id {arr[bad[0], 0]} is not an integer")
        out[str(vid)] = arr
    return out


def overlap_ratio(start_p: float, end_p: float, start_g: float, end_g: float) -> float:
    """The toolkit's alpha: intersection over the union span; negative when disjoint, NaN for 0/0."""
    num = min(end_p, end_g) - max(start_p, start_g)
    den = max(end_p, end_g) - min(start_p, start_g)
    if den == 0:
        return float("nan")  # the toolkit's numpy division gives nan (0/0), never a hit
    return num / den


def _alpha_matrix(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(P, G) toolkit alphas; NaN where the union span is zero."""
    num = np.minimum(pred[:, None, 2], gt[None, :, 2]) - np.maximum(pred[:, None, 1], gt[None, :, 1])
    den = np.maximum(pred[:, None, 2], gt[None, :, 2]) - np.minimum(pred[:, None, 1], gt[None, :, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def _f1(correct: int, n_pred: int, n_gt: int, eps: float) -> F1Result:
    precision = correct / n_pred if n_pred else 0.0
    recall = correct / n_gt if n_gt else 0.0
    denom = precision + recall + eps
    f1 = 2 * precision * recall / denom if denom > 0 else 0.0
    return F1Result(precision, recall, f1, int(correct), int(n_pred), int(n_gt))


def _videos(preds: dict[str, np.ndarray], gts: dict[str, np.ndarray]) -> list[str]:
    return sorted(set(preds) | set(gts))


def _empty(width: int) -> np.ndarray:
    return np.zeros((0, width))


def toolkit_f1(
    predictions: Predictions, ground_truth: GroundTruth, threshold: float = SMG_OVERLAP_THRESHOLD
) -> F1Result:
    """The official SMG toolkit F1 (see the module docstring for the exact rule and edge cases)."""
    preds, gts = _rows(predictions, True, "predictions"), _rows(ground_truth, False, "ground truth")
    correct = n_pred = n_gt = 0
    for vid in _videos(preds, gts):
        p, g = preds.get(vid, _empty(4)), gts.get(vid, _empty(3))
        n_pred += len(p)
        n_gt += len(g)
        if len(p) and len(g):
            alpha = _alpha_matrix(p, g)
            same = p[:, None, 0] == g[None, :, 0]
            with np.errstate(invalid="ignore"):
                hit = same & (alpha > threshold)  # NaN compares False: a zero union is a miss
            correct += int(hit.any(axis=0).sum())  # each GT once; a prediction may serve several GTs
    return _f1(correct, n_pred, n_gt, _TOOLKIT_EPS)


def strict_f1(
    predictions: Predictions, ground_truth: GroundTruth, threshold: float = SMG_OVERLAP_THRESHOLD
) -> F1Result:
    """One-to-one F1: greedy by descending score, each GT and prediction matched at most once."""
    preds, gts = _rows(predictions, True, "predictions"), _rows(ground_truth, False, "ground truth")
    correct = n_pred = n_gt = 0
    for vid in _videos(preds, gts):
        p, g = preds.get(vid, _empty(4)), gts.get(vid, _empty(3))
        n_pred += len(p)
        n_gt += len(g)
        if not (len(p) and len(g)):
            continue
        alpha = _alpha_matrix(p, g)
        with np.errstate(invalid="ignore"):
            ok = (p[:, None, 0] == g[None, :, 0]) & (alpha > threshold)
        alpha = np.where(ok, alpha, -np.inf)
        taken = np.zeros(len(g), dtype=bool)
        for i in np.argsort(-p[:, 3], kind="stable"):
            cand = np.where(taken, -np.inf, alpha[i])
            j = int(np.argmax(cand))
            if np.isfinite(cand[j]):
                taken[j] = True
                correct += 1
    return _f1(correct, n_pred, n_gt, 0.0)


def _filter_class(data: Mapping[str, Sequence[Sequence[float]]], cls: int) -> dict[str, list]:
    return {vid: [r for r in rows if int(r[0]) == cls] for vid, rows in data.items()}


def per_class_f1(
    predictions: Predictions,
    ground_truth: GroundTruth,
    num_classes: int = NUM_CLASSES,
    threshold: float = SMG_OVERLAP_THRESHOLD,
    strict: bool = False,
) -> dict[int, F1Result]:
    """F1 of each class 1..num_classes (toolkit rule, or the strict rule), counts pooled over videos.

    Matching needs equal classes, so restricting both sides to one class is exact.
    """
    fn = strict_f1 if strict else toolkit_f1
    return {
        c: fn(_filter_class(predictions, c), _filter_class(ground_truth, c), threshold)
        for c in range(1, num_classes + 1)
    }


def segment_tiou(seg: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Standard tIoU of one [start, end] against (M, 2); 0 where the union is empty."""
    inter = np.clip(np.minimum(seg[1], others[:, 1]) - np.maximum(seg[0], others[:, 0]), 0, None)
    union = (seg[1] - seg[0]) + (others[:, 1] - others[:, 0]) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    mprec = np.concatenate([[0.0], precision, [0.0]])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    for i in range(len(mprec) - 2, -1, -1):
        mprec[i] = max(mprec[i], mprec[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))


def average_precision(
    predictions: Predictions, ground_truth: GroundTruth, class_id: int, tiou_thresholds=TIOU_THRESHOLDS
) -> np.ndarray:
    """AP of one class at each tIoU threshold (ActivityNet matching); NaN where the class has no GT."""
    preds, gts = _rows(predictions, True, "predictions"), _rows(ground_truth, False, "ground truth")
    return _average_precision(preds, gts, class_id, np.asarray(tiou_thresholds, dtype=np.float64))


def _average_precision(
    preds: dict[str, np.ndarray], gts: dict[str, np.ndarray], class_id: int, thr: np.ndarray
) -> np.ndarray:
    gt_by_vid = {v: g[g[:, 0] == class_id, 1:3] for v, g in gts.items()}
    npos = sum(len(g) for g in gt_by_vid.values())
    if npos == 0:
        return np.full(len(thr), np.nan)
    rows = [(v, r) for v, p in preds.items() for r in p[p[:, 0] == class_id]]
    if not rows:
        return np.zeros(len(thr))
    order = np.argsort(-np.asarray([r[3] for _, r in rows]), kind="stable")
    tp = np.zeros((len(thr), len(rows)))
    fp = np.zeros((len(thr), len(rows)))
    locks = {v: np.zeros((len(thr), len(g)), dtype=bool) for v, g in gt_by_vid.items()}
    for k, idx in enumerate(order):
        vid, row = rows[idx]
        g = gt_by_vid.get(vid)
        if g is None or not len(g):
            fp[:, k] = 1
            continue
        tiou = segment_tiou(row[1:3], g)
        ranked = np.argsort(-tiou, kind="stable")
        for t, th in enumerate(thr):
            for j in ranked:
                if tiou[j] < th:
                    break
                if locks[vid][t, j]:
                    continue
                tp[t, k] = 1
                locks[vid][t, j] = True
                break
            if not tp[t, k]:
                fp[t, k] = 1
    tp_c, fp_c = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
    recall = tp_c / npos
    precision = tp_c / (tp_c + fp_c)
    return np.asarray([_interpolated_ap(precision[t], recall[t]) for t in range(len(thr))])


def mean_average_precision(
    predictions: Predictions,
    ground_truth: GroundTruth,
    tiou_thresholds=TIOU_THRESHOLDS,
    num_classes: int = NUM_CLASSES,
) -> MAPResult:
    """mAP over classes with ground truth, per tIoU threshold, and its mean over thresholds."""
    thr = tuple(float(t) for t in tiou_thresholds)
    preds, gts = _rows(predictions, True, "predictions"), _rows(ground_truth, False, "ground truth")
    per_class: dict[int, np.ndarray] = {}
    for c in range(1, num_classes + 1):
        ap = _average_precision(preds, gts, c, np.asarray(thr))
        if not np.isnan(ap).all():
            per_class[c] = ap
    if not per_class:
        return MAPResult(0.0, {t: 0.0 for t in thr}, {})
    table = np.stack(list(per_class.values()))  # (classes, thresholds)
    per_threshold = {t: float(v) for t, v in zip(thr, table.mean(axis=0), strict=True)}
    return MAPResult(float(table.mean()), per_threshold, {c: float(ap.mean()) for c, ap in per_class.items()})


def evaluate_detections(
    predictions: Predictions,
    ground_truth: GroundTruth,
    num_classes: int = NUM_CLASSES,
    threshold: float = SMG_OVERLAP_THRESHOLD,
    tiou_thresholds=TIOU_THRESHOLDS,
) -> dict:
    """Every metric in one JSON-friendly report."""
    return {
        "smg_f1": toolkit_f1(predictions, ground_truth, threshold).to_dict(),
        "strict_f1": strict_f1(predictions, ground_truth, threshold).to_dict(),
        "map": mean_average_precision(predictions, ground_truth, tiou_thresholds, num_classes).to_dict(),
        "per_class_f1": {
            str(c): r.to_dict()
            for c, r in per_class_f1(predictions, ground_truth, num_classes, threshold).items()
        },
        "overlap_threshold": threshold,
    }
