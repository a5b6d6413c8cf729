"""Building blocks of the detector: per-step norms, causal convs, running statistics, DFA convolution.

Every time-mixing op here takes a ``causal`` flag. Causal: the output at position t sees inputs
t-(k-1) .. t only (left zero padding, so a fresh stream's cached state is all zeros). Centred:
symmetric padding, for offline experiments only. All tensors are (B, C, T).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def time_pad(x: torch.Tensor, k: int, causal: bool, value: float = 0.0) -> torch.Tensor:
    """Pad the time axis so a kernel of size k keeps length T: all on the left when causal."""
    if k <= 1:
        return x
    left = k - 1 if causal else (k - 1) // 2
    return F.pad(x, (left, k - 1 - left), value=value)


def shifted_taps(x: torch.Tensor, k: int, causal: bool) -> list[torch.Tensor]:
    """The k shifted copies of x that a kernel of size k reads: tap i holds x[t - (k-1) + i] when causal.

    Written as slices (not unfold/einsum) because ONNX Runtime runs Slice+Mul+Add ~5x faster.
    """
    t = x.shape[-1]
    padded = time_pad(x, k, causal)
    return [padded[..., i : i + t] for i in range(k)]


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each time step (no statistics across time, so it is causal)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(dim=1, keepdim=True)
        var = (x - mu).pow(2).mean(dim=1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight + self.bias


class TimeConv(nn.Module):
    """Conv1d over time with causal (left) or centred zero padding. State when streaming: k-1 inputs."""

    def __init__(self, cin: int, cout: int, k: int, causal: bool, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.k, self.causal = k, causal
        self.conv = nn.Conv1d(cin, cout, k, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(time_pad(x, self.k, self.causal))


class RunningMean(nn.Module):
    """Mean over the last ``window`` positions (zeros before the start). State: window-1 inputs."""

    def __init__(self, window: int, causal: bool) -> None:
        super().__init__()
        self.window, self.causal = window, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window <= 1:
            return x
        return F.avg_pool1d(time_pad(x, self.window, self.causal), self.window, stride=1)


class RunningMax(nn.Module):
    """Max over the last ``window`` positions. Zero padding: exact for the non-negative inputs it is
    used on (post-ReLU features), and it keeps a fresh stream's state all zeros. State: window-1 inputs."""

    def __init__(self, window: int, causal: bool) -> None:
        super().__init__()
        self.window, self.causal = window, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window <= 1:
            return x
        return F.max_pool1d(time_pad(x, self.window, self.causal), self.window, stride=1)


def geretanh(z: torch.Tensor, tau: float = 1.5) -> torch.Tensor:
    """DyFADet's sparse gate, 0 for z <= 0 and rising to 1:
    GeReTanH_tau(z) = max(0, (tanh(z - tau) + tanh tau) / (1 + tanh tau))."""
    t = math.tanh(tau)
    return torch.clamp((torch.tanh(z - tau) + t) / (1.0 + t), min=0.0)


class DFAConv(nn.Module):
    """Dynamic feature aggregation convolution (input-dependent kernel), as K shifted slices.

    y[:, t] = Agg( x[:, t-(k-1)+i] * g_c[:, t] * g_k[i, t]  for i < k ) (+ optional channel norm)

    - g_c (B, C, T): per-channel gate from a depthwise kernel over the same k taps, so each output
      step re-weights every input channel (the dynamic kernel of DyFADet's DFA).
    - g_k (B, k, T): per-tap gate from the current step, which reshapes the receptive field.
    - Agg: depthwise (a per-channel k-tap kernel) or full (a 1x1 conv over the C*k stacked taps).
    Depthwise parts are written as broadcast multiply-adds over the taps: grouped convs are slow to
    train on CPU and Slice/Mul/Add is the fastest dynamic-kernel form in ONNX Runtime.
    Both gates use GeReTanH with biases initialised at tau, so they start half open with live
    gradients (the released code's zero init leaves such branches dead).
    Receptive field: k positions (gates read the same taps). Streaming state: k-1 inputs.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        causal: bool,
        depthwise: bool = False,
        norm: bool = False,
        init_std: float = 0.1,
        tau: float = 1.5,
    ) -> None:
        super().__init__()
        if depthwise and cin != cout:
            raise ValueError("a depthwise DFA conv needs cin == cout")
        self.k, self.causal, self.tau, self.depthwise = k, causal, tau, depthwise
        self.gate_weight = nn.Parameter(torch.randn(1, cin, k, 1) * init_std)
        self.gate_bias = nn.Parameter(torch.full((1, cin, 1), float(tau)))
        self.tap_gate = nn.Conv1d(cin, k, 1)
        nn.init.normal_(self.tap_gate.weight, std=init_std)
        nn.init.constant_(self.tap_gate.bias, tau)
        if depthwise:
            bound = 1.0 / math.sqrt(k)
            self.agg_weight = nn.Parameter(torch.empty(1, cin, k, 1).uniform_(-bound, bound))
            self.agg_bias = nn.Parameter(torch.zeros(1, cin, 1))
        else:
            self.agg = nn.Conv1d(cin * k, cout, 1)
        self.norm = ChannelNorm(cout) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        taps = torch.stack(shifted_taps(x, self.k, self.causal), dim=2)  # (B, C, k, T), channel-major
        g_c = geretanh((taps * self.gate_weight).sum(dim=2) + self.gate_bias, self.tau)
        g_k = geretanh(self.tap_gate(x), self.tau)  # (B, k, T)
        modulated = taps * g_c.unsqueeze(2) * g_k.unsqueeze(1)
        if self.depthwise:
            y = (modulated * self.agg_weight).sum(dim=2) + self.agg_bias
        else:
            y = self.agg(modulated.reshape(b, c * self.k, t))
        return self.norm(y)


class Scale(nn.Module):
    """A learnable scalar (per-level regression scale)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def downsample2(x: torch.Tensor) -> torch.Tensor:
    """Stride-2 max pool over pairs (2j, 2j+1): coarse j is complete once fine 2j+1 arrived (causal).

    Streaming state: the phase of the level and the pending even input."""
    return F.max_pool1d(x, 2, stride=2)


def take_latest_of_pairs(x: torch.Tensor, causal: bool) -> torch.Tensor:
    """Fine -> coarse resampling for neighbour fusion: coarse j takes fine 2j+1 (its newest complete
    input) when causal, fine 2j (nearest, as released) otherwise."""
    return x[..., 1::2] if causal else x[..., 0::2]


def upsample2(x: torch.Tensor, causal: bool) -> torch.Tensor:
    """Coarse -> fine resampling. Causal: fine i takes coarse floor((i+1)/2)-1, the newest coarse
    position already complete at fine i (zeros for i=0). Centred: nearest (coarse floor(i/2)).

    Streaming state: the last completed coarse vector."""
    b, c, t = x.shape
    # stack+reshape rather than expand: ONNX Runtime's Expand is slow for this pattern.
    up = torch.stack([x, x], dim=-1).reshape(b, c, 2 * t)
    if causal:
        up = F.pad(up, (1, 0))[..., : 2 * t]
    return up
