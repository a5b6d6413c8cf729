"""Frequency-based log2 label augmentation (Liu et al., MiGA 2025, Eq. 1).

A class ``c`` with ``Z_c < alpha`` training instances is *rare*; each of its instances is repeated
``R_c = floor(log2(alpha / Z_c)) + 1`` times. Classes with ``Z_c >= alpha`` keep ``R_c = 1``.

"Repeated at annotation level" means, in this trainer: the video features are never copied.
Each epoch draws training windows from a list of *instance anchors* (sequence index, instance
index); an instance appears ``R_c`` times in that list, and every appearance cuts its own window
around the instance with its own random offset, so the copies see different context. Windows
still carry *all* ground truth that falls inside them (not only the anchor instance).
:func:`expand_instances` builds that list; :func:`instance_repeats` gives the counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


def repeat_factor(count: int, alpha: float) -> int:
    """``R_c`` for a class with ``count`` instances: floor(log2(alpha / count)) + 1 when rare, else 1.

    Computed exactly in integers (the largest k with count * 2**k <= alpha), so powers of two do not
    suffer from floating-point log2. A class with no instances has nothing to repeat (1).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if count <= 0 or count >= alpha:
        return 1
    k = 0
    while count * 2 ** (k + 1) <= alpha:
        k += 1
    return k + 1


def class_counts(labels_per_sequence: Iterable[Iterable[int]]) -> dict[int, int]:
    """Instances per class over all sequences (``{class_id: Z_c}``, classes with 0 omitted)."""
    counts: dict[int, int] = {}
    for labels in labels_per_sequence:
        for c in np.asarray(list(labels), dtype=np.int64).tolist():
            counts[c] = counts.get(c, 0) + 1
    return counts


def repeat_factors(counts: Mapping[int, int], alpha: float) -> dict[int, int]:
    """``{class_id: R_c}`` for every class in ``counts``."""
    return {c: repeat_factor(z, alpha) for c, z in counts.items()}


def instance_repeats(labels_per_sequence: list[np.ndarray], alpha: float | None) -> list[np.ndarray]:
    """Per-sequence arrays of each instance's repeat count (all ones when ``alpha`` is None)."""
    if alpha is None:
        return [np.ones(len(labels), dtype=np.int64) for labels in labels_per_sequence]
    factors = repeat_factors(class_counts(labels_per_sequence), alpha)
    return [
        np.asarray([factors[int(c)] for c in labels], dtype=np.int64).reshape(-1)
        for labels in labels_per_sequence
    ]


def expand_instances(labels_per_sequence: list[np.ndarray], alpha: float | None) -> list[tuple[int, int]]:
    """The epoch's instance-anchor list: ``(sequence_index, instance_index)`` repeated ``R_c`` times.

    Deterministic order (sequence, then instance, then copy); the trainer shuffles it.
    """
    out: list[tuple[int, int]] = []
    for si, reps in enumerate(instance_repeats(labels_per_sequence, alpha)):
        for ii, r in enumerate(reps.tolist()):
            out.extend([(si, ii)] * r)
    return out
