"""Local runtime of the step (incremental) model: chunk + per-stream state in, final outputs + state out.

It implements the same :class:`ModelRuntime` interface as the window runtime, so the generic
scheduler batches step requests unchanged: a request is one stream's ``features`` (H, D) chunk plus
its ``state`` (S,) and ``phase`` (1,), all float32; the scheduler stacks the ready streams' requests
into one batch, runs it, and hands each stream its slice, new state included. Where the step model
lives and what its state looks like come from the model card (service/contract/step_layout.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.contract.model_card import ModelCard, ModelCardError
from service.contract.step_layout import (
    FEATURES_INPUT,
    OFFSETS_OUTPUT,
    PHASE_INPUT,
    PHASE_OUTPUT,
    SCORES_OUTPUT,
    STATE_INPUT,
    STATE_OUTPUT,
    VALID_OUTPUT,
    StepLayout,
)
from service.runtime.base import ModelRuntime, RuntimeHealth, TensorSpec
from service.runtime.onnx import CPU, CUDA, ProviderError, _check_io

log = logging.getLogger(__name__)


def step_model_path(window_path: str | Path) -> Path:
    """Where the step export of a window model lives: ``x.onnx`` -> ``x.step.onnx``."""
    p = Path(window_path)
    return p.with_name(p.stem + ".step.onnx")


def expected_step_io(card: ModelCard, layout: StepLayout) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    n, h = layout.num_slots, layout.chunk_steps
    return (
        (
            TensorSpec(FEATURES_INPUT, (h, card.feature.feature_dim)),
            TensorSpec(STATE_INPUT, (layout.state_size,)),
            TensorSpec(PHASE_INPUT, (1,)),
        ),
        (
            TensorSpec(SCORES_OUTPUT, (n, card.num_classes)),
            TensorSpec(OFFSETS_OUTPUT, (n, 2)),
            TensorSpec(VALID_OUTPUT, (n,)),
            TensorSpec(STATE_OUTPUT, (layout.state_size,)),
            TensorSpec(PHASE_OUTPUT, (1,)),
        ),
    )


class StepModelRuntime(ModelRuntime):
    """An ``InferenceSession`` of a ``.step.onnx``; ``run`` is called only from the inference thread."""

    def __init__(
        self,
        path: Path,
        providers: list[str],
        *,
        require_cuda: bool = False,
        intra_op_threads: int = 0,
        max_failures: int = 3,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"step model file {self.path} does not exist")
        available = ort.get_available_providers()
        wanted = [p for p in providers if p in available] or [CPU]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self._session = ort.InferenceSession(str(self.path), options, providers=wanted)
        self._active = self._session.get_providers()
        if require_cuda and CUDA not in self._active:
            raise ProviderError(f"CUDA is required but the session runs on {self._active}")
        self.card = ModelCard.from_metadata(self._session.get_modelmeta().custom_metadata_map)
        if not self.card.step_model:
            raise ModelCardError(f"{self.path} has no step_model layout in its card; not a step model")
        self.layout = StepLayout.from_dict(self.card.step_model)
        self._inputs, self._outputs = expected_step_io(self.card, self.layout)
        _check_io(self._session.get_inputs(), self._inputs, "input")
        _check_io(self._session.get_outputs(), self._outputs, "output")
        self._output_names = [spec.name for spec in self._outputs]
        self.health = RuntimeHealth(max_failures)
        log.info(
            "step model %s v%s loaded from %s on %s (chunk %d, state %d floats per stream)",
            self.card.name,
            self.card.version,
            self.path,
            self._active[0],
            self.layout.chunk_steps,
            self.layout.state_size,
        )

    @property
    def provider(self) -> str:
        return self._active[0]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # As in the window runtime: ONNX Runtime's batch-of-one kernels differ in the last bits, and a
        # stream must get the same numbers whatever it is batched with, so one stream runs as two.
        batch = next(iter(inputs.values())).shape[0]
        if batch == 1:
            inputs = {name: np.concatenate([value, value]) for name, value in inputs.items()}
        results = self._session.run(self._output_names, inputs)
        return {name: value[:batch] for name, value in zip(self._output_names, results, strict=True)}

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]


def load_step_runtime(settings, window_path: Path | None = None) -> StepModelRuntime | None:  # noqa: ANN001
    """The step runtime beside the configured window model, per ``settings.mode``.

    ``window``: None. ``step``: the step model must exist. ``auto``: the step model when it exists."""
    mode = getattr(settings, "mode", "auto")
    if mode == "window":
        return None
    path = step_model_path(window_path or settings.model_path)
    if not path.is_file():
        if mode == "step":
            raise FileNotFoundError(f"mode 'step' needs a step model at {path}")
        return None
    return StepModelRuntime(
        path,
        list(settings.providers),
        require_cuda=getattr(settings, "require_cuda", False),
        intra_op_threads=getattr(settings, "intra_op_threads", 0),
    )
