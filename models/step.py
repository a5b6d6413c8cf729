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

A chunk holds a few positions per level, so its cost in ONNX Runtime is the number of graph nodes
and the data they copy more than arithmetic. The form is written for few nodes: every kernel's k
taps come from one gather as a (B, n, k, C) tensor and are reduced in one op; the depthwise DFA
convs that read the same input (the encoder's three, a head layer's fine and coarse ones) run as
one stack; GeReTanH's constant scale is folded into the weights its gate multiplies; the flat state
is split once; re-laid weights are computed once (``_Consts``) and every size is a Python
constant, so the graph does no shape or weight arithmetic per call (tests/test_step_model.py checks
the export).

Tensors are channel-last (B, T, C) here (the window model is (B, C, T)): 1x1 convs become MatMul,
channel norms one LayerNormalization, and every gather or cache update moves whole contiguous
C-vectors. Measured on 2 CPU cores at batch 32 this ran about 3x faster than the channel-first form.
State segments are therefore (steps, channels), oldest step first. Numbers equal the full causal
forward over the whole sequence (tests/test_step_model.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.detector import Detector
from models.nn.encoder import DynELayer
from models.nn.head import DetectionHead, MSDyLayer
from models.nn.layers import ChannelNorm, DFAConv
from models.nn.sta import SpatialTemporalAttention
from service.contract.step_layout import StateSegment, StepLayout, is_power_of_two


class _StateIO:
    """Reads state segments from the flat (B, S) vector in call order, collects their new values.

    With ``flat=None`` every read returns zeros (a fresh stream); that mode also discovers the layout.
    With the layout's segment sizes, the flat vector is split once (one graph node, not one per read).
    """

    def __init__(self, flat: torch.Tensor | None, batch: int, like: torch.Tensor, sizes: list[int] | None) -> None:
        self.flat, self.batch, self.like = flat, batch, like
        self.pieces = list(torch.split(flat, sizes, dim=1)) if flat is not None and sizes else None
        self.segments: list[StateSegment] = []
        self.cursor = 0
        self.new: dict[str, torch.Tensor] = {}

    def read(self, name: str, level: int, shape: tuple[int, ...]) -> torch.Tensor:
        size = math.prod(shape)
        if self.flat is None:
            value = self.like.new_zeros((self.batch, *shape))
        elif self.pieces is not None:
            value = self.pieces[len(self.segments)].reshape(-1, *shape)
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
    """Per-call values: state I/O, and per level a keep-new mask (B, 1, 1) from the phase (None: the
    level completes positions in every chunk) plus the packed head's masks."""

    io: _StateIO
    level_masks: list[torch.Tensor | None]
    masks: dict[str, torch.Tensor | None]


class _Consts(nn.Module):
    """The detector's weights re-laid for the step form (transposed, tap-major, stacked, gate scale
    folded), computed once at construction: the exported graph gets them as plain initializers
    instead of re-deriving them in every call. A snapshot: build the StepDetector after training."""

    def __init__(self) -> None:
        super().__init__()
        self._names: dict[tuple[int, str], str] = {}

    def get(self, owner: nn.Module, tag: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        name = self._names.get((id(owner), tag))
        if name is None:
            name = f"c{len(self._names)}"
            with torch.no_grad():
                self.register_buffer(name, make().detach().clone().contiguous(), persistent=False)
            self._names[(id(owner), tag)] = name
        return getattr(self, name)


# -- channel-last forms of the window model's per-step ops (same weights) ---------------------------


def _linear(w: _Consts, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """A 1x1 Conv1d on (B, T, C)."""
    return F.linear(x, w.get(conv, "weight", lambda: conv.weight[:, :, 0]), conv.bias)


def _norm(w: _Consts, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """ChannelNorm (LayerNorm over channels, biased variance) on (B, T, C); Identity passes through."""
    if isinstance(norm, ChannelNorm):
        weight = w.get(norm, "weight", lambda: norm.weight.view(-1))
        return F.layer_norm(x, weight.shape, weight, w.get(norm, "bias", lambda: norm.bias.view(-1)), norm.eps)
    return x


def _conv_taps(w: _Consts, taps: torch.Tensor, conv: nn.Conv1d, n: int) -> torch.Tensor:
    """Conv1d of kernel k given its taps (B, n, k, Cin), tap k-1 the current input: one MatMul.

    Sizes come from the modules, not from tensor shapes: traced shapes would put shape arithmetic
    into the exported graph."""
    k, c = conv.kernel_size[0], conv.in_channels
    # [o, i*Cin + c] = w[o, c, i]: tap-major, as the taps are laid out.
    weight = w.get(conv, "taps", lambda: conv.weight.permute(0, 2, 1).reshape(conv.out_channels, k * c))
    return F.linear(taps.reshape(-1, n, k * c), weight, conv.bias)


def _gate(z: torch.Tensor, tau: float) -> torch.Tensor:
    """GeReTanH times (1 + tanh tau), for a pre-activation already shifted by -tau (in its bias).
    The constant 1 / (1 + tanh tau) is folded into the weights the gate multiplies."""
    return torch.relu(torch.tanh(z) + math.tanh(tau))


def _gate_scale(tau: float) -> float:
    return 1.0 / (1.0 + math.tanh(tau))


def _front_pad(w: torch.Tensor, span: int) -> torch.Tensor:
    """(k, ...) per-tap weights -> (span, ...) with zeros for the older taps a kernel k < span never reads."""
    return F.pad(w, (0, 0) * (w.dim() - 1) + (span - w.shape[0], 0))


def _stack_weights(mods: list[DFAConv], span: int) -> dict[str, torch.Tensor]:
    """A depthwise DFA stack's weights, per tap (oldest first) and conv: gate (K, D, C), tap gate
    (K*D, C) with columns (tap, conv), aggregation (K, D, C) with both gate scales folded in."""
    tau = mods[0].tau
    s = _gate_scale(tau)
    c = mods[0].gate_bias.numel()
    return {
        "gate_w": torch.stack([_front_pad(m.gate_weight[0, :, :, 0].t(), span) for m in mods], dim=1),
        "gate_b": torch.stack([m.gate_bias.view(-1) - tau for m in mods]),
        "tap_w": torch.stack([_front_pad(m.tap_gate.weight[:, :, 0], span) for m in mods], dim=1).reshape(-1, c),
        "tap_b": torch.stack([_front_pad(m.tap_gate.bias.view(-1, 1), span)[:, 0] for m in mods], dim=1).reshape(-1)
        - tau,
        "agg_w": torch.stack([_front_pad(m.agg_weight[0, :, :, 0].t(), span) for m in mods], dim=1) * (s * s),
        "agg_b": torch.stack([m.agg_bias.view(-1) for m in mods]),
    }


def _depthwise_dfa_stack(w: _Consts, mods: list[DFAConv], taps: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """Several depthwise DFAConvs (no norm) on the same input, as one stack: (B, n, len(mods), C).

    taps (B, n, K, 1, C): the last K inputs of every position, oldest first (K: the largest kernel);
    x (B, n, C): the current input (tap K-1). A kernel k reads the newest k taps; its weights are
    zero on the older ones (a zero-weight tap adds nothing). Same sums as DFAConv.forward, reordered."""
    span, tau = max(m.k for m in mods), mods[0].tau
    if any(m.tau != tau or not m.depthwise or not isinstance(m.norm, nn.Identity) for m in mods):
        raise ValueError("a DFA stack needs depthwise convs without norm and one gate threshold")
    p = {
        key: w.get(mods[0], f"stack{len(mods)}.{span}.{key}", lambda key=key: _stack_weights(mods, span)[key])
        for key in ("gate_w", "gate_b", "tap_w", "tap_b", "agg_w", "agg_b")
    }
    g_c = _gate((taps * p["gate_w"]).sum(dim=2) + p["gate_b"], tau)  # (B, n, D, C)
    g_k = _gate(F.linear(x, p["tap_w"], p["tap_b"]), tau).reshape(-1, n, span, len(mods), 1)
    return (taps * (g_k * p["agg_w"])).sum(dim=2) * g_c + p["agg_b"]


def _full_dfa(w: _Consts, m: DFAConv, taps: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """A DFAConv with a full (1x1 over the stacked taps) aggregation. taps (B, n, k, C), x (B, n, C)."""
    k, c = m.k, m.gate_bias.numel()
    tau, s = m.tau, _gate_scale(m.tau)
    gate_w = w.get(m, "gate_w", lambda: m.gate_weight[0, :, :, 0].t())
    gate_b = w.get(m, "gate_b", lambda: m.gate_bias.view(-1) - tau)
    g_c = _gate((taps * gate_w).sum(dim=2) + gate_b, tau)
    tap_w = w.get(m, "tap_w", lambda: m.tap_gate.weight[:, :, 0])
    g_k = _gate(F.linear(x, tap_w, w.get(m, "tap_b", lambda: m.tap_gate.bias - tau)), tau).unsqueeze(-1)
    # The window model stacks taps channel-major (index c*k + i); here they are tap-major.
    weight = w.get(m, "agg_w", lambda: m.agg.weight.view(-1, c, k).permute(0, 2, 1).reshape(-1, k * c) * (s * s))
    y = F.linear((taps * g_k * g_c.unsqueeze(2)).reshape(-1, n, k * c), weight, m.agg.bias)
    return _norm(w, y, m.norm)


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
        self.w = _Consts()
        self.cfg = cfg
        self.chunk_steps = chunk_steps
        self.levels = cfg.levels
        self.n = [max(chunk_steps // s, 1) for s in cfg.strides]
        self.starts = [sum(self.n[:lvl]) for lvl in range(self.levels)]
        self.n_all = sum(self.n)  # positions on the heads' packed axis
        # Levels whose positions complete only in some chunks (stride > H): their state is masked.
        self.phased = [s > chunk_steps for s in cfg.strides]
        self._build_indices()
        self._sizes: list[int] | None = None
        with torch.no_grad():
            call = self._run(torch.zeros(1, chunk_steps, cfg.input_dim), None, torch.zeros(1, 1))[-1]
        self.layout = StepLayout(chunk_steps, cfg.strides, tuple(call.io.segments))
        self._sizes = [s.size for s in self.layout.segments]

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

    # -- static gather indices --------------------------------------------------------------------

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
            self._index(f"hist{keep}_level", [lvl for lvl in range(big_l) for _ in range(keep)])
            # The keep+1 taps of every new position, position-major: one gather -> (B, N, k, C).
            k = keep + 1
            taps = [ext_pos(lvl, keep, j + i) for lvl, n in enumerate(self.n) for j in range(n) for i in range(k)]
            self._index(f"taps{keep}", taps)
        # Fine -> coarse: coarse j takes fine 2j+1 (index n_all: a zero row for level 0).
        from_fine = [n_all] * self.n[0]
        for lvl in range(1, big_l):
            a = self.starts[lvl - 1]
            from_fine += [a + 2 * j + 1 for j in range(self.n[lvl])] if self.n[lvl - 1] >= 2 else [a]
        self._index("from_fine", from_fine)
        # Coarse -> fine on ext_c = [last coarse output of levels 1..L-1; N new coarse outputs; zero].
        new_col = big_l - 1
        up_new, up_old, coarse_level = [], [], []
        for lvl, n in enumerate(self.n):
            if lvl == big_l - 1:
                up_new += [new_col + n_all] * n
                up_old += [new_col + n_all] * n
                coarse_level += [0] * n
                continue
            cached, first = lvl, new_col + self.starts[lvl + 1]
            if n >= 2:  # fine i reads cached (i=0) or new coarse (i+1)//2-1
                cols = [cached] + [first + (i + 1) // 2 - 1 for i in range(1, n)]
                up_new += cols
                up_old += cols
                coarse_level += [0] * n  # level 0 is never phased: always "new"
            else:  # fine i=2j+1 reads coarse j (new in this chunk), i=2j reads the cached j-1
                up_new.append(first)
                up_old.append(cached)
                coarse_level.append(lvl + 1)  # new iff the coarse level completed a position
        self._index("from_coarse", up_new)
        self._index("from_coarse_old", up_old)
        self._index("coarse_new_level", coarse_level)
        self._index("coarse_last", [new_col + self.starts[m] + self.n[m] - 1 for m in range(1, big_l)])
        self._index("coarse_last_level", list(range(1, big_l)))
        self._index("level_of_slot", [lvl for lvl, n in enumerate(self.n) for _ in range(n)])
        self.register_buffer("_strides", torch.tensor(cfg.strides, dtype=torch.float32), persistent=False)

    def _masks(self, completes: torch.Tensor) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor | None]]:
        """completes (B, L) bool: does level l complete a position in this chunk, per stream."""
        if not any(self.phased):
            return [None] * self.levels, dict.fromkeys(
                [f"hist{k}" for k in self.head_keeps] + ["coarse_new", "coarse_last"]
            )
        level_masks = [completes[:, lvl].view(-1, 1, 1) if p else None for lvl, p in enumerate(self.phased)]

        def rows(key: str) -> torch.Tensor:
            return torch.index_select(completes, 1, self._idx(key)).unsqueeze(-1)

        masks: dict[str, torch.Tensor | None] = {f"hist{k}": rows(f"hist{k}_level") for k in self.head_keeps}
        masks["coarse_new"] = rows("coarse_new_level")
        masks["coarse_last"] = rows("coarse_last_level")
        return level_masks, masks

    # -- the chunk computation ---------------------------------------------------------------------

    def _run(self, features: torch.Tensor, state: torch.Tensor | None, phase: torch.Tensor):
        cfg, h = self.cfg, self.chunk_steps
        # Level l completes a position in this chunk iff (steps consumed after it) % s == 0; always
        # true for s <= H, as the phase is a multiple of H.
        completes = torch.remainder(phase + h, self._strides) == 0  # (B, L)
        level_masks, masks = self._masks(completes)
        call = _Call(_StateIO(state, features.shape[0], features, self._sizes), level_masks, masks)
        det = self.det
        x = (features - det.feat_mean) / det.feat_std  # (B, H, D)
        packed = torch.cat(self._encoder(call, x), dim=1)  # (B, N, C): levels in slot order
        cls = self._head(call, "cls", det.cls_head, packed)
        reg = self._head(call, "reg", det.reg_head, packed)
        scores = torch.sigmoid(cls)
        # ReLU(scale_l * o) * s_l == ReLU(o * scale_l * s_l) since s_l > 0.
        offsets = torch.relu(reg * self.w.get(det.reg_head, "slot_scale", self._slot_scale))
        valid = torch.index_select(completes, 1, self._i_level_of_slot)
        phase_out = torch.remainder(phase + h, cfg.max_stride)
        return scores, offsets, valid, phase_out, call

    def _slot_scale(self) -> torch.Tensor:
        """(N, 1): each slot's regression scale times its level's stride."""
        scales = self.det.reg_head.scales
        per_level = torch.stack([s.scale * float(st) for s, st in zip(scales, self.cfg.strides, strict=True)])
        return torch.index_select(per_level, 0, self._i_level_of_slot).unsqueeze(-1)

    # -- encoder: per level (each level has its own weights) ----------------------------------------

    @staticmethod
    def _extend(call: _Call, name: str, level: int, x: torch.Tensor, keep: int, channels: int) -> torch.Tensor:
        """[last ``keep`` inputs of this op; x] along time: the op's past-only view; caches the tail."""
        if keep <= 0:
            return x
        old = call.io.read(name, level, (keep, channels))
        ext = torch.cat([old, x], dim=1)
        call.io.write(name, ext[:, -keep:], old, call.level_masks[level])
        return ext

    def _windows(self, ext: torch.Tensor, span: int, n: int, channels: int) -> torch.Tensor:
        """(B, n, span, C): the last ``span`` inputs of each position of ext = [span-1 cached; n new]."""
        if span == 1:
            return ext.unsqueeze(2)
        key = f"win{span}_{n}"
        if not hasattr(self, f"_i_{key}"):  # registered by the first (layout-discovering) call
            self._index(key, [j + i for j in range(n) for i in range(span)])
        return torch.index_select(ext, 1, self._idx(key)).reshape(-1, n, span, channels)

    def _dyne(self, call: _Call, name: str, level: int, layer: DynELayer, x: torch.Tensor) -> torch.Tensor:
        n, c = self.n[level], self.cfg.channels
        u = _norm(self.w, x, layer.norm)
        window = layer.inst_mean.window
        dfas = [layer.inst_dfa, layer.dfa_w, layer.dfa_wide]
        kernel = max(m.k for m in dfas)
        span = max(window, kernel)
        win = self._windows(self._extend(call, f"{name}.u", level, u, span - 1, c), span, n, c)
        mean = win[:, :, span - window :].mean(dim=2) if window > 1 else u
        y = _depthwise_dfa_stack(self.w, dfas, win[:, :, span - kernel :].unsqueeze(3), u, n)  # (B, n, 3, C)
        inst = y[:, :, 0] * torch.relu(_linear(self.w, mean, layer.inst_fc))
        x = x + inst + y[:, :, 1] + y[:, :, 2]
        ffn_in, act, ffn_out = layer.ffn
        return x + _linear(self.w, act(_linear(self.w, _norm(self.w, x, layer.ffn_norm), ffn_in)), ffn_out)

    def _encoder(self, call: _Call, x: torch.Tensor) -> list[torch.Tensor]:
        enc, cfg = self.det.encoder, self.cfg
        for i, (conv, norm) in enumerate(zip(enc.embed.convs, enc.embed.norms, strict=True)):
            n, c = self.n[0], conv.conv.in_channels
            taps = self._windows(self._extend(call, f"enc.embed{i}.x", 0, x, conv.k - 1, c), conv.k, n, c)
            x = torch.relu(_norm(self.w, _conv_taps(self.w, taps, conv.conv, n), norm))
        for i, layer in enumerate(enc.stem):
            x = self._dyne(call, f"enc.stem{i}", 0, layer, x)
        levels = [x]
        for lvl, layer in enumerate(enc.branch, start=1):
            if self.n[lvl - 1] >= 2:  # both inputs of every pair arrive in this chunk
                x = torch.maximum(x[:, 0::2], x[:, 1::2])
            else:  # one fine position per chunk: pair it with the cached even one
                pending = call.io.read(f"enc.L{lvl}.pending", lvl, (1, cfg.channels))
                call.io.write(f"enc.L{lvl}.pending", x, pending, call.level_masks[lvl - 1])
                x = torch.maximum(pending, x)
            x = self._dyne(call, f"enc.L{lvl}", lvl, layer, x)
            levels.append(x)
        return [_norm(self.w, f, norm) for norm, f in zip(enc.level_norms, levels, strict=True)]

    # -- heads: all levels packed on one position axis (weights are shared across levels) ---------

    def _taps(self, call: _Call, name: str, x: torch.Tensor, k: int, channels: int) -> torch.Tensor:
        """(B, N, k, C): the k taps of every new position. The op's state is every level's last k-1
        inputs; ext = [that state; x (B, N, C)] and the taps are one static gather from it."""
        if k == 1:
            return x.unsqueeze(2)
        keep = k - 1
        old = call.io.read(name, -1, (self.levels * keep, channels))
        ext = torch.cat([old, x], dim=1)
        call.io.write(name, torch.index_select(ext, 1, self._idx(f"hist{keep}")), old, call.masks[f"hist{keep}"])
        return torch.index_select(ext, 1, self._idx(f"taps{keep}")).reshape(-1, self.n_all, k, channels)

    def _msdy(self, call: _Call, name: str, layer: MSDyLayer, x: torch.Tensor) -> torch.Tensor:
        c, n = self.cfg.channels, self.n_all
        taps = self._taps(call, f"{name}.x", x, layer.from_fine.k, c)
        both = _depthwise_dfa_stack(self.w, [layer.from_fine, layer.from_coarse], taps.unsqueeze(3), x, n)  # (B,N,2,C)
        # Coarse j takes fine 2j+1, the newest of its pair (level 0 reads the zero row).
        nb = torch.index_select(F.pad(both[:, :, 0], (0, 0, 0, 1)), 1, self._i_from_fine)
        # Fine i takes coarse floor((i+1)/2)-1, the newest complete one: cached, or new in this chunk.
        last = call.io.read(f"{name}.coarse_last", -1, (self.levels - 1, self.cfg.channels))
        ext_c = torch.cat([last, F.pad(both[:, :, 1], (0, 0, 0, 1))], dim=1)
        up = torch.index_select(ext_c, 1, self._i_from_coarse)
        if call.masks["coarse_new"] is not None:
            up = torch.where(call.masks["coarse_new"], up, torch.index_select(ext_c, 1, self._i_from_coarse_old))
        newest = torch.index_select(ext_c, 1, self._i_coarse_last)
        call.io.write(f"{name}.coarse_last", newest, last, call.masks["coarse_last"])
        fused = layer.beta * x + layer.alpha * (nb + up)
        return torch.relu(
            _full_dfa(self.w, layer.depth, self._taps(call, f"{name}.fused", fused, layer.depth.k, c), fused, n)
        )

    def _sta(self, call: _Call, name: str, sta: SpatialTemporalAttention, x: torch.Tensor) -> torch.Tensor:
        window = sta.avg.window
        if window > 1:
            win = self._taps(call, f"{name}.x", x, window, self.cfg.channels)
            stats = torch.cat([win.mean(dim=2, keepdim=True), win.amax(dim=2, keepdim=True)], dim=2)
        else:
            stats = torch.stack([x, x], dim=2)
        fc1, act, fc2 = sta.mlp
        a_c = torch.sigmoid(_linear(self.w, act(_linear(self.w, stats, fc1)), fc2).sum(dim=2))  # MLP(avg) + MLP(max)
        x_c = x * (1 + a_c) if sta.residual else x * a_c
        pooled = torch.cat([x_c.mean(dim=-1, keepdim=True), x_c.amax(dim=-1, keepdim=True)], dim=-1)
        gate = torch.sigmoid(self._conv(call, f"{name}.pooled", sta.time_conv.conv, pooled))
        return x_c * (1 + gate) if sta.residual else x_c * gate

    def _conv(self, call: _Call, name: str, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        """A causal Conv1d of kernel k on the packed axis."""
        taps = self._taps(call, name, x, conv.kernel_size[0], conv.in_channels)
        return _conv_taps(self.w, taps, conv, self.n_all)

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
