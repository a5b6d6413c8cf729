"""Multi-scale dynamic (MSDy) detection heads with neighbour-level fusion and STA."""

from __future__ import annotations

import math

import torch
from torch import nn

from models.nn.config import ModelConfig
from models.nn.layers import DFAConv, Scale, TimeConv, take_latest_of_pairs, upsample2
from models.nn.sta import SpatialTemporalAttention


class LevelPacker:
    """Packs pyramid levels into one time axis, each level preceded by ``gap`` zero steps.

    A shared-weight op whose receptive field is at most ``gap`` + 1 positions then processes every
    level in one call, with exactly the zero padding it would see per level (one call instead of
    one per level: about 5x fewer kernel launches in torch and ONNX Runtime). ``mask`` re-zeroes
    the gaps after any op whose output there is not zero (norm biases).
    """

    def __init__(self, lengths: list[int], gap: int, device: torch.device) -> None:
        self.lengths, self.gap = lengths, gap
        self.starts = []
        pos = 0
        for n in lengths:
            pos += gap
            self.starts.append(pos)
            pos += n
        self.total = pos + gap  # trailing gap: right padding for centred (non-causal) ops
        mask = torch.zeros(1, 1, self.total, device=device)
        for a, n in zip(self.starts, lengths, strict=True):
            mask[..., a : a + n] = 1.0
        self.mask = mask

    def pack(self, levels: list[torch.Tensor]) -> torch.Tensor:
        b, c = levels[0].shape[:2]
        zeros = levels[0].new_zeros(b, c, self.gap)
        parts = []
        for x in levels:
            parts += [zeros, x]
        parts.append(zeros)
        return torch.cat(parts, dim=-1)

    def unpack(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[..., a : a + n] for a, n in zip(self.starts, self.lengths, strict=True)]


class MSDyLayer(nn.Module):
    """One multi-scale dynamic layer, shared across levels.

    fused_l = beta * x_l + alpha * ( DS(A_fine(x_{l-1})) + US(A_coarse(x_{l+1})) )
    out_l   = ReLU(DFA_depth(fused_l))
    A_fine / A_coarse are depthwise DFA convs, DFA_depth a full DFA conv with channel norm.
    alpha starts at 0 and beta at 1 (each level first sees only itself), as released.
    DS takes each pair's newest fine position, US the newest complete coarse one (causal resampling).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, k = cfg.channels, cfg.head_kernel
        kw = {"causal": cfg.causal, "init_std": cfg.init_std, "tau": cfg.gate_tau}
        self.causal = cfg.causal
        self.from_fine = DFAConv(c, c, k, depthwise=True, **kw)
        self.from_coarse = DFAConv(c, c, k, depthwise=True, **kw)
        self.depth = DFAConv(c, c, k, depthwise=False, norm=True, **kw)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.beta = nn.Parameter(torch.ones(()))

    def neighbours(self, fine: list[torch.Tensor], coarse: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per level: resampled A_fine output of the level below plus A_coarse of the level above."""
        n = len(fine)
        out = []
        for lvl in range(n):
            parts = []
            if lvl > 0:
                parts.append(take_latest_of_pairs(fine[lvl - 1], self.causal))
            if lvl < n - 1:
                parts.append(upsample2(coarse[lvl + 1], self.causal))
            out.append(parts[0] if len(parts) == 1 else parts[0] + parts[1])
        return out

    def forward_levels(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Reference form, one level at a time (what a step model computes per level)."""
        nb = self.neighbours([self.from_fine(f) for f in feats], [self.from_coarse(f) for f in feats])
        return [torch.relu(self.depth(self.beta * x + self.alpha * m)) for x, m in zip(feats, nb, strict=True)]

    def forward(self, x: torch.Tensor, packer: LevelPacker) -> torch.Tensor:
        """Packed form: x (B, C, packer.total) with zero gaps; same numbers as ``forward_levels``."""
        nb = self.neighbours(packer.unpack(self.from_fine(x)), packer.unpack(self.from_coarse(x)))
        fused = self.beta * x + self.alpha * packer.pack(nb)
        return torch.relu(self.depth(fused)) * packer.mask


class DetectionHead(nn.Module):
    """MSDy layers -> optional STA -> prediction conv; weights shared across levels."""

    def __init__(self, cfg: ModelConfig, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MSDyLayer(cfg) for _ in range(cfg.head_layers))
        self.sta = (
            SpatialTemporalAttention(
                cfg.channels, cfg.sta_window, cfg.sta_kernel, cfg.sta_reduction, cfg.causal, cfg.sta_residual
            )
            if cfg.sta
            else None
        )
        self.pred = TimeConv(cfg.channels, out_dim, cfg.head_kernel, cfg.causal)
        self.gap = max(cfg.head_kernel, cfg.sta_window if cfg.sta else 1, cfg.sta_kernel if cfg.sta else 1) - 1

    def forward_levels(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Reference form, one level at a time."""
        for layer in self.layers:
            feats = layer.forward_levels(feats)
        if self.sta is not None:
            feats = [self.sta(f) for f in feats]
        return [self.pred(f) for f in feats]

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        packer = LevelPacker([f.shape[-1] for f in feats], max(self.gap, 1), feats[0].device)
        x = packer.pack(feats)
        for layer in self.layers:
            x = layer(x, packer)
        if self.sta is not None:
            x = self.sta(x)  # zero gaps stay zero: STA multiplies its input
        return packer.unpack(self.pred(x))


class ClassificationHead(DetectionHead):
    """Per-class logits (sigmoid, no background class); bias set to the prior probability."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, cfg.num_classes)
        nn.init.constant_(self.pred.conv.bias, -math.log((1 - cfg.cls_prior) / cfg.cls_prior))


class RegressionHead(DetectionHead):
    """Distances to start and end in level-stride units: ReLU(scale_l * conv)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, 2)
        self.scales = nn.ModuleList(Scale(1.0) for _ in cfg.strides)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.relu(s(o)) for s, o in zip(self.scales, super().forward(feats), strict=True)]

    def forward_levels(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.relu(s(o)) for s, o in zip(self.scales, super().forward_levels(feats), strict=True)]
