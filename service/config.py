"""All knobs and limits of the server, in one pydantic-settings object.

Only this module reads the environment (prefix ``MGSTREAM_``, nested fields with ``__``).
Tests build ``Settings(...)`` directly; the CLI only overrides fields.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PACKAGE_ROOT / "models" / "default" / "mgstream-default.onnx"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MGSTREAM_", env_nested_delimiter="__", extra="ignore")

    # --- network ---
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[SecretStr] = Field(default_factory=list, description="empty: no auth")
    log_level: str = "info"

    # --- model runtime ---
    model_path: Path = DEFAULT_MODEL
    providers: list[str] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="tried in order; the active one is logged",
    )
    require_cuda: bool = False
    # One thread that sleeps between kernels: ONNX Runtime's default (a spinning thread per core) burns a
    # second core for no gain on small step batches and starves the event loop (docs/benchmarks.md).
    intra_op_threads: int = Field(1, ge=0, description="threads per ONNX session; 0: one per core")
    intra_op_spinning: bool = Field(False, description="let idle ONNX Runtime threads spin (lower latency, more CPU)")
    batch_buckets: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    max_runtime_failures: int = Field(3, ge=1, description="consecutive failed batches before the runtime is dead")

    # --- scheduler ---
    max_batch: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0, le=1000)
    max_batches_in_flight: int = Field(
        2, ge=1, le=8, description="batches handed to the inference thread at once (it runs them in turn)"
    )
    gc_gen0_threshold: int = Field(50_000, ge=100, description="allocations between young collections in `serve`")
    gil_switch_interval_ms: float = Field(
        0.5, gt=0, le=100, description="Python's thread switch interval in `serve` (its default is 5 ms)"
    )
    mode: str = Field("auto", pattern="^(auto|window|step)$", description="step when the model has a step export")
    hop_steps: int | None = Field(None, ge=1, description="window-mode hop; default from the model card")
    window_steps: int | None = Field(None, ge=1, description="window length; default from the model card")

    # --- streams ---
    max_sessions: int = Field(512, ge=1)
    inbound_queue_frames: int = Field(64, ge=1, description="live frames waiting; oldest dropped beyond")
    outbound_queue_messages: int = Field(256, ge=8, description="pending events for a slow reader")
    idle_timeout_s: float = Field(30.0, gt=0)
    max_session_s: float = Field(4 * 3600.0, gt=0)
    max_message_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    max_bad_messages: int = Field(50, ge=1, description="protocol errors tolerated per stream before closing")
    status_interval_s: float = Field(1.0, gt=0)
    # Frames are float32 keypoints or JPEG, which deflate barely shrinks; compressing every message
    # would cost CPU on both ends for nothing, so an offer of permessage-deflate is declined by default.
    ws_compression: bool = Field(False, description="accept permessage-deflate when a client offers it")
    # The sans-I/O implementation does less per message than the default one: at 300 streams of one
    # frame per message it halved the median frame-to-event latency (docs/benchmarks.md).
    ws_protocol: str = Field(
        "websockets-sansio",
        pattern="^(websockets|websockets-sansio|wsproto)$",
        description="uvicorn's WebSocket implementation",
    )

    # --- featurizers ---
    pose_workers: int = Field(2, ge=1, description="threads running MediaPipe graphs")
    pose_model_complexity: int = Field(1, ge=0, le=2)
    pose_every_n: int = Field(1, ge=1, description="run the landmarker on every n-th frame, interpolate between")
    max_image_pixels: int = Field(1920 * 1080, ge=64)
    clip_backbone_path: Path | None = None
    clip_config: dict = Field(
        default_factory=dict,
        description="overrides the backbone's mgstream.clip metadata (clip_frames, stride, size, ...)",
    )
    clip_max_batch: int = Field(32, ge=1, le=1024, description="clips per backbone run, across streams")
    clip_max_wait_ms: float = Field(5.0, ge=0, le=1000, description="longest wait for a clip batch to fill")

    # --- batch jobs ---
    data_dir: Path = Path("data")
    upload_max_mb: float = Field(512.0, gt=0)
    max_video_s: float = Field(3 * 3600.0, gt=0)
    sync_max_s: float = Field(60.0, gt=0, description="longest input answered with ?wait=true")
    max_concurrent_jobs: int = Field(2, ge=1)
    max_queued_jobs: int = Field(16, ge=0)
    job_retention_h: float = Field(7 * 24.0, gt=0)

    def api_key_values(self) -> set[str]:
        return {k.get_secret_value() for k in self.api_keys}
