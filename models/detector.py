"""The micro-gesture detector: DyFADet-style DynE encoder + pyramid + MSDy heads with STA.

Public API
----------
- ``Detector(cfg: ModelConfig)`` or ``Detector.from_config(dict)`` (the dict stored in the model
  card's ``architecture``).
- ``Detector.forward(features (B, T, D)) -> (cls_logits, offsets)``: two lists with one tensor per
  pyramid level, ``cls_logits[l]`` (B, T/s_l, C) pre-sigmoid, ``offsets[l]`` (B, T/s_l, 2) distances
  to start/end in units of the level stride s_l. T must be a multiple of the largest stride; any
  such T works (a causal forward over a whole sequence equals the streaming result).
- ``Detector.predict(features) -> (scores (B, N, C) sigmoid, offsets (B, N, 2) in steps)``, levels
  concatenated exactly like the ONNX window model (anchor i of stride s at step (i+1)*s-1).
- ``load_checkpoint(path) -> Checkpoint`` (model in eval mode with EMA weights + metadata);
  ``save_checkpoint(path, ...)``; ``run_sequence(model, steps (T, D)) -> (scores, offsets, anchors)``.

Layer inventory (causal mode; k = kernel, "state" = what a step model caches per stream)
------------------------------------------------------------------------------------------
Per-step only (no time mixing): input standardisation, ChannelNorm (LayerNorm over channels),
FFN 1x1 convs, DFA tap gates (1x1), STA channel MLP, alpha/beta fusion, per-level Scale.

Time-mixing ops, all past-only, state = the last (k-1) inputs of that op at its level:
1. Embedding: ``embed_layers`` x TimeConv(k=embed_kernel=3) at level 0 (state 2 steps each).
2. DynE layer (stem_layers at level 0, one per level >= 1), each with
   a. downsample2 (levels >= 1): max over pairs (2j, 2j+1). State: phase bit + pending even input.
   b. DFA_w (k=encoder_kernel=3) and DFA_w' (k=encoder_kernel_wide=7), depthwise dynamic kernels
      whose channel gate is a depthwise conv over the same taps: RF k, state k-1 of u.
   c. instance branch: DFA_1 (no time mixing) times ReLU(1x1(RunningMean(L=stat_window=8)(u))):
      state L-1 of u.
3. Head (cls and reg separately, head_layers MSDy layers each, shared over levels):
   a. from_fine DFA (k=head_kernel=3, depthwise) on level l-1, then take fine 2j+1 for coarse j
      (state 2 of the fine level's input + phase).
   b. from_coarse DFA (k=3, depthwise) on level l+1, then causal upsample: fine i reads coarse
      floor((i+1)/2)-1 (state 2 + the last completed coarse vector).
   c. depth DFA (k=3, full 1x1 aggregation over C*k): state 2.
4. STA (per head, per level): RunningMean and RunningMax (L=sta_window=8): state L-1 of the
   input; time-gate TimeConv(2->1, k=sta_kernel=7) on the channel-pooled pair: state 6 pairs.
5. Prediction TimeConv (k=head_kernel=3) for cls and reg: state 2.
All padding is zeros, so a fresh stream's state is all zeros (RunningMax only sees post-ReLU
inputs, where zero padding equals -inf padding). Receptive fields are finite: level l's output
depends on a bounded number of past base steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.nn.config import ModelConfig
from models.nn.encoder import Encoder
from models.nn.head import ClassificationHead, RegressionHead
from service.contract.model_card import PostProcess, anchor_steps

CHECKPOINT_FORMAT = "mgstream-detector/1"


class Detector(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Per-feature standardisation, fitted on the training split (set_feature_stats) and exported.
        self.register_buffer("feat_mean", torch.zeros(cfg.input_dim))
        self.register_buffer("feat_std", torch.ones(cfg.input_dim))
        self.encoder = Encoder(cfg)
        self.cls_head = ClassificationHead(cfg)
        self.reg_head = RegressionHead(cfg)

    @classmethod
    def from_config(cls, data: dict) -> Detector:
        """Build from a ModelConfig dict, e.g. a model card's ``architecture`` (its "type" key is ignored)."""
        return cls(ModelConfig.from_dict({k: v for k, v in data.items() if k != "type"}))

    def set_feature_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.feat_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feat_std.copy_(torch.as_tensor(np.maximum(std, 1e-3), dtype=torch.float32))

    def check_input(self, features: torch.Tensor) -> None:
        if features.dim() != 3:
            raise ValueError(f"features must be (B, T, D), got shape {tuple(features.shape)}")
        if features.shape[-1] != self.cfg.input_dim:
            raise ValueError(f"features have dim {features.shape[-1]} but the model expects {self.cfg.input_dim}")
        t = features.shape[1]
        if t == 0 or t % self.cfg.max_stride:
            raise ValueError(f"T={t} must be a positive multiple of the largest stride {self.cfg.max_stride}")

    def forward(self, features: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self.check_input(features)
        x = ((features - self.feat_mean) / self.feat_std).transpose(1, 2)
        feats = self.encoder(x)
        cls_logits = [o.transpose(1, 2) for o in self.cls_head(feats)]
        offsets = [o.transpose(1, 2) for o in self.reg_head(feats)]
        return cls_logits, offsets

    def predict(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Window-model outputs: scores (B, N, C) sigmoid, offsets (B, N, 2) in steps."""
        cls_logits, offsets = self(features)
        scores = torch.cat([torch.sigmoid(c) for c in cls_logits], dim=1)
        dists = torch.cat([o * float(s) for o, s in zip(offsets, self.cfg.strides, strict=True)], dim=1)
        return scores, dists


@dataclass
class Checkpoint:
    model: Detector
    postprocess: PostProcess = field(default_factory=PostProcess)
    meta: dict = field(default_factory=dict)  # feature spec, classes, training data, metrics, train config


def save_checkpoint(path: str | Path, model: Detector, postprocess: PostProcess, meta: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model_config": model.cfg.to_dict(),
            "state_dict": model.state_dict(),
            "postprocess": dict(postprocess.__dict__),
            "meta": meta,
        },
        path,
    )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint written by the trainer (EMA weights), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for corrupt files
        raise ValueError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an mgstream detector checkpoint ({CHECKPOINT_FORMAT})")
    model = Detector.from_config(data["model_config"])
    model.load_state_dict(data["state_dict"])
    model.eval()
    return Checkpoint(model, PostProcess.from_dict(data.get("postprocess", {})), dict(data.get("meta", {})))


@torch.no_grad()
def run_sequence(model: Detector, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Causal forward over a whole sequence (T, D) -> scores (N, C), offsets (N, 2) steps, anchors (N,).

    The sequence is zero-padded on the right to a multiple of the largest stride; anchors whose step
    lies beyond the real end are dropped (in a causal model padding cannot reach earlier anchors).
    """
    steps = np.asarray(steps, dtype=np.float32)
    if steps.ndim != 2 or steps.shape[0] == 0:
        raise ValueError(f"steps must be a non-empty (T, D) array, got shape {steps.shape}")
    t = steps.shape[0]
    m = model.cfg.max_stride
    padded_t = -(-t // m) * m
    x = np.zeros((1, padded_t, steps.shape[1]), dtype=np.float32)
    x[0, :t] = steps
    scores, offsets = model.predict(torch.from_numpy(x))
    anchors = anchor_steps(padded_t, model.cfg.strides)
    keep = anchors < t
    return scores[0].numpy()[keep], offsets[0].numpy()[keep], anchors[keep]


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
