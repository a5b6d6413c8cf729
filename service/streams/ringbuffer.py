"""Preallocated ring of feature steps whose last ``window`` rows are always one contiguous view.

Every row is written twice, at ``i % C`` and ``i % C + C``, into a (2C, D) array. The last W rows
(W <= C) then sit contiguously at ``[n % C + C - W, n % C + C)``, so building a window costs no copy
and no ``np.concatenate``. Rows before the first step are zeros: early windows come left-padded.
"""

from __future__ import annotations

import numpy as np


class FeatureRing:
    def __init__(self, capacity: int, dim: int, dtype: np.dtype | type = np.float32) -> None:
        if capacity < 1 or dim < 1:
            raise ValueError(f"capacity and dim must be positive, got {capacity}, {dim}")
        self.capacity = capacity
        self.dim = dim
        self._buf = np.zeros((2 * capacity, dim), dtype=dtype)
        self.total = 0  # rows appended since creation (stream-absolute step count)

    def __len__(self) -> int:
        return min(self.total, self.capacity)

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes

    def append(self, row: np.ndarray) -> None:
        """Append one (dim,) row; ValueError when its size is wrong."""
        row = np.asarray(row)
        if row.shape != (self.dim,):
            raise ValueError(f"row must have shape ({self.dim},), got {row.shape}")
        pos = self.total % self.capacity
        self._buf[pos] = row
        self._buf[pos + self.capacity] = row
        self.total += 1

    def extend(self, rows: np.ndarray) -> None:
        for row in np.asarray(rows).reshape(-1, self.dim):
            self.append(row)

    def last(self, window: int) -> np.ndarray:
        """Read-only view of the last ``window`` rows, oldest first, zero rows before step 0.

        The view changes when rows are appended: copy it if it must outlive the next append.
        """
        if not 1 <= window <= self.capacity:
            raise ValueError(f"window must be in 1..{self.capacity}, got {window}")
        end = self.total % self.capacity + self.capacity
        view = self._buf[end - window : end]
        view.flags.writeable = False
        return view
