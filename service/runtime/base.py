"""The model runtime interface: what the scheduler needs from whatever executes the detector.

A runtime takes named, batch-first arrays and returns named, batch-first arrays. The local
implementation wraps an ONNX Runtime session (:mod:`service.runtime.onnx`); a remote one (Triton,
Ray Serve) would implement the same four members, so the scheduler and the streams never change.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from service.contract.model_card import ModelCard


class RuntimeFailure(Exception):
    """Base class of runtime failures."""


class InferenceFailed(RuntimeFailure):
    """One batch failed; every request in it receives this."""


class RuntimeDead(RuntimeFailure):
    """Too many consecutive failures: the process must be restarted."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape of one input or output without the batch axis; ``None`` marks a free dimension."""

    name: str
    shape: tuple[int | None, ...]

    def check(self, array: np.ndarray) -> None:
        """Raise ValueError naming the problem when ``array`` (no batch axis) does not fit."""
        if array.ndim != len(self.shape):
            raise ValueError(f"{self.name}: expected {len(self.shape)} dims {self.shape}, got {array.shape}")
        for got, want in zip(array.shape, self.shape, strict=True):
            if want is not None and got != want:
                raise ValueError(f"{self.name}: expected shape {self.shape}, got {array.shape}")


class RuntimeHealth:
    """Counts consecutive failed batches; past ``max_failures`` the runtime is dead for good."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.consecutive_failures = 0
        self.total_failures = 0
        self.dead_reason: str | None = None
        self._lock = threading.Lock()  # updated from the inference thread, read from the loop

    @property
    def alive(self) -> bool:
        return self.dead_reason is None

    def record_success(self) -> None:
        with self._lock:
            self.consecutive_failures = 0

    def record_failure(self, reason: str) -> bool:
        """Count one failure; return True when this one made the runtime dead."""
        with self._lock:
            self.consecutive_failures += 1
            self.total_failures += 1
            if self.dead_reason is None and self.consecutive_failures >= self.max_failures:
                self.dead_reason = f"{self.consecutive_failures} consecutive failed batches; last: {reason}"
                return True
            return False


class ModelRuntime(ABC):
    """Executes the detector on stacked batches. ``run`` blocks and is only ever called from the
    scheduler's single inference thread, so implementations need no locking of their own."""

    card: ModelCard
    health: RuntimeHealth

    @property
    @abstractmethod
    def provider(self) -> str:
        """Where the model actually runs (e.g. ``CUDAExecutionProvider``), for logs and /v1/models."""

    @property
    @abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Input specs without the batch axis."""

    @property
    @abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Output specs without the batch axis."""

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: every array has the batch as its first axis; the same holds for the outputs."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions or connections."""

    def check_request(self, inputs: dict[str, np.ndarray]) -> None:
        """Validate one request's arrays (no batch axis) against the input specs; ValueError if not."""
        names = {spec.name for spec in self.inputs}
        if set(inputs) != names:
            raise ValueError(f"inputs {sorted(inputs)} do not match the model's {sorted(names)}")
        for spec in self.inputs:
            spec.check(inputs[spec.name])

    def warm_up(self, batch_sizes: list[int]) -> dict[int, float]:
        """Run every batch size once with zeros so no live request pays for a first run; returns seconds."""
        timings: dict[int, float] = {}
        for size in batch_sizes:
            feed = {
                spec.name: np.zeros((size, *[d or 1 for d in spec.shape]), dtype=np.float32) for spec in self.inputs
            }
            started = time.perf_counter()
            self.run(feed)
            timings[size] = time.perf_counter() - started
        return timings
