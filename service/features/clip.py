"""ONNX clip backbone: frames -> clips -> one feature step per ``stride`` frames.

The contract for a user-supplied backbone: one float32 input of shape (N, 3, T, H, W) ("NCTHW",
the default) or (N, T, 3, H, W) ("NTCHW", Hugging Face VideoMAE style), RGB scaled to [0, 1] then
normalised with mean/std; one output (N, D). Its configuration comes, in increasing priority,
from defaults (VideoMAEv2: 16 frames, stride 4, 224x224, ImageNet mean/std), a JSON object under
the ONNX metadata key ``mgstream.clip``, and ``Settings.clip_config``. Static input dims in the
graph must agree with it.

Alignment (``align``), always one step per ``stride`` frames, like the keypoint transform:
- ``"end"`` (default, causal): step k is emitted when frame ``k * stride + stride - 1`` arrives and
  embeds the ``clip_frames`` frames up to it (the first frame repeated at the stream's start);
- ``"start"`` (offline extractors such as OpenTAD's): step k's clip starts at frame ``k * stride``,
  so it is emitted ``clip_frames - stride`` frames later; at the end of the stream the last clips
  are completed by repeating the last frame. A model must be served with the alignment its
  training features were extracted with.

Clips from all streams go through one :class:`ClipBatcher`, which runs the session on up to
``max_batch`` clips at once, waiting at most ``max_wait_ms`` for a batch to fill.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from service.features.base import Featurizer, UnsupportedInput
from service.features.images import check_frame, decode_image

log = logging.getLogger(__name__)

CLIP_METADATA_KEY = "mgstream.clip"
LAYOUTS = ("NCTHW", "NTCHW")


class BackboneError(UnsupportedInput):
    """The clip backbone is missing, malformed, or does not fit the detector."""


@dataclass(frozen=True)
class ClipConfig:
    clip_frames: int = 16
    stride: int = 4  # frames between clips = frames per feature step
    size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    layout: str = "NCTHW"
    resize: str = "crop"  # "crop": short side to size then centre crop; "stretch": straight to size
    align: str = "end"  # "end": step k's clip ends at frame k*stride+stride-1; "start": it starts at k*stride

    @classmethod
    def from_dict(cls, data: dict) -> ClipConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise BackboneError(f"unknown clip config keys: {', '.join(sorted(unknown))}")
        merged = {**asdict(cls()), **data}
        try:
            size = merged["size"]
            size = (int(size), int(size)) if isinstance(size, int | float) else (int(size[0]), int(size[1]))
            cfg = cls(
                clip_frames=int(merged["clip_frames"]), stride=int(merged["stride"]), size=size,
                mean=tuple(float(v) for v in merged["mean"]), std=tuple(float(v) for v in merged["std"]),
                layout=str(merged["layout"]).upper(), resize=str(merged["resize"]),
                align=str(merged["align"]),
            )
        except (TypeError, ValueError, IndexError) as exc:
            raise BackboneError(f"malformed clip config {data}: {exc}") from exc
        cfg.validate()
        return cfg

    def validate(self) -> None:
        problems = []
        if self.clip_frames < 1 or self.stride < 1 or min(self.size) < 1:
            problems.append("clip_frames, stride and size must be positive")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            problems.append("mean and std need 3 values each, std > 0")
        if self.layout not in LAYOUTS:
            problems.append(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.resize not in ("crop", "stretch"):
            problems.append(f"resize must be 'crop' or 'stretch', got {self.resize!r}")
        if self.align not in ("end", "start"):
            problems.append(f"align must be 'end' or 'start', got {self.align!r}")
        if problems:
            raise BackboneError("bad clip config: " + "; ".join(problems))

    def input_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self.size
        if self.layout == "NCTHW":
            return (batch, 3, self.clip_frames, h, w)
        return (batch, self.clip_frames, 3, h, w)


def preprocess_frame(image_bgr: np.ndarray, cfg: ClipConfig) -> np.ndarray:
    """BGR uint8 (H, W, 3) -> normalised RGB float32 (3, h, w) at the backbone's size."""
    h, w = cfg.size
    if cfg.resize == "crop":
        scale = max(h / image_bgr.shape[0], w / image_bgr.shape[1])
        rh, rw = max(h, round(image_bgr.shape[0] * scale)), max(w, round(image_bgr.shape[1] * scale))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        resized = cv2.resize(image_bgr, (rw, rh), interpolation=interpolation)
        top, left = (rh - h) // 2, (rw - w) // 2
        resized = resized[top : top + h, left : left + w]
    else:
        resized = cv2.resize(image_bgr, (w, h), interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    rgb = (rgb - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


class ClipBackbone:
    """An ONNX Runtime session over a clip model, with its config, output dim and active provider."""

    def __init__(self, path: str | Path, *, providers: list[str] | None = None, overrides: dict | None = None,
                 require_cuda: bool = False, intra_op_threads: int = 0, intra_op_spinning: bool = True) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise BackboneError(f"clip backbone {path} does not exist")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if intra_op_spinning else "0")
        wanted = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        available = ort.get_available_providers()
        usable = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=usable)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise BackboneError(f"cannot load clip backbone {path}: {exc}") from exc
        # onnxruntime-gpu lists CUDA as available even without a GPU and silently falls back:
        # the session's own provider list is the truth.
        self.providers = self.session.get_providers()
        if require_cuda and "CUDAExecutionProvider" not in self.providers:
            raise BackboneError(f"CUDA was required but the clip backbone runs on {self.providers}")
        log.info("clip backbone %s runs on %s", path.name, self.providers[0])

        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise BackboneError(
                f"clip backbone must have one input and an (N, D) output, has {len(inputs)} inputs"
            )
        self.input_name = inputs[0].name
        meta = self.session.get_modelmeta().custom_metadata_map.get(CLIP_METADATA_KEY)
        try:
            from_meta = json.loads(meta) if meta else {}
        except json.JSONDecodeError as exc:
            raise BackboneError(f"clip backbone metadata {CLIP_METADATA_KEY} is not JSON: {exc}") from exc
        self.config = self._fit_static_shape(inputs[0].shape, {**from_meta, **(overrides or {})})
        out_shape = outputs[0].shape
        if len(out_shape) != 2:
            raise BackboneError(f"clip backbone output must be (N, D), has shape {out_shape}")
        probe = self.embed_batch(np.zeros(self.config.input_shape(1), np.float32))
        self.feature_dim = int(probe.shape[1])

    @staticmethod
    def _fit_static_shape(shape: list, given: dict) -> ClipConfig:
        """Fill config from the graph's static dims where not given, and refuse contradictions."""
        if len(shape) != 5:
            raise BackboneError(
                f"clip backbone input must be 5-D (N, 3, T, H, W) or (N, T, 3, H, W), has {shape}"
            )
        layout = str(given.get("layout", "NCTHW")).upper()
        if layout not in LAYOUTS:
            raise BackboneError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        c_dim, t_dim = (shape[1], shape[2]) if layout == "NCTHW" else (shape[2], shape[1])
        if isinstance(c_dim, int) and c_dim != 3:
            raise BackboneError(
                f"clip backbone input {shape} has {c_dim} channels where layout {layout} puts 3"
            )
        static = {}
        if isinstance(t_dim, int):
            static["clip_frames"] = t_dim
        if isinstance(shape[3], int) and isinstance(shape[4], int):
            static["size"] = (shape[3], shape[4])
        cfg = ClipConfig.from_dict({**static, **given})
        if "clip_frames" in static and cfg.clip_frames != static["clip_frames"]:
            raise BackboneError(
                f"config asks for {cfg.clip_frames}-frame clips, the model takes {static['clip_frames']}"
            )
        if "size" in static and cfg.size != tuple(static["size"]):
            raise BackboneError(f"config asks for size {cfg.size}, the model takes {tuple(static['size'])}")
        return cfg

    def embed_batch(self, clips: np.ndarray) -> np.ndarray:
        """(N, ...) clips in the configured layout -> (N, D) float32."""
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(clips, dtype=np.float32)})[0]
        if out.ndim != 2 or out.shape[0] != clips.shape[0]:
            raise BackboneError(f"clip backbone returned shape {out.shape} for a batch of {clips.shape[0]}")
        return out.astype(np.float32, copy=False)

    def check_feature_dim(self, expected: int) -> None:
        if self.feature_dim != expected:
            raise BackboneError(f"clip backbone outputs {self.feature_dim}-dim features but the detector "
                                f"expects feature_dim={expected}; export a matching backbone or model")


