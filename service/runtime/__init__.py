"""Model runtimes: the abstract interface and the local ONNX Runtime implementation."""

from service.runtime.base import (
    InferenceFailed,
    ModelRuntime,
    RuntimeDead,
    RuntimeFailure,
    RuntimeHealth,
    TensorSpec,
)

__all__ = ["InferenceFailed", "ModelRuntime", "RuntimeDead", "RuntimeFailure", "RuntimeHealth", "TensorSpec"]
