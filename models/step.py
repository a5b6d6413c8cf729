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

The heads share their weights across levels, so the step form runs all levels' new positions as one
packed axis of N = sum(n_l) positions (the output slot order): a time-mixing op keeps every level's
last k-1 inputs in one state segment, and its taps are static gathers from [state; new inputs].
This is ~5x fewer graph nodes than one call per level, which is what a chunk of a few positions
costs in ONNX Runtime.

Tensors are channel-last (B, T, C) here (the window model is (B, C, T)): 1x1 convs become MatMul,
channel norms one LayerNormalization, and every gather or cache update moves whole contiguous
C-vectors. Measured on 2 CPU cores at batch 32 this ran about 3x faster than the channel-first form.
State segments are therefore (steps, channels), oldest step first. Numbers equal the full causal
forward over the whole sequence (tests/test_step_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.detector import Detector
from models.nn.encoder import DynELayer
from models.nn.head import DetectionHead, MSDyLayer
from models.nn.layers import ChannelNorm, DFAConv, geretanh
from models.nn.sta import SpatialTemporalAttention
from service.contract.step_layout import StateSegment, StepLayout, is_power_of_two

Valid = torch.Tensor | None  # (B,) bool per level; None: the level completes positions every chunk


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

    def write(self, name: str, value: torch.Tensor, old: torch.Tensor, keep_new: torch.Tensor | None) -> None:
        """keep_new: a mask broadcastable to value (False keeps the old entry), or None."""
        self.new[name] = value if keep_new is None else torch.where(keep_new, value, old)

    def output(self) -> torch.Tensor:
        return torch.cat([self.new[s.name].flatten(1) for s in self.segments], dim=1)


@dataclass
class _Call:
    """Per-call values: state I/O and the per-stream validity of every level (from the phase)."""

    io: _StateIO
    valid: list[Valid]
    masks: dict[str, torch.Tensor | None]


def _stream_mask(valid: Valid) -> torch.Tensor | None:
    return None if valid is None else valid.view(-1, 1, 1)


# -- channel-last forms of the window model's per-step ops (same weights) ---------------------------


def _linear(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """A 1x1 Conv1d on (B, T, C)."""
    return F.linear(x, conv.weight.squeeze(-1), conv.bias)


def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """ChannelNorm (LayerNorm over channels, biased variance) on (B, T, C); Identity passes through."""
    if isinstance(norm, ChannelNorm):
        return F.layer_norm(x, (norm.weight.numel(),), norm.weight.view(-1), norm.bias.view(-1), norm.eps)
    return x


def _conv_from_taps(taps: list[torch.Tensor], conv: nn.Conv1d) -> torch.Tensor:
    """Conv1d of kernel k given its k taps (B, n, Cin) each: one MatMul over the tap-major stack."""
    weight = conv.weight.permute(0, 2, 1).reshape(conv.out_channels, -1)  # [o, i*Cin + c] = w[o, c, i]
    return F.linear(torch.cat(taps, dim=-1) if len(taps) > 1 else taps[0], weight, conv.bias)


def _dfa_taps(m: DFAConv, taps: list[torch.Tensor]) -> torch.Tensor:
    """DFAConv.forward given its k taps (B, n, C), tap k-1 being the current input. Same sums as
    DFAConv, unrolled over the taps (ONNX Runtime's ReduceSum over a small tap axis is slow)."""
    k = m.k
    g_pre = m.gate_bias.view(-1)
    for i, tap in enumerate(taps):
        g_pre = g_pre + tap * m.gate_weight[0, :, i, 0]
    g_c = geretanh(g_pre, m.tau)
    g_k = geretanh(_linear(taps[-1], m.tap_gate), m.tau)  # (B, n, k)
    if m.depthwise:
        acc = None
        for i, tap in enumerate(taps):
            term = tap * (g_k[..., i : i + 1] * m.agg_weight[0, :, i, 0])
            acc = term if acc is None else acc + term
        y = acc * g_c + m.agg_bias.view(-1)
    else:
        # The window model stacks taps channel-major (index c*k + i) before its 1x1 aggregation.
        modulated = torch.stack([tap * g_k[..., i : i + 1] for i, tap in enumerate(taps)], dim=-1)
        b, n, c = taps[0].shape
        y = _linear((modulated * g_c.unsqueeze(-1)).reshape(b, n, c * k), m.agg)
    return _norm(y, m.norm)


def _slices(ext: torch.Tensor, k: int, n: int) -> list[torch.Tensor]:
    """The k taps of the last n positions of ext (B, >= k-1+n, C)."""
    ext = ext[:, ext.shape[1] - (k - 1 + n) :]
    return [ext[:, i : i + n] for i in range(k)]


class StepDetector(nn.Module):
    """forward(features (B,H,D), state (B,S), phase (B,1))
    -> scores (B,N,C), offsets (B,N,2) steps, valid (B,N) bool, state_out (B,S), phase_out (B,1).

    Every input is float32 (the phase holds small integers exactly), so a generic batcher can stack
    a stream's request like any other arrays."""

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
        self.levels = cfg.levels
        self.n = [max(chunk_steps // s, 1) for s in cfg.strides]
        self.starts = [sum(self.n[:lvl]) for lvl in range(self.levels)]
        self._build_indices()
        with torch.no_grad():
            call = self._run(torch.zeros(1, chunk_steps, cfg.input_dim), None, torch.zeros(1, 1))[-1]
        self.layout = StepLayout(chunk_steps, cfg.strides, tuple(call.io.segments))

    @property
    def state_size(self) -> int:
        return self.layout.state_size

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(batch, self.state_size), torch.zeros(batch, 1)

    def forward(
        self, features: torch.Tensor, state: torch.Tensor, phase: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, offsets, valid, phase_out, call = self._run(features, state, phase)
        return scores, offsets, valid, call.io.output(), phase_out

    # -- static gather indices of the packed head ---------------------------------------------------

    def _index(self, key: str, values: list[int]) -> None:
        self.register_buffer(f"_i_{key}", torch.tensor(values, dtype=torch.long), persistent=False)

    def _idx(self, key: str) -> torch.Tensor:
        return getattr(self, f"_i_{key}")

    def _build_indices(self) -> None:
        """Positions in ext = [level 0's keep cached inputs, ..., level L-1's; the N new ones]."""
        cfg, big_l, n_all = self.cfg, self.levels, sum(self.n)

        def ext_pos(lvl: int, keep: int, e: int) -> int:  # e-th entry of level lvl's [cache; new]
            return lvl * keep + e if e < keep else big_l * keep + self.starts[lvl] + e - keep

        keeps = {cfg.head_kernel - 1}
        if cfg.sta:
            keeps |= {cfg.sta_window - 1, cfg.sta_kernel - 1}
        self.head_keeps = sorted(k for k in keeps if k > 0)
        for keep in self.head_keeps:
            self._index(f"hist{keep}", [ext_pos(lvl, keep, n + m) for lvl, n in enumerate(self.n) for m in range(keep)])
            k = keep + 1
            for i in range(k):
                taps = [ext_pos(lvl, keep, i + j) for lvl, n in enumerate(self.n) for j in range(n)]
                self._index(f"tap{k}_{keep}_{i}", taps)
        if cfg.sta and cfg.sta_window > 1:
            w = cfg.sta_window
            self._index(
                f"win{w}",
                [ext_pos(lvl, w - 1, j + i) for lvl, n in enumerate(self.n) for j in range(n) for i in range(w)],
            )
        # Fine -> coarse: coarse j takes fine 2j+1 (index n_all: a zero row for level 0).
        from_fine = [n_all] * self.n[0]
        for lvl in range(1, big_l):
            a = self.starts[lvl - 1]
            from_fine += [a + 2 * j + 1 for j in range(self.n[lvl])] if self.n[lvl - 1] >= 2 else [a]
        self._index("from_fine", from_fine)
        # Coarse -> fine on ext_c = [last coarse output of levels 1..L-1; N new coarse outputs; zero].
        new_col = big_l - 1
        up_new, up_old = [], []
        for lvl, n in enumerate(self.n):
            if lvl == big_l - 1:
                up_new += [new_col + n_all] * n
                up_old += [new_col + n_all] * n
                continue
            cached, first = lvl, new_col + self.starts[lvl + 1]
            if n >= 2:  # fine i reads cached (i=0) or new coarse (i+1)//2-1
                cols = [cached] + [first + (i + 1) // 2 - 1 for i in range(1, n)]
                up_new += cols
                up_old += cols
            else:  # fine i=2j+1 reads coarse j (new in this chunk), i=2j reads the cached j-1
                up_new.append(first)
                up_old.append(cached)
        self._index("from_coarse", up_new)
        self._index("from_coarse_old", up_old)
        self._index("coarse_last", [new_col + self.starts[m] + self.n[m] - 1 for m in range(1, big_l)])
        self._index("level_of_slot", [lvl for lvl, n in enumerate(self.n) for _ in range(n)])

    def _masks(self, valid: list[Valid], batch: int, device: torch.device) -> dict[str, torch.Tensor | None]:
        """Per-stream keep-new masks (B, rows, 1) for the packed head's cached rows (None: always new)."""
        masks: dict[str, torch.Tensor | None] = {}
        if all(v is None for v in valid):
            for keep in self.head_keeps:
                masks[f"hist{keep}"] = None
            masks["coarse_new"] = masks["coarse_last"] = None
            return masks
        ones = torch.ones(batch, device=device, dtype=torch.bool)
        cols = [ones if v is None else v for v in valid]
        for keep in self.head_keeps:
            masks[f"hist{keep}"] = torch.stack([c for c in cols for _ in range(keep)], dim=1).unsqueeze(-1)
        # Position of level l with one slot whose coarse level is phase dependent: new coarse iff valid.
        top = self.levels - 1
        coarse_new = [cols[lvl + 1] if lvl < top and n == 1 else ones for lvl, n in enumerate(self.n) for _ in range(n)]
        masks["coarse_new"] = torch.stack(coarse_new, dim=1).unsqueeze(-1)
        masks["coarse_last"] = torch.stack(cols[1:], dim=1).unsqueeze(-1)
        return masks

    # -- the chunk computation ---------------------------------------------------------------------

    def _run(self, features: torch.Tensor, state: torch.Tensor | None, phase: torch.Tensor):
        cfg, h = self.cfg, self.chunk_steps
        batch = features.shape[0]
        # Level l completes a position in this chunk iff (steps consumed after it) % s == 0.
        end = phase.view(-1) + h
        valid: list[Valid] = [None if s <= h else torch.remainder(end, s) == 0 for s in cfg.strides]
        call = _Call(_StateIO(state, batch, features), valid, self._masks(valid, batch, features.device))
        det = self.det
        x = (features - det.feat_mean) / det.feat_std  # (B, H, D)
        packed = torch.cat(self._encoder(call, x), dim=1)  # (B, N, C): levels in slot order
        cls = self._head(call, "cls", det.cls_head, packed)
        reg = self._head(call, "reg", det.reg_head, packed)
        scale = torch.stack([s.scale * float(st) for s, st in zip(det.reg_head.scales, cfg.strides, strict=True)])
        scores = torch.sigmoid(cls)
        # ReLU(scale_l * o) * s_l == ReLU(o * scale_l * s_l) since s_l > 0.
        offsets = torch.relu(reg * torch.index_select(scale, 0, self._i_level_of_slot).unsqueeze(-1))
        always = torch.ones(batch, 1, dtype=torch.bool, device=features.device)
        flags = [(always if v is None else v.view(-1, 1)).expand(batch, n) for v, n in zip(valid, self.n, strict=True)]
        phase_out = torch.remainder(phase + h, cfg.max_stride)
        return scores, offsets, torch.cat(flags, dim=1), phase_out, call

    # -- encoder: per level (each level has its own weights) ----------------------------------------

    @staticmethod
    def _extend(call: _Call, name: str, level: int, x: torch.Tensor, keep: int) -> torch.Tensor:
        """[last ``keep`` inputs of this op; x] along time: the op's past-only view; caches the tail."""
        if keep <= 0:
            return x
        old = call.io.read(name, level, (keep, x.shape[-1]))
        ext = torch.cat([old, x], dim=1)
        call.io.write(name, ext[:, -keep:], old, _stream_mask(call.valid[level]))
        return ext

    def _dyne(self, call: _Call, name: str, level: int, layer: DynELayer, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        u = _norm(x, layer.norm)
        window = layer.inst_mean.window
        keep = max(window - 1, layer.dfa_w.k - 1, layer.dfa_wide.k - 1, 0)
        ext = self._extend(call, f"{name}.u", level, u, keep)
        if window > 1:
            taps = _slices(ext, window, n)
            mean = taps[0]
            for tap in taps[1:]:
                mean = mean + tap
            mean = mean * (1.0 / window)
        else:
            mean = u
        inst = _dfa_taps(layer.inst_dfa, [u]) * torch.relu(_linear(mean, layer.inst_fc))
        multi = _dfa_taps(layer.dfa_w, _slices(ext, layer.dfa_w.k, n)) + _dfa_taps(
            layer.dfa_wide, _slices(ext, layer.dfa_wide.k, n)
        )
        x = x + inst + multi
        ffn_in, act, ffn_out = layer.ffn
        return x + _linear(act(_linear(_norm(x, layer.ffn_norm), ffn_in)), ffn_out)

    def _encoder(self, call: _Call, x: torch.Tensor) -> list[torch.Tensor]:
        enc, cfg = self.det.encoder, self.cfg
        for i, (conv, norm) in enumerate(zip(enc.embed.convs, enc.embed.norms, strict=True)):
            ext = self._extend(call, f"enc.embed{i}.x", 0, x, conv.k - 1)
            x = torch.relu(_norm(_conv_from_taps(_slices(ext, conv.k, x.shape[1]), conv.conv), norm))
        for i, layer in enumerate(enc.stem):
            x = self._dyne(call, f"enc.stem{i}", 0, layer, x)
        levels = [x]
        for lvl, layer in enumerate(enc.branch, start=1):
            if self.n[lvl - 1] >= 2:  # both inputs of every pair arrive in this chunk
                x = torch.maximum(x[:, 0::2], x[:, 1::2])
            else:  # one fine position per chunk: pair it with the cached even one
                pending = call.io.read(f"enc.L{lvl}.pending", lvl, (1, cfg.channels))
                call.io.write(f"enc.L{lvl}.pending", x, pending, _stream_mask(call.valid[lvl - 1]))
                x = torch.maximum(pending, x)
            x = self._dyne(call, f"enc.L{lvl}", lvl, layer, x)
            levels.append(x)
        return [_norm(f, norm) for norm, f in zip(enc.level_norms, levels, strict=True)]

    # -- heads: all levels packed on one position axis (weights are shared across levels) ---------

    def _hist(self, call: _Call, name: str, x: torch.Tensor, keep: int) -> torch.Tensor:
        """ext = [every level's last ``keep`` inputs; x (B, N, C)]: taps are static gathers from it."""
        old = call.io.read(name, -1, (self.levels * keep, x.shape[-1]))
        ext = torch.cat([old, x], dim=1)
        call.io.write(name, torch.index_select(ext, 1, self._idx(f"hist{keep}")), old, call.masks[f"hist{keep}"])
        return ext

    def _taps(self, ext: torch.Tensor, k: int, keep: int) -> list[torch.Tensor]:
        return [torch.index_select(ext, 1, self._idx(f"tap{k}_{keep}_{i}")) for i in range(k)]

    def _msdy(self, call: _Call, name: str, layer: MSDyLayer, x: torch.Tensor) -> torch.Tensor:
        keep = layer.from_fine.k - 1
        taps = self._taps(self._hist(call, f"{name}.x", x, keep), layer.from_fine.k, keep) if keep else [x]
        fine = _dfa_taps(layer.from_fine, taps)
        coarse = _dfa_taps(layer.from_coarse, taps)
        # Coarse j takes fine 2j+1, the newest of its pair (level 0 reads the zero row).
        nb = torch.index_select(torch.cat([fine, torch.zeros_like(fine[:, :1])], dim=1), 1, self._i_from_fine)
        # Fine i takes coarse floor((i+1)/2)-1, the newest complete one: cached, or new in this chunk.
        last = call.io.read(f"{name}.coarse_last", -1, (self.levels - 1, x.shape[-1]))
        ext_c = torch.cat([last, coarse, torch.zeros_like(coarse[:, :1])], dim=1)
        up = torch.index_select(ext_c, 1, self._i_from_coarse)
        if call.masks["coarse_new"] is not None:
            up = torch.where(call.masks["coarse_new"], up, torch.index_select(ext_c, 1, self._i_from_coarse_old))
        newest = torch.index_select(ext_c, 1, self._i_coarse_last)
        call.io.write(f"{name}.coarse_last", newest, last, call.masks["coarse_last"])
        fused = layer.beta * x + layer.alpha * (nb + up)
        k = layer.depth.k
        dtaps = self._taps(self._hist(call, f"{name}.fused", fused, k - 1), k, k - 1) if k > 1 else [fused]
        return torch.relu(_dfa_taps(layer.depth, dtaps))

    def _sta(self, call: _Call, name: str, sta: SpatialTemporalAttention, x: torch.Tensor) -> torch.Tensor:
        window = sta.avg.window
        if window > 1:
            ext = self._hist(call, f"{name}.x", x, window - 1)
            b, n, c = x.shape
            win = torch.index_select(ext, 1, self._idx(f"win{window}")).reshape(b, n, window, c)
            avg, mx = win.mean(dim=2), win.amax(dim=2)
        else:
            avg = mx = x
        fc1, act, fc2 = sta.mlp
        a_c = torch.sigmoid(_linear(act(_linear(avg, fc1)), fc2) + _linear(act(_linear(mx, fc1)), fc2))
        x_c = x * (1 + a_c) if sta.residual else x * a_c
        pooled = torch.cat([x_c.mean(dim=-1, keepdim=True), x_c.amax(dim=-1, keepdim=True)], dim=-1)
        gate = torch.sigmoid(self._conv(call, f"{name}.pooled", sta.time_conv.conv, pooled))
        return x_c * (1 + gate) if sta.residual else x_c * gate

    def _conv(self, call: _Call, name: str, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        """A causal Conv1d of kernel k on the packed axis."""
        k = conv.kernel_size[0]
        taps = self._taps(self._hist(call, name, x, k - 1), k, k - 1) if k > 1 else [x]
        return _conv_from_taps(taps, conv)

    def _head(self, call: _Call, name: str, head: DetectionHead, x: torch.Tensor) -> torch.Tensor:
        for j, layer in enumerate(head.layers):
            x = self._msdy(call, f"head.{name}.layer{j}", layer, x)
        if head.sta is not None:
            x = self._sta(call, f"head.{name}.sta", head.sta, x)
        return self._conv(call, f"head.{name}.pred", head.pred.conv, x)


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
