"""The step model's contract: chunked I/O and the layout of its cached per-stream state (torch-free).

The step model is the causal detector run incrementally. Each call consumes a chunk of ``H`` new
feature steps per stream and the stream's cached state, and returns the outputs of every pyramid
position that became final in the chunk plus the new state. The exporter (models/export_step.py)
writes a :class:`StepLayout` into the model card's ``step_model`` field; the server reads it back
with :meth:`StepLayout.from_dict` and needs nothing else to stack, run and split states.

ONNX I/O (every tensor has the batch of streams as its first axis):
- input ``features`` float32 (B, H, D): the next H feature steps of each stream.
- input ``state`` float32 (B, S) / output ``state_out``: every time-mixing layer's cache, flattened
  into one vector per stream (segments below); a new stream starts from zeros.
- input ``phase`` float32 (B, 1) / output ``phase_out``: steps consumed so far, modulo the largest
  stride (a small integer, exact in float32, so every input stacks as float32); a new stream starts
  at 0. It says which coarse levels complete in this chunk.
- output ``scores`` float32 (B, N, C) sigmoid, ``offsets`` float32 (B, N, 2) distances in steps
  from the anchor to start and end (already multiplied by the level stride), ``valid`` bool (B, N).

Slots: N = sum over levels of max(H / s, 1). A level with stride s <= H owns H / s slots, always
valid; slot i sits at step ``chunk_start + (i + 1) * s - 1``. A level with s > H owns one slot,
valid only in the chunks where one of its positions completes (every s / H chunks), at step
``chunk_start + H - 1``. Invalid slots hold garbage and must be ignored.

H must be a power of two (so each level either completes a whole number of positions per chunk,
or one position every s / H chunks). State size is fixed per stream, whatever the stream's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.contract.model_card import ModelCardError

STEP_FORMAT = 1
FEATURES_INPUT = "features"
STATE_INPUT, STATE_OUTPUT = "state", "state_out"
PHASE_INPUT, PHASE_OUTPUT = "phase", "phase_out"
SCORES_OUTPUT, OFFSETS_OUTPUT, VALID_OUTPUT = "scores", "offsets", "valid"


@dataclass(frozen=True)
class StateSegment:
    """One cached buffer inside the flat ``state`` vector: per stream, ``shape`` (steps, channels),
    row-major with the oldest step first, at ``offset``. ``level`` -1: a head buffer holding every
    level's rows, level 0's first (the heads share weights across levels)."""

    name: str
    level: int
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class StateTensor:
    """One state input/output pair of the ONNX graph, as the server stacks it (per-stream shape)."""

    input: str
    output: str
    shape: tuple[int, ...]
    dtype: str


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclass(frozen=True)
class StepLayout:
    chunk_steps: int
    strides: tuple[int, ...]
    segments: tuple[StateSegment, ...]
    format: int = STEP_FORMAT

    def __post_init__(self) -> None:
        if not is_power_of_two(self.chunk_steps):
            raise ModelCardError(f"step chunk {self.chunk_steps} must be a power of two")
        if not self.strides or any(not is_power_of_two(s) for s in self.strides):
            raise ModelCardError(f"step model strides must be powers of two, got {self.strides}")
        pos = 0
        for seg in self.segments:
            if seg.offset != pos:
                raise ModelCardError(f"state segment {seg.name} at offset {seg.offset}, expected {pos}")
            pos += seg.size

    @property
    def state_size(self) -> int:
        return int(sum(seg.size for seg in self.segments))

    @property
    def max_stride(self) -> int:
        return max(self.strides)

    @property
    def states(self) -> tuple[StateTensor, ...]:
        return (
            StateTensor(STATE_INPUT, STATE_OUTPUT, (self.state_size,), "float32"),
            StateTensor(PHASE_INPUT, PHASE_OUTPUT, (1,), "float32"),
        )

    def slots_per_level(self) -> list[int]:
        return [max(self.chunk_steps // s, 1) for s in self.strides]

    @property
    def num_slots(self) -> int:
        return int(sum(self.slots_per_level()))

    def slot_levels(self) -> np.ndarray:
        return np.concatenate([np.full(n, lvl) for lvl, n in enumerate(self.slots_per_level())]).astype(np.int64)

    def slot_strides(self) -> np.ndarray:
        return np.asarray(self.strides, dtype=np.float32)[self.slot_levels()]

    def slot_anchor_offsets(self) -> np.ndarray:
        """Step of each slot's anchor relative to the chunk's first step."""
        h = self.chunk_steps
        parts = [
            np.arange(1, n + 1) * s - 1 if s <= h else np.array([h - 1])
            for s, n in zip(self.strides, self.slots_per_level(), strict=True)
        ]
        return np.concatenate(parts).astype(np.float32)

    def initial_state(self) -> dict[str, np.ndarray]:
        """A fresh stream's state (per stream, no batch axis): all zeros."""
        return {t.input: np.zeros(t.shape, dtype=t.dtype) for t in self.states}

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "chunk_steps": self.chunk_steps,
            "strides": list(self.strides),
            "inputs": {"features": FEATURES_INPUT},
            "states": [
                {"input": t.input, "output": t.output, "shape": list(t.shape), "dtype": t.dtype, "init": "zeros"}
                for t in self.states
            ],
            "outputs": {"scores": SCORES_OUTPUT, "offsets": OFFSETS_OUTPUT, "valid": VALID_OUTPUT},
            "state_size": self.state_size,
            "slots": {
                "level": self.slot_levels().tolist(),
                "stride": self.slot_strides().astype(int).tolist(),
                "anchor_offset": self.slot_anchor_offsets().astype(int).tolist(),
            },
            "segments": [
                {"name": s.name, "level": s.level, "shape": list(s.shape), "offset": s.offset} for s in self.segments
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> StepLayout:
        if not isinstance(data, dict):
            raise ModelCardError("step_model must be a JSON object")
        if int(data.get("format", STEP_FORMAT)) > STEP_FORMAT:
            raise ModelCardError(f"step layout format {data['format']} is newer than this server ({STEP_FORMAT})")
        try:
            layout = cls(
                chunk_steps=int(data["chunk_steps"]),
                strides=tuple(int(s) for s in data["strides"]),
                segments=tuple(
                    StateSegment(str(s["name"]), int(s["level"]), tuple(int(d) for d in s["shape"]), int(s["offset"]))
                    for s in data["segments"]
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelCardError(f"step_model layout is malformed: {exc!r}") from exc
        if int(data.get("state_size", layout.state_size)) != layout.state_size:
            raise ModelCardError(f"step_model state_size {data['state_size']} != sum of segments {layout.state_size}")
        return layout