class ClipBatcher:
    """Shared across streams: collects clips from any thread and runs them through the backbone in batches."""

    def __init__(self, backbone: ClipBackbone, *, max_batch: int = 32, max_wait_ms: float = 5.0) -> None:
        self.backbone = backbone
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue()
        self.batches = 0
        self.clips = 0
        self._thread = threading.Thread(target=self._loop, name="clip-batcher", daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def config(self) -> ClipConfig:
        return self.backbone.config

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def submit(self, clip: np.ndarray) -> Future:
        """One clip (without the batch dim) -> a Future of its (D,) feature."""
        if self._closed:
            raise RuntimeError("clip batcher is closed")
        fut: Future = Future()
        self._queue.put((clip, fut))
        return fut

    def embed(self, clip: np.ndarray) -> np.ndarray:
        """Blocking form of :meth:`submit`."""
        return self.submit(clip).result()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=5.0)
            while True:  # a clip that raced with close must not leave its stream waiting forever
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[1].set_exception(RuntimeError("clip batcher is closed"))

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        futures = [f for _, f in batch]
        try:
            out = self.backbone.embed_batch(np.stack([c for c, _ in batch]))
        except Exception as exc:  # every waiting stream gets the failure, the batcher keeps going
            for f in futures:
                f.set_exception(exc)
            return
        self.batches += 1
        self.clips += len(batch)
        for f, row in zip(futures, out, strict=True):
            f.set_result(row)


