"""The detector's architecture config: a validated dataclass, stored verbatim in the model card."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from service.contract.classes import NUM_CLASSES
from service.contract.features import DEFAULT_SPEC


def _round_odd(value: float) -> int:
    n = int(round(value))
    return n if n % 2 else n + 1


@dataclass(frozen=True)
class ModelConfig:
    input_dim: int = DEFAULT_SPEC.feature_dim  # feature dim D of each step
    num_classes: int = NUM_CLASSES
    channels: int = 128  # width of embedding, encoder, pyramid and heads
    strides: tuple[int, ...] = (1, 2, 4, 8, 16)  # one pyramid level each; each doubles the previous
    window_steps: int = 128  # fixed window of the exported window model
    causal: bool = True  # past-only receptive fields (the streaming model); False: centred (offline)
    embed_layers: int = 2  # [conv k -> channel norm -> ReLU] blocks before the encoder
    embed_kernel: int = 3
    stem_layers: int = 1  # stride-1 DynE layers at level 0; each further level adds one stride-2 DynE layer
    encoder_kernel: int = 3  # DFA kernel w of the multi-kernel branch
    encoder_kernel_expand: float = 1.5  # second DFA kernel w' = odd(round((w + 1) * expand))
    stat_window: int = 8  # running-mean window (level steps) of the instance-dynamic branch
    mlp_ratio: float = 2.0
    head_layers: int = 2  # multi-scale dynamic (MSDy) layers per head
    head_kernel: int = 3
    sta: bool = True  # spatial-temporal attention in both heads, before the prediction conv
    sta_window: int = 8  # running avg/max window (level steps) of STA's channel gate
    sta_kernel: int = 7  # time-gate conv kernel
    sta_reduction: int = 8  # channel-gate MLP bottleneck C -> C / r -> C
    sta_residual: bool = False  # y = x * (1 + A) instead of CBAM's plain y = x * A
    init_std: float = 0.1  # std of dynamic-gate weights (0 would leave the DFA branches dead)
    gate_tau: float = 1.5  # GeReTanH threshold
    drop_path: float = 0.0
    cls_prior: float = 0.01  # classification bias prior probability
    extra: dict = field(default_factory=dict)  # free-form notes, ignored by the model

    def __post_init__(self) -> None:
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        problems = []
        if self.input_dim <= 0 or self.num_classes <= 0 or self.channels <= 0:
            problems.append("input_dim, num_classes and channels must be positive")
        if not self.strides or self.strides[0] != 1:
            problems.append(f"strides must start at 1, got {self.strides}")
        if any(b != 2 * a for a, b in zip(self.strides, self.strides[1:], strict=False)):
            problems.append(f"each stride must double the previous one, got {self.strides}")
        if self.strides and self.window_steps % self.strides[-1]:
            problems.append(f"window_steps {self.window_steps} must be a multiple of {self.strides[-1]}")
        if self.channels % self.sta_reduction:
            problems.append(f"channels {self.channels} must be divisible by sta_reduction {self.sta_reduction}")
        for name in ("embed_kernel", "encoder_kernel", "head_kernel", "sta_kernel"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.stem_layers < 0 or self.head_layers < 1 or self.embed_layers < 1:
            problems.append("need embed_layers >= 1, head_layers >= 1, stem_layers >= 0")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def levels(self) -> int:
        return len(self.strides)

    @property
    def max_stride(self) -> int:
        return self.strides[-1]

    @property
    def encoder_kernel_wide(self) -> int:
        return _round_odd((self.encoder_kernel + 1) * self.encoder_kernel_expand)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["strides"] = list(self.strides)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)
