"""mgstream server: torch-free real-time and batch micro-gesture detection over ONNX Runtime."""

__version__ = "0.1.0"
