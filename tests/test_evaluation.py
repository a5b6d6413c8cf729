"""The SMG toolkit F1 rule, the strict one-to-one F1 and mAP on hand-made cases."""

from __future__ import annotations

import math

import pytest

from models.evaluation import (
    average_precision,
    evaluate_detections,
    mean_average_precision,
    overlap_ratio,
    per_class_f1,
    strict_f1,
    toolkit_f1,
)


def f1_of(p: float, r: float, eps: float = 1e-7) -> float:
    return 2 * p * r / (p + r + eps)


def test_overlap_ratio_is_intersection_over_union_span():
    assert overlap_ratio(0, 10, 5, 15) == pytest.approx(5 / 15)
    assert overlap_ratio(0, 10, 20, 30) == pytest.approx(-10 / 30)  # disjoint: negative, never a hit
    assert math.isnan(overlap_ratio(5, 5, 5, 5))  # 0/0


def test_overlap_exactly_point_three_is_not_a_hit():
    gt = {"v": [(3, 0, 10)]}
    # prediction [7, 10]: overlap 3 / span 10 = 0.3 exactly -> miss (strict '>')
    miss = toolkit_f1({"v": [(3, 7, 10, 0.9)]}, gt)
    assert miss.num_correct == 0 and miss.f1 == 0.0
    # [6.9, 10]: 3.1 / 10 > 0.3 -> hit
    hit = toolkit_f1({"v": [(3, 6.9, 10, 0.9)]}, gt)
    assert hit.num_correct == 1
    assert hit.f1 == pytest.approx(f1_of(1.0, 1.0))


def test_class_mismatch_is_not_a_hit():
    res = toolkit_f1({"v": [(4, 0, 10, 0.9)]}, {"v": [(3, 0, 10)]})
    assert res.num_correct == 0
    assert (res.num_predictions, res.num_ground_truth) == (1, 1)
    assert res.precision == 0.0 and res.recall == 0.0 and res.f1 == 0.0


def test_counts_are_pooled_over_sequences_not_averaged():
    gt = {"a": [(1, 0, 10)], "b": [(2, 0, 10), (2, 20, 30), (2, 40, 50)]}
    preds = {"a": [(1, 0, 10, 0.9)], "b": [(2, 100, 110, 0.9)]}
    res = toolkit_f1(preds, gt)
    # pooled: 1 hit, 2 predictions, 4 GT -> P=0.5, R=0.25 (the mean of per-video F1s would be 0.5)
    assert (res.num_correct, res.num_predictions, res.num_ground_truth) == (1, 2, 4)
    assert res.precision == pytest.approx(0.5)
    assert res.recall == pytest.approx(0.25)
    assert res.f1 == pytest.approx(f1_of(0.5, 0.25))


def test_predictions_in_videos_without_ground_truth_count_as_false_positives():
    res = toolkit_f1({"a": [(1, 0, 10, 0.9)], "ghost": [(1, 0, 10, 0.9)]}, {"a": [(1, 0, 10)]})
    assert (res.num_correct, res.num_predictions) == (1, 2)


def test_several_predictions_on_one_ground_truth_count_once():
    gt = {"v": [(5, 0, 20)]}
    preds = {"v": [(5, 0, 20, 0.9), (5, 2, 18, 0.8), (5, 1, 19, 0.7)]}
    res = toolkit_f1(preds, gt)
    assert res.num_correct == 1
    assert res.precision == pytest.approx(1 / 3)
    assert res.recall == pytest.approx(1.0)
    assert strict_f1(preds, gt).num_correct == 1


def test_one_prediction_may_match_several_ground_truths_in_the_toolkit_but_not_strictly():
    # The toolkit's numpy.delete is a no-op: the same prediction is the hit of both GTs.
    gt = {"v": [(8, 0, 10), (8, 5, 15)]}
    preds = {"v": [(8, 3, 12, 0.9)]}
    res = toolkit_f1(preds, gt)
    assert res.num_correct == 2
    assert res.precision == pytest.approx(2.0)  # kept as the toolkit computes it
    assert res.recall == pytest.approx(1.0)
    strict = strict_f1(preds, gt)
    assert strict.num_correct == 1
    assert strict.precision == pytest.approx(1.0) and strict.recall == pytest.approx(0.5)
    assert strict.f1 == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_zero_length_segments_and_empty_inputs():
    assert toolkit_f1({"v": [(1, 5, 5, 1.0)]}, {"v": [(1, 5, 5)]}).num_correct == 0  # 0/0 is a miss
    empty = toolkit_f1({}, {"v": [(1, 0, 10)]})
    assert (empty.precision, empty.recall, empty.f1) == (0.0, 0.0, 0.0)
    assert toolkit_f1({"v": [(1, 0, 10, 1.0)]}, {}).precision == 0.0


