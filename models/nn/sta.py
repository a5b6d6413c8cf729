"""Spatial-temporal attention (STA) for 1-D feature sequences, in a causal form.

Mapping to the paper's terms (its features have no spatial axis left once pooled by the backbone):
- "temporal attention" (Eq. 4) = ``channel_gate``: squeeze over time, excite channels. The paper pools
  over the whole window; here the pooling is a running mean and a running max over the last
  ``window`` steps, so the gate varies along time and never sees the future. Same ops in training
  and inference.
- "spatial attention" (Eq. 5) = ``time_gate``: squeeze over channels (mean and max), then a k=7 conv
  along time, one weight per step. Left-padded when causal.
Streaming state per level: window-1 past inputs (for the running stats) and k-1 past channel-pooled
pairs (for the time-gate conv).
"""

from __future__ import annotations

import torch
from torch import nn

from models.nn.layers import RunningMax, RunningMean, TimeConv


class SpatialTemporalAttention(nn.Module):
    def __init__(
        self, channels: int, window: int, kernel: int, reduction: int, causal: bool, residual: bool = False
    ) -> None:
        super().__init__()
        self.residual = residual
        self.avg = RunningMean(window, causal)
        self.max = RunningMax(window, causal)  # inputs are post-ReLU, so zero padding is exact
        hidden = channels // reduction
        self.mlp = nn.Sequential(nn.Conv1d(channels, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, channels, 1))
        self.time_conv = TimeConv(2, 1, kernel, causal)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T): sigma(MLP(running mean) + MLP(running max)), the shared MLP applied per step."""
        return torch.sigmoid(self.mlp(self.avg(x)) + self.mlp(self.max(x)))

    def time_gate(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, T): sigma(conv_k([mean_C x; max_C x]))."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.time_conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_c = self.channel_gate(x)
        if self.residual:
            x_c = x * (1 + a_c)
            return x_c * (1 + self.time_gate(x_c))
        x_c = x * a_c
        return x_c * self.time_gate(x_c)
