"""Local runtime: one ONNX Runtime session, providers from settings, I/O checked against the model card."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.contract.model_card import (
    OFFSETS_OUTPUT,
    SCORES_OUTPUT,
    WINDOW_INPUT,
    ModelCard,
    ModelCardError,
)
from service.runtime.base import ModelRuntime, RuntimeHealth, TensorSpec

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderError(RuntimeError):
    """The providers asked for cannot be honoured (e.g. CUDA required but inactive)."""


def read_card(path: Path) -> ModelCard:
    """The model card stored in an ONNX file's metadata, without building a full session."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=[CPU])
    return ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)


def _dims(shape: list) -> tuple[int | None, ...]:
    """ONNX shape without the batch axis; symbolic dims become None."""
    return tuple(d if isinstance(d, int) else None for d in shape[1:])


def expected_window_io(card: ModelCard) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The window model's I/O as the card describes it (see service.contract.model_card)."""
    n = card.num_anchors
    return (
        (TensorSpec(WINDOW_INPUT, (card.window_steps, card.feature.feature_dim)),),
        (TensorSpec(SCORES_OUTPUT, (n, card.num_classes)), TensorSpec(OFFSETS_OUTPUT, (n, 2))),
    )


def _check_io(actual: list, expected: tuple[TensorSpec, ...], what: str) -> None:
    by_name = {a.name: a for a in actual}
    for spec in expected:
        if spec.name not in by_name:
            raise ModelCardError(f"model has no {what} named '{spec.name}' (has {sorted(by_name)})")
        got = _dims(by_name[spec.name].shape)
        if len(got) != len(spec.shape) or any(g is not None and g != w for g, w in zip(got, spec.shape, strict=True)):
            raise ModelCardError(f"{what} '{spec.name}' has shape {got} (no batch); the card implies {spec.shape}")


class OnnxModelRuntime(ModelRuntime):
    """An ``InferenceSession`` built once; ``run`` is called only from the scheduler's inference thread.

    Subclasses serve other I/O contracts of the same card (the step model) by overriding
    :meth:`_expected_io` and :meth:`_describe`.
    """

    kind = "model"

    def __init__(
        self,
        path: Path,
        providers: list[str],
        *,
        require_cuda: bool = False,
        intra_op_threads: int = 0,
        intra_op_spinning: bool = True,
        max_failures: int = 3,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.kind} file {self.path} does not exist")
        available = ort.get_available_providers()
        wanted = [p for p in providers if p in available] or [CPU]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # a missing CUDA library is expected on CPU hosts; we log our own line
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if intra_op_spinning else "0")
        self._session = ort.InferenceSession(str(self.path), options, providers=wanted)
        # get_available_providers() lists CUDA even when its libraries are missing: trust only the session.
        self._active = self._session.get_providers()
        if require_cuda and CUDA not in self._active:
            raise ProviderError(f"CUDA is required but the session runs on {self._active}")
        self.card = ModelCard.from_metadata(self._session.get_modelmeta().custom_metadata_map)
        self._inputs, self._outputs = self._expected_io()
        _check_io(self._session.get_inputs(), self._inputs, "input")
        _check_io(self._session.get_outputs(), self._outputs, "output")
        self._output_names = [spec.name for spec in self._outputs]
        self.health = RuntimeHealth(max_failures)
        log.info(
            "%s %s v%s loaded from %s on %s (asked for %s; %s)",
            self.kind,
            self.card.name,
            self.card.version,
            self.path,
            self._active[0],
            providers,
            self._describe(),
        )

    def _expected_io(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        return expected_window_io(self.card)

    def _describe(self) -> str:
        return f"window {self.card.window_steps} steps"

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
        # ONNX Runtime's CPU kernels take a different path for a batch of one, whose results differ
        # from larger batches in the last float bits; batches of two and more agree bit for bit. A
        # window must score the same whatever it is batched with (streaming = offline exactly), so a
        # lone window runs as a batch of two.
        batch = next(iter(inputs.values())).shape[0]
        if batch == 1:
            inputs = {name: np.concatenate([value, value]) for name, value in inputs.items()}
        results = self._session.run(self._output_names, inputs)
        return {name: value[:batch] for name, value in zip(self._output_names, results, strict=True)}

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]  # drops the native session


def load_runtime(settings) -> OnnxModelRuntime:  # noqa: ANN001 - service.config.Settings
    """Build the local runtime from settings."""
    return OnnxModelRuntime(
        settings.model_path,
        list(settings.providers),
        require_cuda=settings.require_cuda,
        intra_op_threads=settings.intra_op_threads,
        intra_op_spinning=settings.intra_op_spinning,
        max_failures=settings.max_runtime_failures,
    )
