"""The feature ring: contiguous last-W views across wraparound, zero left-padding, bounds."""

from __future__ import annotations

import numpy as np
import pytest

from service.streams.ringbuffer import FeatureRing


def reference_window(rows: np.ndarray, window: int) -> np.ndarray:
    out = np.zeros((window, rows.shape[1]), dtype=np.float32)
    tail = rows[-window:] if len(rows) else rows
    out[window - len(tail) :] = tail
    return out


@pytest.mark.parametrize(("capacity", "window"), [(8, 8), (10, 4), (7, 3)])
def test_last_window_matches_reference_through_many_wraparounds(capacity: int, window: int) -> None:
    rng = np.random.default_rng(0)
    ring = FeatureRing(capacity, 5)
    rows = rng.normal(size=(4 * capacity + 3, 5)).astype(np.float32)
    for i, row in enumerate(rows):
        ring.append(row)
        np.testing.assert_array_equal(ring.last(window), reference_window(rows[: i + 1], window))
    assert ring.total == len(rows)
    assert len(ring) == capacity


def test_young_stream_is_left_padded_with_zeros() -> None:
    ring = FeatureRing(6, 2)
    assert not ring.last(4).any()
    ring.append(np.array([1.0, 2.0]))
    np.testing.assert_array_equal(ring.last(4), [[0, 0], [0, 0], [0, 0], [1, 2]])


def test_window_is_a_read_only_view_without_copies() -> None:
    ring = FeatureRing(4, 3)
    ring.extend(np.ones((5, 3)))
    view = ring.last(4)
    assert view.base is not None  # a view into the preallocated buffer
    with pytest.raises(ValueError):
        view[0, 0] = 5.0


def test_memory_is_fixed_by_capacity() -> None:
    ring = FeatureRing(16, 372)
    before = ring.nbytes
    ring.extend(np.zeros((1000, 372)))
    assert ring.nbytes == before == 2 * 16 * 372 * 4


def test_wrong_row_size_and_window_are_refused() -> None:
    ring = FeatureRing(4, 3)
    with pytest.raises(ValueError, match="shape"):
        ring.append(np.zeros(4))
    with pytest.raises(ValueError, match="window"):
        ring.last(5)
    with pytest.raises(ValueError):
        FeatureRing(0, 3)