def test_strict_matching_is_greedy_by_score():
    gt = {"v": [(2, 0, 10)]}
    # the higher-scoring prediction takes the GT even though the other overlaps better
    preds = {"v": [(2, 0, 10, 0.2), (2, 2, 10, 0.9)]}
    res = strict_f1(preds, gt)
    assert res.num_correct == 1 and res.num_predictions == 2
    # two GTs, two predictions: each prediction gets its own GT
    gt2 = {"v": [(2, 0, 10), (2, 30, 40)]}
    preds2 = {"v": [(2, 1, 10, 0.5), (2, 30, 39, 0.6), (2, 31, 40, 0.7)]}
    res2 = strict_f1(preds2, gt2)
    assert res2.num_correct == 2
    assert res2.precision == pytest.approx(2 / 3) and res2.recall == pytest.approx(1.0)


def test_per_class_f1_restricts_both_sides():
    gt = {"v": [(1, 0, 10), (2, 20, 30)]}
    preds = {"v": [(1, 0, 10, 0.9), (2, 50, 60, 0.9), (3, 0, 10, 0.5)]}
    pc = per_class_f1(preds, gt, num_classes=3)
    assert pc[1].f1 == pytest.approx(f1_of(1.0, 1.0))
    assert pc[2].num_correct == 0 and pc[2].num_ground_truth == 1
    assert pc[3].num_ground_truth == 0 and pc[3].num_predictions == 1 and pc[3].f1 == 0.0


def test_average_precision_hand_computed():
    gt = {"v": [(1, 0, 10), (1, 20, 30)]}
    # ranked: hit GT1 (0.9), miss (0.8), hit GT2 (0.7) -> P = 1, 1/2, 2/3 ; R = 1/2, 1/2, 1
    preds = {"v": [(1, 0, 10, 0.9), (1, 50, 60, 0.8), (1, 20, 30, 0.7)]}
    ap = average_precision(preds, gt, 1, (0.5,))
    # interpolated: 0.5 * 1 + 0.5 * 2/3
    assert ap[0] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_average_precision_duplicates_and_thresholds():
    gt = {"v": [(1, 0, 10)]}
    preds = {"v": [(1, 0, 10, 0.9), (1, 0, 10, 0.8), (1, 0, 6, 0.7)]}
    ap = average_precision(preds, gt, 1, (0.3, 0.7))
    assert ap == pytest.approx([1.0, 1.0])  # the duplicate is a FP after full recall: no AP loss
    # at tIoU 0.7 a prediction with tIoU 0.6 is a miss; at 0.5 it is a hit
    low = {"v": [(1, 0, 6, 0.9)]}
    assert average_precision(low, gt, 1, (0.5, 0.7)) == pytest.approx([1.0, 0.0])


def test_mean_average_precision_averages_classes_with_ground_truth():
    gt = {"a": [(1, 0, 10)], "b": [(2, 0, 10)]}
    preds = {"a": [(1, 0, 10, 0.9)], "b": [(3, 0, 10, 0.9)]}  # class 2 missed, class 3 has no GT
    res = mean_average_precision(preds, gt, tiou_thresholds=(0.3, 0.5, 0.7), num_classes=3)
    assert set(res.per_class) == {1, 2}
    assert res.per_class[1] == pytest.approx(1.0) and res.per_class[2] == pytest.approx(0.0)
    assert res.mean == pytest.approx(0.5)
    assert all(v == pytest.approx(0.5) for v in res.per_threshold.values())


def test_invalid_rows_are_rejected():
    with pytest.raises(ValueError, match="end"):
        toolkit_f1({"v": [(1, 10, 5, 0.9)]}, {"v": [(1, 0, 10)]})
    with pytest.raises(ValueError, match="expected 4 values"):
        toolkit_f1({"v": [(1, 0, 10)]}, {"v": [(1, 0, 10)]})


def test_report_contains_every_metric():
    gt = {"v": [(1, 0, 10)]}
    rep = evaluate_detections({"v": [(1, 0, 10, 0.9)]}, gt)
    assert rep["smg_f1"]["f1"] == pytest.approx(f1_of(1.0, 1.0))
    assert rep["strict_f1"]["f1"] == pytest.approx(1.0)
    assert rep["map"]["mean"] == pytest.approx(1.0)
    assert len(rep["per_class_f1"]) == 17
