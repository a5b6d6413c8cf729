"""The paper's log2 label augmentation: R_c = floor(log2(alpha / Z_c)) + 1 for Z_c < alpha."""

from __future__ import annotations

import numpy as np
import pytest

from models.augment import (
    class_counts,
    expand_instances,
    instance_repeats,
    repeat_factor,
    repeat_factors,
)


@pytest.mark.parametrize(
    ("count", "alpha", "expected"),
    [
        (100, 100, 1),  # not rare: Z_c == alpha
        (150, 100, 1),
        (99, 100, 1),  # log2(1.01) -> 0, +1
        (50, 100, 2),  # exactly log2(2) = 1
        (49, 100, 2),
        (25, 100, 3),  # exactly 2
        (24, 100, 3),
        (13, 100, 3),  # log2(7.69) = 2.94
        (12, 100, 4),  # log2(8.33) = 3.06
        (1, 100, 7),  # log2(100) = 6.64
        (1, 128, 8),  # exactly 7
        (0, 100, 1),  # nothing to repeat
    ],
)
def test_repeat_factor_matches_the_formula(count, alpha, expected):
    assert repeat_factor(count, alpha) == expected
    if 0 < count < alpha:
        assert expected == int(np.floor(np.log2(alpha / count))) + 1


def test_repeat_factor_rejects_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        repeat_factor(3, 0)


def test_counts_and_per_instance_repeats():
    labels = [np.array([5, 5, 5, 4]), np.array([5, 4, 7]), np.array([], dtype=np.int64)]
    assert class_counts(labels) == {5: 4, 4: 2, 7: 1}
    assert repeat_factors({5: 4, 4: 2, 7: 1}, alpha=4) == {5: 1, 4: 2, 7: 3}
    reps = instance_repeats(labels, alpha=4)
    assert [r.tolist() for r in reps] == [[1, 1, 1, 2], [1, 2, 3], []]
    assert [r.tolist() for r in instance_repeats(labels, alpha=None)] == [[1, 1, 1, 1], [1, 1, 1], []]


def test_expanded_sampling_list():
    labels = [np.array([5, 4]), np.array([7])]
    expanded = expand_instances(labels, alpha=4)
    # class 5: Z=1 -> R=3; class 4: Z=1 -> 3; class 7: Z=1 -> 3
    assert expanded == [(0, 0)] * 3 + [(0, 1)] * 3 + [(1, 0)] * 3
    labels = [np.array([1, 1, 1, 1, 2])]
    expanded = expand_instances(labels, alpha=4)
    assert expanded.count((0, 4)) == 3 and expanded.count((0, 0)) == 1
    assert len(expanded) == 4 + 3
