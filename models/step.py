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
        """DFAConv.forward on the last n positions of ext, which holds the k-1 inputs before them."""
        k = m.k
        ext = ext[..., ext.shape[-1] - (k - 1 + n) :]
        b, c, _ = ext.shape
        taps = torch.stack([ext[..., i : i + n] for i in range(k)], dim=2)
        g_c = geretanh((taps * m.gate_weight).sum(dim=2) + m.gate_bias, m.tau)
        g_k = geretanh(m.tap_gate(ext[..., k - 1 :]), m.tau)
        modulated = taps * g_c.unsqueeze(2) * g_k.unsqueeze(1)
        if m.depthwise:
            y = (modulated * m.agg_weight).sum(dim=2) + m.agg_bias
        else:
            y = m.agg(modulated.reshape(b, c * k, n))
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

    def _msdy(self, io: _StateIO, name: str, layer: MSDyLayer, feats: list[torch.Tensor], valid: list[Valid]):
        top = len(feats) - 1
        keep = layer.from_fine.k - 1
        fine, coarse = [], []
        for lvl, f in enumerate(feats):
            ext = self._extend(io, f"{name}.L{lvl}.x", lvl, f, keep, valid[lvl])
            n = f.shape[-1]
            fine.append(self._dfa(layer.from_fine, ext, n) if lvl < top else None)
            coarse.append(self._dfa(layer.from_coarse, ext, n) if lvl > 0 else None)
        out = []
        for lvl, x in enumerate(feats):
            n = x.shape[-1]
            parts = []
            if lvl > 0:  # coarse j takes fine 2j+1, the newest of its pair
                parts.append(fine[lvl - 1][..., 1::2] if self.n[lvl - 1] >= 2 else fine[lvl - 1])
            if lvl < top:  # fine i takes coarse floor((i+1)/2)-1, the newest complete one
                c = coarse[lvl + 1]
                last = io.read(f"{name}.L{lvl + 1}.coarse_last", lvl + 1, (c.shape[1], 1))
                if n >= 2:
                    up = torch.stack([c, c], dim=-1).reshape(c.shape[0], c.shape[1], 2 * c.shape[-1])
                    up = torch.cat([last, up], dim=-1)[..., :n]
                    io.write(f"{name}.L{lvl + 1}.coarse_last", c[..., -1:], last, valid[lvl + 1])
                else:
                    v = valid[lvl + 1]
                    up = c if v is None else torch.where(v.view(-1, 1, 1), c, last)
                    io.write(f"{name}.L{lvl + 1}.coarse_last", c, last, v)
                parts.append(up)
            nb = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            fused = layer.beta * x + layer.alpha * nb
            ext = self._extend(io, f"{name}.L{lvl}.fused", lvl, fused, layer.depth.k - 1, valid[lvl])
            out.append(torch.relu(self._dfa(layer.depth, ext, n)))
        return out

    def _sta(self, io: _StateIO, name: str, level: int, sta: SpatialTemporalAttention, x: torch.Tensor, valid: Valid):
        n = x.shape[-1]
        window = sta.avg.window
        if window > 1:
            ext = self._extend(io, f"{name}.x", level, x, window - 1, valid)
            avg = F.avg_pool1d(ext, window, stride=1)
            mx = F.max_pool1d(ext, window, stride=1)
        else:
            avg = mx = x
        a_c = torch.sigmoid(sta.mlp(avg) + sta.mlp(mx))
        x_c = x * (1 + a_c) if sta.residual else x * a_c
        pooled = torch.cat([x_c.mean(dim=1, keepdim=True), x_c.amax(dim=1, keepdim=True)], dim=1)
        conv = sta.time_conv
        ext = self._extend(io, f"{name}.pooled", level, pooled, conv.k - 1, valid)
        gate = torch.sigmoid(conv.conv(ext))
        return x_c * (1 + gate) if sta.residual else x_c * gate

    def _head(self, io: _StateIO, name: str, head: DetectionHead, feats: list[torch.Tensor], valid: list[Valid]):
        for j, layer in enumerate(head.layers):
            feats = self._msdy(io, f"head.{name}.layer{j}", layer, feats, valid)
        out = []
        for lvl, f in enumerate(feats):
            if head.sta is not None:
                f = self._sta(io, f"head.{name}.sta.L{lvl}", lvl, head.sta, f, valid[lvl])
            ext = self._extend(io, f"head.{name}.pred.L{lvl}", lvl, f, head.pred.k - 1, valid[lvl])
            out.append(head.pred.conv(ext))
        return out


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
