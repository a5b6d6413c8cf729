"""Local runtime of the step (incremental) model: chunk + per-stream state in, final outputs + state out.

It implements the same :class:`ModelRuntime` interface as the window runtime, so the generic
scheduler batches step requests unchanged: a request is one stream's ``features`` (H, D) chunk plus
its ``state`` (S,) and ``phase`` (1,), all float32; the scheduler stacks the ready streams' requests
into one batch, runs it, and hands each stream its slice, new state included. Where the step model
lives and what its state looks like come from the model card (service/contract/step_layout.py).
"""

from __future__ import annotations

from pathlib import Path

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
from service.runtime.base import TensorSpec
from service.runtime.onnx import OnnxModelRuntime


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


class StepModelRuntime(OnnxModelRuntime):
    """An ``InferenceSession`` of a ``.step.onnx``: the window runtime's session handling, with the step
    model's I/O (chunk, stacked per-stream state, phase) read from the card's ``step_model`` layout."""

    kind = "step model"
    layout: StepLayout

    def _expected_io(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        if not self.card.step_model:
            raise ModelCardError(f"{self.path} has no step_model layout in its card; not a step model")
        self.layout = StepLayout.from_dict(self.card.step_model)
        return expected_step_io(self.card, self.layout)

    def _describe(self) -> str:
        return f"chunk {self.layout.chunk_steps}, state {self.layout.state_size} floats per stream"


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
        intra_op_spinning=getattr(settings, "intra_op_spinning", True),
    )