class ClipFeaturizer(Featurizer):
    """Images -> rolling clip buffer -> one backbone feature step per ``stride`` frames."""

    kind = "clip"
    blocking = True
    batched = True

    def __init__(self, batcher: ClipBatcher, *, input_format: str | None = None,
                 max_pixels: int = 1920 * 1080, frames_per_step: int | None = None,
                 feature_dim: int | None = None) -> None:
        cfg = batcher.config
        if frames_per_step is not None and cfg.stride != frames_per_step:
            raise BackboneError(
                f"clip stride {cfg.stride} must equal the detector's frames_per_step {frames_per_step}"
            )
        if feature_dim is not None:
            batcher.backbone.check_feature_dim(feature_dim)
        self.batcher = batcher
        self.config = cfg
        self.input_format = input_format
        self.max_pixels = max_pixels
        self._frames: deque[np.ndarray] = deque(maxlen=cfg.clip_frames)
        self._count = 0
        self._emitted = 0

    def push_payload(self, payload: bytes | memoryview, frames: int = 1) -> list[np.ndarray]:
        return self._push(decode_image(payload, expected=self.input_format, max_pixels=self.max_pixels))

    def push_frame(self, image_bgr: np.ndarray) -> list[np.ndarray]:
        return self._push(check_frame(image_bgr, self.max_pixels))

    def _push(self, image_bgr: np.ndarray) -> list[np.ndarray]:
        cfg = self.config
        frame = preprocess_frame(image_bgr, cfg)
        if not self._frames and cfg.align == "end":  # stream start: pad the history with the first frame
            self._frames.extend([frame] * (cfg.clip_frames - 1))
        self._frames.append(frame)
        self._count += 1
        lookahead = cfg.clip_frames - cfg.stride if cfg.align == "start" else 0
        ready = self._count - lookahead
        if ready <= 0 or ready % cfg.stride:
            return []
        self._emitted += 1
        return [self._embed(list(self._frames))]

    def flush(self) -> list[np.ndarray]:
        """``"start"`` alignment: the steps whose clips run past the last frame, padded with it."""
        cfg = self.config
        steps = []
        while self._emitted < self._count // cfg.stride:
            start = self._emitted * cfg.stride - (self._count - len(self._frames))  # index in the buffer
            frames = list(self._frames)[start:]
            frames += [frames[-1]] * (cfg.clip_frames - len(frames))
            steps.append(self._embed(frames))
            self._emitted += 1
        return steps

    def _embed(self, frames: list[np.ndarray]) -> np.ndarray:
        return self.batcher.embed(np.stack(frames, axis=1 if self.config.layout == "NCTHW" else 0))

    def close(self) -> None:
        self._frames.clear()


def create_clip_batcher(settings, feature_dim: int | None = None) -> ClipBatcher | None:
    """The process-wide batcher from ``Settings`` (None when no backbone is configured).

    With ``feature_dim`` the backbone's output is checked against the detector's input here, so a
    mismatch stops the server at startup instead of failing every stream.
    """
    if settings.clip_backbone_path is None:
        return None
    backbone = ClipBackbone(settings.clip_backbone_path, providers=list(settings.providers),
                            overrides=dict(settings.clip_config), require_cuda=settings.require_cuda,
                            intra_op_threads=settings.intra_op_threads,
                            intra_op_spinning=settings.intra_op_spinning)
    if feature_dim is not None:
        backbone.check_feature_dim(feature_dim)
    return ClipBatcher(backbone, max_batch=settings.clip_max_batch, max_wait_ms=settings.clip_max_wait_ms)
