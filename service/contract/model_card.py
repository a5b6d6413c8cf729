"""The model card: the contract an exported detector carries in its ONNX metadata.

The trainer writes it (``ModelCard.to_metadata``), the server reads it back
(``ModelCard.from_metadata``) and refuses a model whose card is missing, malformed, or asks for
features the server cannot produce.

Window-model I/O (ONNX names):
- input ``features``: float32 (B, window_steps, feature_dim)
- output ``scores``: float32 (B, N, num_classes), sigmoid probabilities
- output ``offsets``: float32 (B, N, 2), distances in steps from each anchor to the segment's
  start and end (already multiplied by the level's stride)

``N`` concatenates the pyramid levels; anchor ``i`` of a level with stride ``s`` sits at step
``(i + 1) * s - 1``, the last input step it has seen (see :func:`anchor_steps`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from service.contract.classes import SMG_CLASSES
from service.contract.features import FeatureSpec

METADATA_KEY = "mgstream.card"
CARD_FORMAT = 1
WINDOW_INPUT = "features"
SCORES_OUTPUT = "scores"
OFFSETS_OUTPUT = "offsets"


class ModelCardError(ValueError):
    """The model's metadata is missing, malformed or incompatible."""


@dataclass(frozen=True)
class PostProcess:
    """Numpy post-processing settings, tuned on validation and stored with the model."""

    score_threshold: float = 0.3
    nms_method: str = "nms"  # "nms" or "soft-nms"
    nms_iou: float = 0.5
    soft_nms_sigma: float = 0.5
    min_duration_steps: float = 1.0
    max_detections: int = 200
    pre_nms_topk: int = 2000

    @classmethod
    def from_dict(cls, data: dict) -> PostProcess:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    created: str
    feature: FeatureSpec
    window_steps: int
    strides: tuple[int, ...]
    causal: bool
    classes: tuple[str, ...] = SMG_CLASSES
    postprocess: PostProcess = field(default_factory=PostProcess)
    architecture: dict = field(default_factory=dict)
    training_data: str = ""
    metrics: dict = field(default_factory=dict)
    step_model: dict | None = None  # state layout of the incremental export, when present
    format: int = CARD_FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_anchors(self) -> int:
        return int(sum(self.window_steps // s for s in self.strides))

    def to_json(self) -> str:
        data = asdict(self)
        data["strides"] = list(self.strides)
        data["classes"] = list(self.classes)
        return json.dumps(data, sort_keys=True)

    def to_metadata(self) -> dict[str, str]:
        return {METADATA_KEY: self.to_json()}

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelCardError(f"model card is not valid JSON: {exc}") from exc
        missing = [k for k in ("name", "version", "feature", "window_steps", "strides", "causal") if k not in data]
        if missing:
            raise ModelCardError(f"model card lacks {', '.join(missing)}")
        if data.get("format", CARD_FORMAT) > CARD_FORMAT:
            raise ModelCardError(f"model card format {data['format']} is newer than this server ({CARD_FORMAT})")
        try:
            card = cls(
                name=str(data["name"]),
                version=str(data["version"]),
                created=str(data.get("created", "")),
                feature=FeatureSpec.from_dict(data["feature"]),
                window_steps=int(data["window_steps"]),
                strides=tuple(int(s) for s in data["strides"]),
                causal=bool(data["causal"]),
                classes=tuple(data.get("classes", SMG_CLASSES)),
                postprocess=PostProcess.from_dict(data.get("postprocess", {})),
                architecture=dict(data.get("architecture", {})),
                training_data=str(data.get("training_data", "")),
                metrics=dict(data.get("metrics", {})),
                step_model=data.get("step_model"),
            )
        except (TypeError, ValueError) as exc:
            raise ModelCardError(f"model card has a malformed field: {exc}") from exc
        if card.window_steps <= 0 or any(s <= 0 or card.window_steps % s for s in card.strides):
            raise ModelCardError(
                f"window {card.window_steps} must be a positive multiple of every stride {card.strides}"
            )
        return card

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> ModelCard:
        if METADATA_KEY not in props:
            raise ModelCardError(f"ONNX metadata has no '{METADATA_KEY}' entry; not an mgstream model")
        return cls.from_json(props[METADATA_KEY])


def anchor_steps(window_steps: int, strides: tuple[int, ...] | list[int]) -> np.ndarray:
    """Step index of every output anchor, levels concatenated: anchor i of stride s is (i+1)*s - 1."""
    return np.concatenate([np.arange(1, window_steps // s + 1) * s - 1 for s in strides]).astype(np.float32)


def anchor_strides(window_steps: int, strides: tuple[int, ...] | list[int]) -> np.ndarray:
    """Stride of the level each anchor belongs to, aligned with :func:`anchor_steps`."""
    return np.concatenate([np.full(window_steps // s, s) for s in strides]).astype(np.float32)
