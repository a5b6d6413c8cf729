"""Step form of the causal detector: a chunk of H new steps plus cached state in, final outputs out.

``StepDetector(detector, chunk_steps)`` reuses the weights of a loaded causal :class:`Detector` and
re-states its forward pass for a chunk: every time-mixing op (layer inventory in models/detector.py)
reads its last k-1 inputs from the cached state instead of from a recomputed window, so the work per
chunk does not depend on how long the stream has run. I/O, slots and the state vector's layout are
the contract in service/contract/step_layout.py.

Per level l with stride s, a chunk yields n_l = max(H/s, 1) new positions. When s > H the level
completes one position every s/H chunks; it is computed every chunk on what it has, and a per-stream
``valid`` flag (from the phase) keeps its state unchanged and marks its output slot as garbage in
the other chunks. This keeps the graph static (one ONNX shape) while streams at different phases
share a batch. Cross-level links carry their own small state: a stride-2 level whose fine level
yields one position per chunk keeps the pending even input; the causal upsample keeps the last
completed coarse vector.

Numbers equal the full causal forward over the whole sequence (tests/test_step_model.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.detector import Detector
from models.nn.encoder import DynELayer
from models.nn.head import DetectionHead, MSDyLayer
from models.nn.layers import DFAConv, geretanh
from models.nn.sta import SpatialTemporalAttention
from service.contract.step_layout import StateSegment, StepLayout, is_power_of_two

Valid = torch.Tensor | None  # (B,) bool per level; None: always valid


class _StateIO:
    """Reads state segments from the flat (B, S) vector in call order, collects their new values.

    With ``flat=None`` every read returns zeros (a fresh stream); that mode also discovers the layout.
    """

    def __init__(self, flat: torch.Tensor | None, batch: int, like: torch.Tensor) -> None:
        self.flat, self.batch, self.like = flat, batch, like
        self.segments: list[StateSegment] = []
        self.cursor = 0
        self.new: dict[str, torch.Tensor] = {}

    def read(self, name: str, level: int, shape: tuple[int, ...]) -> torch.Tensor:
        size = 1
        for d in shape:
            size *= d
        if self.flat is None:
            value = self.like.new_zeros((self.batch, *shape))
        else:
            value = self.flat[:, self.cursor : self.cursor + size].reshape(-1, *shape)
        self.segments.append(StateSegment(name, level, tuple(shape), self.cursor))
        self.cursor += size
        return value

    def write(self, name: str, value: torch.Tensor, old: torch.Tensor, valid: Valid) -> None:
        if valid is not None:
            value = torch.where(valid.view(-1, *([1] * (value.dim() - 1))), value, old)
        self.new[name] = value

    def output(self) -> torch.Tensor:
        return torch.cat([self.new[s.name].flatten(1) for s in self.segments], dim=1)


class StepDetector(nn.Module):
    """forward(features (B,H,D), state (B,S), phase (B,1) int64)
    -> scores (B,N,C), offsets (B,N,2) steps, valid (B,N) bool, state_out (B,S), phase_out (B,1)."""

    def __init__(self, detector: Detector, chunk_steps: int = 4) -> None:
        super().__init__()
        cfg = detector.cfg
        if not cfg.causal:
            raise ValueError("only a causal detector has a step form")
        if not is_power_of_two(chunk_steps):
            raise ValueError(f"chunk_steps must be a power of two, got {chunk_steps}")
        if cfg.levels < 2:
            raise ValueError("the step form needs at least two pyramid levels")
        self.det = detector.eval()
        self.cfg = cfg
        self.chunk_steps = chunk_steps
        self.n = [max(chunk_steps // s, 1) for s in cfg.strides]
        with torch.no_grad():
            io = self._run(torch.zeros(1, chunk_steps, cfg.input_dim), None, torch.zeros(1, 1, dtype=torch.long))[-1]
        self.layout = StepLayout(chunk_steps, cfg.strides, tuple(io.segments))

    @property
    def state_size(self) -> int:
        return self.layout.state_size

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(batch, self.state_size), torch.zeros(batch, 1, dtype=torch.long)

    def forward(
        self, features: torch.Tensor, state: torch.Tensor, phase: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, offsets, valid, phase_out, io = self._run(features, state, phase)
        return scores, offsets, valid, io.output(), phase_out

    # -- the chunk computation ---------------------------------------------------------------------

    def _run(self, features: torch.Tensor, state: torch.Tensor | None, phase: torch.Tensor):
        cfg, h = self.cfg, self.chunk_steps
        batch = features.shape[0]
        io = _StateIO(state, batch, features)
        # Level l completes a position in this chunk iff (steps consumed after it) % s == 0.
        end = phase.view(-1) + h
        valid: list[Valid] = [None if s <= h else torch.remainder(end, s) == 0 for s in cfg.strides]
        det = self.det
        x = ((features - det.feat_mean) / det.feat_std).transpose(1, 2)  # (B, D, H)
        feats = self._encoder(io, x, valid)
        cls = self._head(io, "cls", det.cls_head, feats, valid)
        reg = self._head(io, "reg", det.reg_head, feats, valid)
        scores = torch.cat([torch.sigmoid(c) for c in cls], dim=2).transpose(1, 2)
        dists = [torch.relu(sc(o)) * float(s) for sc, o, s in zip(det.reg_head.scales, reg, cfg.strides, strict=True)]
        offsets = torch.cat(dists, dim=2).transpose(1, 2)
        flags = [
            torch.ones(batch, n, dtype=torch.bool, device=features.device)
            if v is None
            else v.view(-1, 1).expand(batch, n)
            for v, n in zip(valid, self.n, strict=True)
        ]
        phase_out = torch.remainder(phase + h, cfg.max_stride)
        return scores, offsets, torch.cat(flags, dim=1), phase_out, io

    @staticmethod
    def _extend(io: _StateIO, name: str, level: int, x: torch.Tensor, keep: int, valid: Valid) -> torch.Tensor:
        """[last ``keep`` inputs of this op; x]: the op's past-only view; caches the new tail."""
        if keep <= 0:
            return x
        old = io.read(name, level, (x.shape[1], keep))
        ext = torch.cat([old, x], dim=-1)
        io.write(name, ext[..., -keep:], old, valid)
        return ext

    @staticmethod
    def _dfa(m: DFAConv, ext: torch.Tensor, n: int) -> torch.Tensor:
        """DFAConv.forward on the last n positions of ext, which holds the k-1 inputs before them.

        Same sums as DFAConv, unrolled over the k taps: on a few positions ONNX Runtime's ReduceSum
        over the tap axis costs more than the whole chunk's arithmetic."""
        k = m.k
        ext = ext[..., ext.shape[-1] - (k - 1 + n) :]
        taps = [ext[..., i : i + n] for i in range(k)]
        g_pre = m.gate_bias
        for i, tap in enumerate(taps):
            g_pre = g_pre + tap * m.gate_weight[:, :, i]
        g_c = geretanh(g_pre, m.tau)
        g_k = geretanh(m.tap_gate(taps[-1]), m.tau)  # (B, k, n)
        if m.depthwise:
            acc = None
            for i, tap in enumerate(taps):
                term = tap * (g_k[:, i : i + 1] * m.agg_weight[:, :, i])
                acc = term if acc is None else acc + term
            y = acc * g_c + m.agg_bias
        else:
            modulated = torch.stack([tap * g_k[:, i : i + 1] for i, tap in enumerate(taps)], dim=2) * g_c.unsqueeze(2)
            y = m.agg(modulated.reshape(ext.shape[0], ext.shape[1] * k, n))
        return m.norm(y)

    @staticmethod
    def _tail(ext: torch.Tensor, keep: int, n: int) -> torch.Tensor:
        return ext[..., ext.shape[-1] - (keep + n) :]

    def _dyne(self, io: _StateIO, name: str, level: int, layer: DynELayer, x: torch.Tensor, valid: Valid):
        n = x.shape[-1]
        u = layer.norm(x)
        window = layer.inst_mean.window
        keep = max(window - 1, layer.dfa_w.k - 1, layer.dfa_wide.k - 1, 0)
        ext = self._extend(io, f"{name}.u", level, u, keep, valid)
        mean = F.avg_pool1d(self._tail(ext, window - 1, n), window, stride=1) if window > 1 else u
        inst = self._dfa(layer.inst_dfa, u, n) * torch.relu(layer.inst_fc(mean))
        multi = self._dfa(layer.dfa_w, ext, n) + self._dfa(layer.dfa_wide, ext, n)
        x = x + inst + multi
        return x + layer.ffn(layer.ffn_norm(x))

    def _encoder(self, io: _StateIO, x: torch.Tensor, valid: list[Valid]) -> list[torch.Tensor]:
        enc, cfg = self.det.encoder, self.cfg
        for i, (conv, norm) in enumerate(zip(enc.embed.convs, enc.embed.norms, strict=True)):
            ext = self._extend(io, f"enc.embed{i}.x", 0, x, conv.k - 1, None)
            x = torch.relu(norm(conv.conv(ext)))
        for i, layer in enumerate(enc.stem):
            x = self._dyne(io, f"enc.stem{i}", 0, layer, x, None)
        levels = [x]
        for lvl, layer in enumerate(enc.branch, start=1):
            if self.n[lvl - 1] >= 2:  # both inputs of every pair arrive in this chunk
                x = F.max_pool1d(x, 2, stride=2)
            else:  # one fine position per chunk: pair it with the cached even one
                pending = io.read(f"enc.L{lvl}.pending", lvl, (cfg.channels, 1))
                io.write(f"enc.L{lvl}.pending", x, pending, valid[lvl - 1])
                x = torch.maximum(pending, x)
            x = self._dyne(io, f"enc.L{lvl}", lvl, layer, x, valid[lvl])
            levels.append(x)
        return [norm(f) for norm, f in zip(enc.level_norms, levels, strict=True)]

    # -- heads: all levels packed on one position axis (weights are shared across levels) ---------

    def _hist(self, io: _StateIO, name: str, x: torch.Tensor, keep: int) -> torch.Tensor:
        """ext = [every level's last ``keep`` inputs; x (B, C, N)]: taps are static gathers from it."""
        old = io.read(name, -1, (x.shape[1], self.levels * keep))
        ext = torch.cat([old, x], dim=-1)
        io.write(name, torch.index_select(ext, 2, self._idx(f"hist{keep}")), old, self._hist_mask(keep))
        return ext

    def _idx(self, key: str) -> torch.Tensor:
        return getattr(self, f"_i_{key}")

    def _taps(self, ext: torch.Tensor, k: int, keep: int) -> list[torch.Tensor]:
        return [torch.index_select(ext, 2, self._idx(f"tap{k}_{keep}_{i}")) for i in range(k)]

    def _msdy(self, io: _StateIO, name: str, layer: MSDyLayer, x: torch.Tensor) -> torch.Tensor:
        keep = layer.from_fine.k - 1
        ext = self._hist(io, f"{name}.x", x, keep)
        taps = self._taps(ext, layer.from_fine.k, keep)
        fine = self._dfa_taps(layer.from_fine, taps)
        coarse = self._dfa_taps(layer.from_coarse, taps)
        # Coarse j takes fine 2j+1, the newest of its pair (level 0 reads the zero column).
        nb = torch.index_select(torch.cat([fine, torch.zeros_like(fine[..., :1])], dim=-1), 2, self._i_from_fine)
        # Fine i takes coarse floor((i+1)/2)-1, the newest complete one: cached, or new in this chunk.
        last = io.read(f"{name}.coarse_last", -1, (x.shape[1], self.levels - 1))
        ext_c = torch.cat([last, coarse, torch.zeros_like(coarse[..., :1])], dim=-1)
        up = torch.index_select(ext_c, 2, self._i_from_coarse)
        if self._coarse_mask is not None:
            up = torch.where(self._coarse_mask, up, torch.index_select(ext_c, 2, self._i_from_coarse_old))
        io.write(f"{name}.coarse_last", torch.index_select(ext_c, 2, self._i_coarse_last), last, self._last_mask)
        fused = layer.beta * x + layer.alpha * (nb + up)
        k = layer.depth.k
        ext = self._hist(io, f"{name}.fused", fused, k - 1)
        return torch.relu(self._dfa_taps(layer.depth, self._taps(ext, k, k - 1)))

    def _sta(self, io: _StateIO, name: str, sta: SpatialTemporalAttention, x: torch.Tensor) -> torch.Tensor:
        window = sta.avg.window
        if window > 1:
            ext = self._hist(io, f"{name}.x", x, window - 1)
            b, c, n = x.shape
            win = torch.index_select(ext, 2, self._idx(f"win{window}")).reshape(b, c, n, window)
            avg, mx = win.mean(dim=-1), win.amax(dim=-1)
        else:
            avg = mx = x
        a_c = torch.sigmoid(sta.mlp(avg) + sta.mlp(mx))
        x_c = x * (1 + a_c) if sta.residual else x * a_c
        pooled = torch.cat([x_c.mean(dim=1, keepdim=True), x_c.amax(dim=1, keepdim=True)], dim=1)
        gate = torch.sigmoid(self._conv_taps(io, f"{name}.pooled", sta.time_conv.conv, pooled))
        return x_c * (1 + gate) if sta.residual else x_c * gate

    def _conv_taps(self, io: _StateIO, name: str, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        """A causal Conv1d of kernel k as one 1x1 conv over the k stacked taps (tap-major channels)."""
        k = conv.kernel_size[0]
        if k == 1:
            return conv(x)
        taps = self._taps(self._hist(io, name, x, k - 1), k, k - 1)
        weight = conv.weight.permute(0, 2, 1).reshape(conv.out_channels, -1, 1)
        return F.conv1d(torch.cat(taps, dim=1), weight, conv.bias)

    def _head(self, io: _StateIO, name: str, head: DetectionHead, x: torch.Tensor) -> torch.Tensor:
        for j, layer in enumerate(head.layers):
            x = self._msdy(io, f"head.{name}.layer{j}", layer, x)
        if head.sta is not None:
            x = self._sta(io, f"head.{name}.sta", head.sta, x)
        return self._conv_taps(io, f"head.{name}.pred", head.pred.conv, x)


@torch.no_grad()
def run_chunks(step: StepDetector, steps: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Feed a whole (B, T, D) sequence chunk by chunk (T a multiple of H); collect every level's valid
    outputs in order: scores (B, T/s, C) sigmoid and offsets (B, T/s, 2) in steps per level."""
    b, t, _ = steps.shape
    h = step.chunk_steps
    if t % h:
        raise ValueError(f"T={t} must be a multiple of the chunk size {h}")
    state, phase = step.initial_state(b)
    levels = step.layout.slot_levels()
    per_level: list[tuple[list, list]] = [([], []) for _ in step.cfg.strides]
    for c in range(t // h):
        scores, offsets, valid, state, phase = step(steps[:, c * h : (c + 1) * h], state, phase)
        for slot, lvl in enumerate(levels):
            ok = valid[:, slot]
            if bool(ok.all()):
                per_level[lvl][0].append(scores[:, slot])
                per_level[lvl][1].append(offsets[:, slot])
            elif bool(ok.any()):
                raise RuntimeError("streams of one batch at different phases: collect per stream instead")
    return (
        [torch.stack(s, dim=1) for s, _ in per_level],
        [torch.stack(o, dim=1) for _, o in per_level],
    )
