"""Embedding and DynE encoder: builds the feature pyramid (one level per stride)."""

from __future__ import annotations

import torch
from torch import nn

from models.nn.config import ModelConfig
from models.nn.layers import ChannelNorm, DFAConv, RunningMean, TimeConv, downsample2


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (identity at eval)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class Embedding(nn.Module):
    """[conv k -> channel norm -> ReLU] x n, input_dim -> channels."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dims = [cfg.input_dim] + [cfg.channels] * cfg.embed_layers
        self.convs = nn.ModuleList(
            TimeConv(a, b, cfg.embed_kernel, cfg.causal, bias=False) for a, b in zip(dims, dims[1:], strict=False)
        )
        self.norms = nn.ModuleList(ChannelNorm(cfg.channels) for _ in range(cfg.embed_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = torch.relu(norm(conv(x)))
        return x


class DynELayer(nn.Module):
    """DynE layer with real DFA convolutions (the released code uses static depthwise convs).

    x = DS(x); u = LN(x)
    instance-dynamic: DFA_1(u) * ReLU(W . mean_L(u))   (mean_L: running mean over L past steps,
                      replacing the released window-global mean, which sees the future)
    multi-kernel:     DFA_w(u) + DFA_w'(u)              (depthwise dynamic kernels of sizes w, w')
    x = x + DropPath(instance + multi); x = x + DropPath(MLP(LN(x)))  (per-step LN, not GroupNorm)
    """

    def __init__(self, cfg: ModelConfig, downsample: bool) -> None:
        super().__init__()
        c, causal = cfg.channels, cfg.causal
        self.downsample = downsample
        self.norm = ChannelNorm(c)
        kw = {"causal": causal, "depthwise": True, "init_std": cfg.init_std, "tau": cfg.gate_tau}
        self.inst_dfa = DFAConv(c, c, 1, **kw)
        self.inst_mean = RunningMean(cfg.stat_window, causal)
        self.inst_fc = nn.Conv1d(c, c, 1)
        self.dfa_w = DFAConv(c, c, cfg.encoder_kernel, **kw)
        self.dfa_wide = DFAConv(c, c, cfg.encoder_kernel_wide, **kw)
        self.ffn_norm = ChannelNorm(c)
        hidden = int(round(c * cfg.mlp_ratio))
        self.ffn = nn.Sequential(nn.Conv1d(c, hidden, 1), nn.GELU(), nn.Conv1d(hidden, c, 1))
        self.drop = DropPath(cfg.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = downsample2(x)
        u = self.norm(x)
        inst = self.inst_dfa(u) * torch.relu(self.inst_fc(self.inst_mean(u)))
        multi = self.dfa_w(u) + self.dfa_wide(u)
        x = x + self.drop(inst + multi)
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class Encoder(nn.Module):
    """Embedding, stem DynE layers (level 0), then one stride-2 DynE layer per further level."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = Embedding(cfg)
        self.stem = nn.ModuleList(DynELayer(cfg, downsample=False) for _ in range(cfg.stem_layers))
        self.branch = nn.ModuleList(DynELayer(cfg, downsample=True) for _ in range(cfg.levels - 1))
        self.level_norms = nn.ModuleList(ChannelNorm(cfg.channels) for _ in range(cfg.levels))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.embed(x)
        for layer in self.stem:
            x = layer(x)
        feats = [x]
        for layer in self.branch:
            x = layer(x)
            feats.append(x)
        # Neck: per-level channel norm (DyFADet's identity FPN).
        return [norm(f) for norm, f in zip(self.level_norms, feats, strict=True)]
