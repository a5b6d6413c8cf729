"""Procedural synthetic skeleton data: a seated person doing SMG's 17 micro-gesture classes.

Sequences are canonical keypoint frames (``float32[258]``, MediaPipe Holistic pose order and
normalised image coordinates, NaN for undetected hands) at 30 fps. Every instance is an
*excursion*: a limb travels from its rest pose to a class-specific target (anchored on the
moving head, neck, shoulders or hips), dwells there with a class-specific oscillation
(scratching, rubbing, strokes, fiddling fingers, bouncing knee, ...), and returns. The label
covers the whole excursion. Unlabelled distractors (small hand shifts, head nods, posture
changes), idle sway, breathing, tracking jitter and dropped hands make the task non-trivial.

The body is built in *body units* (x to image right, y down, 1 unit = shoulder width, origin at
the rest mid-shoulder point) and projected into the image with a per-sequence scale, offset and
aspect ratio. MediaPipe's "left" is the person's left, which appears on the image's right for a
person facing the camera; ``side = +1`` below is the person's left arm/leg.

Everything is driven by one ``numpy.random.Generator`` seeded from the caller's seed, so the
same seed gives the same bytes. Per-frame work is vectorised; the only Python loop runs over
instances (~1 per 3 s of video).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from service.contract.classes import NUM_CLASSES, SMG_CLASSES
from service.contract.features import HAND_LANDMARKS, KEYPOINT_DIM, POSE_LANDMARKS

GENERATOR_VERSION = 2
DESCRIPTION = "procedural synthetic skeleton data"

# Rank of each class in the long-tailed option (0 = most frequent). The order follows what the
# SMG literature says about its imbalance ("Moving legs" frequent, "suprasternal notch" rare);
# the exact real counts are not reproduced.
_TAIL_ORDER = (5, 8, 11, 17, 3, 12, 2, 16, 10, 13, 6, 14, 9, 1, 15, 7, 4)

# Class-specific duration multipliers (held postures last longer than touches).
_DURATION_SCALE = {
    1: 0.8,
    3: 1.5,
    4: 0.8,
    5: 1.2,
    6: 0.9,
    7: 1.4,
    9: 1.3,
    10: 1.4,
    12: 0.9,
    14: 1.3,
    15: 0.85,
}

SIDES = (1, -1)  # index 0 = person's left (image right), index 1 = person's right


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator; per-sequence variation is drawn from the seed within these ranges."""

    fps: float = 30.0
    long_tail: bool = False
    tail_exponent: float = 1.2  # class weight ~ (rank + 1) ** -exponent when long_tail
    class_weights: tuple[float, ...] | None = None  # explicit 17 weights override both options
    duration_median_frames: float = 45.0  # SMG: mean 51.3 frames per instance
    duration_sigma: float = 0.45  # lognormal spread
    min_duration_frames: int = 20
    max_duration_frames: int = 200
    mean_gap_frames: float = 45.0  # idle time between instances (exponential)
    min_gap_frames: int = 6
    overlap_prob: float = 0.1  # chance that the next instance may start while this one runs
    distractor_prob: float = 0.2  # chance that an event is an unlabelled fidget
    jitter: float = 0.0025  # tracking noise (std, normalised image units)
    hand_drops_per_minute: float = 2.0  # random whole-hand detection losses, per hand
    aspect_ratio: float = 16 / 9  # image width / height
    scale_range: tuple[float, float] = (0.085, 0.14)  # shoulder width in normalised x units
    speed_range: tuple[float, float] = (0.8, 1.25)
    amplitude_range: tuple[float, float] = (0.7, 1.3)
    left_handed_prob: float = 0.15

    def weights(self) -> np.ndarray:
        """Normalised class-frequency weights, index 0 = class 1."""
        if self.class_weights is not None:
            w = np.asarray(self.class_weights, dtype=np.float64)
            if w.shape != (NUM_CLASSES,) or (w < 0).any() or w.sum() <= 0:
                raise ValueError(
                    f"class_weights must be {NUM_CLASSES} non-negative numbers with a positive sum"
                )
        elif self.long_tail:
            w = np.empty(NUM_CLASSES)
            for rank, cls in enumerate(_TAIL_ORDER):
                w[cls - 1] = (rank + 1.0) ** -self.tail_exponent
        else:
            w = np.ones(NUM_CLASSES)
        return w / w.sum()

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- body template

# Rest positions in body units (x right on the image, y down). None = computed per frame.
_FACE = np.array(
    [
        (0.0, -0.62),  # 0 nose
        (0.07, -0.70), (0.11, -0.71), (0.15, -0.70),  # 1-3 left eye inner / eye / outer
        (-0.07, -0.70), (-0.11, -0.71), (-0.15, -0.70),  # 4-6 right eye
        (0.24, -0.64), (-0.24, -0.64),  # 7-8 ears
        (0.06, -0.53), (-0.06, -0.53),  # 9-10 mouth left / right
    ]
)  # fmt: skip
_NOSE_REST = _FACE[0]
_HIP = np.array([(0.30, 1.35), (-0.30, 1.35)])
_KNEE = np.array([(0.40, 1.62), (-0.40, 1.62)])
_ANKLE = np.array([(0.38, 2.55), (-0.38, 2.55)])
_HEEL_FROM_ANKLE = np.array([(-0.02, 0.08), (0.02, 0.08)])
_TOE_FROM_ANKLE = np.array([(0.03, 0.15), (-0.03, 0.15)])
# Pose z (MediaPipe: depth relative to the hips, negative = towards the camera), body units.
_POSE_Z = np.array(
    [-0.9] + [-0.85] * 6 + [-0.55, -0.55] + [-0.8, -0.8] + [-0.3, -0.3] + [0.0] * 10 + [0.0, 0.0]
    + [-0.9, -0.9, -0.6, -0.6, -0.55, -0.55, -0.75, -0.75]
)  # fmt: skip
_POSE_VIS = np.array([0.99] * 11 + [0.99, 0.99, 0.97, 0.97, 0.95, 0.95] + [0.9] * 6 + [0.92, 0.92]
                     + [0.8, 0.8, 0.6, 0.6, 0.5, 0.5, 0.5, 0.5])  # fmt: skip

# Hand template: (u along the fingers, v across the palm) for 21 MediaPipe hand landmarks,
# open hand, 1 unit = 1 shoulder width x 0.7.
_HAND_UV = np.array(
    [
        (0.0, 0.0),
        (0.08, 0.10), (0.16, 0.18), (0.23, 0.23), (0.29, 0.27),  # thumb
        (0.36, 0.10), (0.50, 0.11), (0.58, 0.12), (0.65, 0.12),  # index
        (0.37, 0.03), (0.53, 0.03), (0.62, 0.03), (0.70, 0.03),  # middle
        (0.35, -0.04), (0.49, -0.05), (0.57, -0.055), (0.63, -0.06),  # ring
        (0.31, -0.10), (0.42, -0.12), (0.48, -0.13), (0.53, -0.14),  # pinky
    ]
) * 0.7  # fmt: skip
_FINGER_OF = np.array([0] + [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4)
_BASE_OF = np.array([0, 1, 1, 1, 1, 5, 5, 5, 5, 9, 9, 9, 9, 13, 13, 13, 13, 17, 17, 17, 17])
_CURL_GAIN = np.array([0.0] + [0.4] * 4 + [0.75] * 16)
_HAND_Z = np.linspace(0.0, -0.08, 21)


# ----------------------------------------------------------------------------- instances


@dataclass
class ArmAction:
    """A wrist excursion: target = anchor(t) + offset, with hand direction, curl and oscillation."""

    side: int
    anchor: str  # "head", "neck", "hip", "sh" (same-side shoulder), "osh" (opposite shoulder)
    offset: tuple[float, float]  # already mirrored for the side
    direction: tuple[float, float]  # finger direction (image plane), already mirrored
    elbow: tuple[float, float]  # elbow offset from the same-side shoulder, already mirrored
    curl: float = 0.2
    fore: float = 0.9  # hand foreshortening along the fingers
    z: float = -0.4
    osc_dir: tuple[float, float] = (0.0, 0.0)
    osc_amp: float = 0.0
    osc_freq: float = 0.0
    osc_phase: float = 0.0
    finger_amp: float = 0.0  # per-finger curl oscillation (fiddling)
    finger_freq: float = 0.0
    waypoints: np.ndarray | None = None  # (K, 2) offsets visited during the dwell
    hide_hand: bool = False  # hand undetected while at the target
    wrist_vis: float = 0.95


@dataclass
class TorsoAction:
    shrug: float = 0.0  # shoulders rise (body units)
    head_drop: float = 0.0  # head sinks
    nod_amp: float = 0.0
    nod_freq: float = 0.0


@dataclass
class LegAction:
    kind: str  # "bounce", "sway", "cross"
    sides: tuple[int, ...]
    amp: float = 0.0
    freq: float = 0.0


@dataclass
class Instance:
    label: int  # 0 = unlabelled distractor
    start: int
    end: int
    resources: tuple[str, ...]
    arms: list[ArmAction] = field(default_factory=list)
    torso: TorsoAction | None = None
    legs: LegAction | None = None


@dataclass(frozen=True)
class _SeqParams:
    scale: float
    cx: float
    cy: float
    speed: float
    amplitude: float
    dominant: int  # side sign of the dominant hand
    hand_size: float
    rest_style: int


def _unit(v: tuple[float, float]) -> tuple[float, float]:
    n = float(np.hypot(*v)) or 1.0
    return (v[0] / n, v[1] / n)


def _arm(side: int, anchor: str, off, direction, elbow, **kw) -> ArmAction:
    """Build an ArmAction from left-arm-style numbers; x components are mirrored by ``side``."""
    return ArmAction(
        side=side,
        anchor=anchor,
        offset=(side * off[0], off[1]),
        direction=_unit((side * direction[0], direction[1])),
        elbow=(side * elbow[0], elbow[1]),
        **kw,
    )


def _pick(rng: np.random.Generator, options: list) -> object:
    return options[int(rng.integers(len(options)))]


def _plan(
    label: int, rng: np.random.Generator, p: _SeqParams
) -> tuple[tuple[str, ...], list, object, object]:
    """Targets of one instance of ``label``: (resources, arm actions, torso action, leg action)."""
    amp = p.amplitude
    f = p.speed
    one = p.dominant if rng.random() < 0.75 else -p.dominant

    def jit(scale: float = 0.04) -> np.ndarray:
        return rng.normal(0.0, scale * amp, 2)

    def single(side: int, anchor: str, off, direction, elbow, **kw) -> ArmAction:
        off = np.asarray(off, dtype=float) + jit()
        return _arm(side, anchor, off, direction, elbow, **kw)

    def scratch(freq=4.5, amp_=0.03) -> dict:
        return dict(osc_dir=_unit(tuple(rng.normal(0, 1, 2))), osc_amp=amp_ * amp, osc_freq=freq * f)

    arm_res = {1: "L", -1: "R"}
    both = ("L", "R")

    if label == 1:  # turtling: shoulders rise, head drops
        t = TorsoAction(shrug=rng.uniform(0.10, 0.2) * amp, head_drop=rng.uniform(0.06, 0.14) * amp)
        return ("torso",), [], t, None
    if label == 2:  # rubbing eyes / forehead
        if rng.random() < 0.6:
            a = single(
                one,
                "head",
                (0.10, 0.30),
                (-0.35, -1),
                (-0.55, 0.6),
                curl=0.2,
                z=-0.5,
                osc_dir=(1.0, 0.0),
                osc_amp=0.05 * amp,
                osc_freq=rng.uniform(2.0, 3.0) * f,
            )
        else:
            a = single(
                one,
                "head",
                (0.10, 0.05),
                (-1, -0.9),
                (-0.5, 0.55),
                curl=0.15,
                z=-0.5,
                osc_dir=(1.0, 0.0),
                osc_amp=0.06 * amp,
                osc_freq=rng.uniform(1.5, 2.5) * f,
            )
        return (arm_res[one],), [a], None, None
    if label == 3:  # folding arms: wrists tucked at the opposite elbows
        hide = bool(rng.random() < 0.6)
        dy = rng.uniform(-0.06, 0.06)
        arms = [
            single(
                s,
                "neck",
                (-0.42, 0.72 + s * dy),
                (-1, -0.15),
                (-0.48, 0.78),
                curl=0.4,
                z=-0.3,
                hide_hand=hide and rng.random() < 0.8,
                osc_dir=(0, 1),
                osc_amp=0.006,
                osc_freq=0.6,
            )
            for s in SIDES
        ]
        return both, arms, None, None
    if label == 4:  # touching / covering the suprasternal notch
        curl = 0.15 if rng.random() < 0.6 else 0.55
        a = single(
            one,
            "neck",
            (0.12, 0.38),
            (-0.3, -1),
            (-0.05, 0.75),
            curl=curl,
            z=-0.35,
            osc_dir=(0, 1),
            osc_amp=0.012 * amp,
            osc_freq=2.0 * f,
        )
        return (arm_res[one],), [a], None, None
    if label == 5:  # moving legs: bouncing knee(s) or knees opening and closing
        if rng.random() < 0.7:
            sides = SIDES if rng.random() < 0.4 else (int(_pick(rng, list(SIDES))),)
            legs = LegAction(
                "bounce", sides, amp=rng.uniform(0.12, 0.22) * amp, freq=rng.uniform(2.5, 4.5) * f
            )
        else:
            # Knee travel of a few centimetres (shoulder width ~ 40 cm): well above tracking jitter.
            legs = LegAction("sway", SIDES, amp=rng.uniform(0.15, 0.3) * amp, freq=rng.uniform(1.5, 2.5) * f)
        return ("legs",), [], None, legs
    if label == 6:  # touching / scratching the neck
        if rng.random() < 0.6:
            a = single(
                one, "neck", (0.40, -0.15), (-1, -0.4), (0.3, 0.35), curl=0.45, z=-0.2, **scratch(4.0, 0.035)
            )
        else:
            a = single(
                one,
                "neck",
                (0.30, -0.30),
                (-1, -0.2),
                (0.35, 0.3),
                curl=0.45,
                fore=0.6,
                z=0.0,
                **scratch(4.0, 0.03),
            )
        return (arm_res[one],), [a], None, None
    if label == 7:  # folding arms behind the body: hands disappear, elbows out
        arms = [
            single(
                s,
                "hip",
                (0.12, -0.05),
                (-1, 0.3),
                (0.32, 0.72),
                curl=0.4,
                z=0.35,
                hide_hand=True,
                wrist_vis=0.2,
            )
            for s in SIDES
        ]
        return both, arms, None, None
    if label == 8:  # rubbing hands / crossing fingers
        rub = rng.random() < 0.65
        fr = rng.uniform(1.8, 2.8) * f
        arms = [
            single(
                s,
                "hip",
                (0.13 if rub else 0.08, -0.35),
                (-0.8, -0.6),
                (0.15, 0.9),
                curl=0.25 if rub else 0.6,
                z=-0.45,
                osc_dir=(0, 1),
                osc_amp=(0.05 if rub else 0.01) * amp,
                osc_freq=fr,
                osc_phase=0.0 if s == 1 else np.pi,
                finger_amp=0.0 if rub else 0.15,
                finger_freq=2.0 * f,
            )
            for s in SIDES
        ]
        return both, arms, None, None
    if label == 9:  # arms akimbo (sometimes one-sided)
        sides = SIDES if rng.random() < 0.7 else (one,)
        arms = [
            single(s, "hip", (0.48, -0.12), (-0.7, 0.7), (0.55, 0.55), curl=0.3, fore=0.7, z=-0.1)
            for s in sides
        ]
        return tuple(arm_res[s] for s in sides), arms, None, None
    if label == 10:  # crossing legs
        legs = LegAction(
            "cross",
            (int(_pick(rng, list(SIDES))),),
            amp=rng.uniform(0.02, 0.04) * amp,
            freq=rng.uniform(0.7, 1.3) * f,
        )
        return ("legs",), [], None, legs
    if label == 11:  # scratching some part of the body
        kind = int(rng.integers(4))
        if kind == 0:  # opposite upper arm
            a = single(one, "osh", (0.15, 0.45), (-1, -0.3), (-0.15, 0.7), curl=0.55, z=-0.3, **scratch(5.0))
        elif kind == 1:  # chest
            a = single(one, "neck", (0.15, 0.75), (-0.5, -1), (0.0, 0.8), curl=0.55, z=-0.35, **scratch(5.0))
        elif kind == 2:  # thigh
            a = single(
                one, "hip", (0.25, 0.15), (-0.2, 1), (0.05, 0.95), curl=0.55, fore=0.6, z=-0.6, **scratch(5.0)
            )
        else:  # side / ribs
            a = single(one, "sh", (0.05, 0.95), (0.0, 1), (0.25, 0.7), curl=0.55, z=0.0, **scratch(5.0))
        return (arm_res[one],), [a], None, None
    if label == 12:  # scratching / touching facial parts other than the eyes
        kind = int(rng.integers(4))
        target = [
            ((0.30, 0.35), (-0.45, -1), 0.3),
            ((0.12, 0.45), (-1, -0.8), 0.6),
            ((0.06, 0.32), (-0.15, -1), 0.6),
            ((0.10, 0.40), (-0.6, -1), 0.4),
        ][kind]
        osc = scratch(4.5, 0.02) if rng.random() < 0.5 else scratch(1.0, 0.005)
        a = single(one, "head", target[0], target[1], (-0.55, 0.65), curl=target[2], z=-0.55, **osc)
        return (arm_res[one],), [a], None, None
    if label == 13:  # playing with / adjusting hair: hand above or beside the head, elbow high
        if rng.random() < 0.6:
            a = single(
                one,
                "head",
                (0.30, -0.35),
                (-0.6, -1),
                (0.45, -0.15),
                curl=0.35,
                z=-0.2,
                osc_dir=_unit((0.3 * one, -1)),
                osc_amp=0.08 * amp,
                osc_freq=rng.uniform(0.8, 1.5) * f,
            )
        else:
            a = single(
                one,
                "head",
                (0.35, -0.05),
                (0.1, -1),
                (0.55, 0.0),
                curl=0.35,
                z=-0.2,
                osc_dir=(0, 1),
                osc_amp=0.07 * amp,
                osc_freq=rng.uniform(0.8, 1.5) * f,
            )
        return (arm_res[one],), [a], None, None
    if label == 14:  # holding arms
        if rng.random() < 0.65:  # one hand holds the other, hanging, arm
            o = -one
            holder = single(one, "neck", (-0.55, 0.85), (-1, 0.3), (-0.6, 0.85), curl=0.6, z=-0.3)
            held = single(o, "neck", (0.62, 1.45), (0, 1), (0.1, 0.85), curl=0.6, z=-0.1)
            return both, [holder, held], None, None
        arms = [single(s, "neck", (-0.52, 0.45), (-1, -0.5), (-0.65, 0.75), curl=0.55, z=-0.3) for s in SIDES]
        return both, arms, None, None
    if label == 15:  # pulling the shirt collar (pinch and tug)
        sides = (one,) if rng.random() < 0.75 else SIDES
        arms = [
            single(
                s,
                "neck",
                (0.24, 0.30),
                (-0.15, -1),
                (-0.02, 0.75),
                curl=0.75,
                z=-0.35,
                osc_dir=_unit((0.3 * s, 1)),
                osc_amp=0.05 * amp,
                osc_freq=rng.uniform(1.0, 1.6) * f,
            )
            for s in sides
        ]
        return tuple(arm_res[s] for s in sides), arms, None, None
    if label == 16:  # playing with jewelry / manipulating objects: fiddling fingers
        ff = rng.uniform(3.0, 5.0) * f
        if rng.random() < 0.6:
            arms = [
                single(
                    s,
                    "hip",
                    (0.15, -0.15),
                    (-0.6, 0.4),
                    (0.12, 0.92),
                    curl=0.5,
                    z=-0.5,
                    osc_dir=(1, 0),
                    osc_amp=0.015 * amp,
                    osc_freq=2.0 * f,
                    finger_amp=0.35,
                    finger_freq=ff,
                )
                for s in SIDES
            ]
            return both, arms, None, None
        a = single(
            one,
            "neck",
            (0.08, 0.45),
            (-0.2, -1),
            (-0.1, 0.8),
            curl=0.5,
            z=-0.4,
            finger_amp=0.35,
            finger_freq=ff,
        )
        return (arm_res[one],), [a], None, None
    if label == 17:  # illustrative hand gestures (non-MG): open hands through waypoints
        sides = (one,) if rng.random() < 0.5 else SIDES
        k = int(rng.integers(2, 6))
        arms = []
        for s in sides:
            wp = np.stack([rng.uniform(-0.35, 0.35, k), rng.uniform(-0.35, 0.25, k)], axis=1) * amp
            arms.append(
                single(
                    s, "neck", (0.45, 0.85), (-0.2, -1), (0.25, 0.8), curl=0.1, fore=0.8, z=-0.5, waypoints=wp
                )
            )
        return tuple(arm_res[s] for s in sides), arms, None, None
    raise ValueError(f"unknown class {label}")


def _plan_distractor(rng: np.random.Generator, p: _SeqParams) -> tuple[tuple[str, ...], list, object, object]:
    """An unlabelled fidget: a small hand shift on the lap, or a head nod."""
    if rng.random() < 0.7:
        side = int(_pick(rng, list(SIDES)))
        off = (0.35 + rng.uniform(-0.2, 0.2), rng.uniform(-0.25, 0.05))
        a = _arm(side, "hip", off, (-0.6, 0.8), (0.12, 0.92), curl=rng.uniform(0.2, 0.6), fore=0.7, z=-0.5)
        return ({1: "L", -1: "R"}[side],), [a], None, None
    t = TorsoAction(nod_amp=rng.uniform(0.03, 0.06), nod_freq=rng.uniform(1.0, 2.0) * p.speed)
    return ("torso",), [], t, None


def _schedule(rng: np.random.Generator, num_frames: int, cfg: SynthConfig, p: _SeqParams) -> list[Instance]:
    weights = cfg.weights()
    busy = {"L": 0, "R": 0, "torso": 0, "legs": 0}
    margin = 8
    t = int(rng.integers(margin, margin + 40))
    out: list[Instance] = []
    while t < num_frames - margin - cfg.min_duration_frames:
        if rng.random() < cfg.distractor_prob:
            label = 0
            res, arms, torso, legs = _plan_distractor(rng, p)
            dur = int(rng.integers(15, 45))
        else:
            label = int(rng.choice(NUM_CLASSES, p=weights)) + 1
            res, arms, torso, legs = _plan(label, rng, p)
            raw = cfg.duration_median_frames * np.exp(rng.normal(0.0, cfg.duration_sigma))
            raw *= _DURATION_SCALE.get(label, 1.0) / p.speed
            dur = int(np.clip(round(raw), cfg.min_duration_frames, cfg.max_duration_frames))
        start = max([t] + [busy[r] for r in res])
        if start + dur > num_frames - margin:
            break
        out.append(Instance(label, start, start + dur, res, arms, torso, legs))
        for r in res:
            busy[r] = start + dur + cfg.min_gap_frames
        if rng.random() < cfg.overlap_prob:
            t = start + int(dur * rng.uniform(0.2, 0.7))
        else:
            t = start + dur + cfg.min_gap_frames + int(rng.exponential(cfg.mean_gap_frames))
    return out


# ----------------------------------------------------------------------------- rendering


def _envelope(n: int, rng: np.random.Generator) -> np.ndarray:
    """0 -> 1 (travel) -> 1 (dwell) -> 0 (return), smooth, over ``n`` frames."""
    t_in = int(np.clip(n * rng.uniform(0.18, 0.3), 4, 40))
    t_out = int(np.clip(n * rng.uniform(0.18, 0.3), 4, 40))
    x = np.ones(n)
    ramp_in = (np.arange(t_in) + 1) / (t_in + 1)
    ramp_out = (np.arange(t_out)[::-1] + 1) / (t_out + 1)
    x[:t_in] = ramp_in
    x[n - t_out :] = np.minimum(x[n - t_out :], ramp_out)
    return x * x * (3 - 2 * x)  # smoothstep


def _smooth_noise(rng: np.random.Generator, n: int, dims: int, width: int, std: float) -> np.ndarray:
    """Low-pass Gaussian noise of roughly ``std``: white noise box-filtered twice."""
    width = max(1, min(width, n))
    raw = rng.normal(0.0, 1.0, (n + 2 * width, dims))
    kernel = np.ones(width) / width
    for _ in range(2):
        raw = np.stack([np.convolve(raw[:, d], kernel, mode="same") for d in range(dims)], axis=1)
    raw = raw[width : width + n]
    return raw / (raw.std() + 1e-9) * std


def _seq_params(rng: np.random.Generator, cfg: SynthConfig) -> _SeqParams:
    return _SeqParams(
        scale=rng.uniform(*cfg.scale_range),
        cx=rng.uniform(0.38, 0.62),
        cy=rng.uniform(0.24, 0.34),
        speed=rng.uniform(*cfg.speed_range),
        amplitude=rng.uniform(*cfg.amplitude_range),
        dominant=1 if rng.random() < cfg.left_handed_prob else -1,
        hand_size=rng.uniform(0.9, 1.1),
        rest_style=int(rng.integers(3)),
    )


# Rest poses per style: (wrist offset from mid-hip, finger direction, elbow offset from shoulder,
# curl, foreshortening), left-arm numbers, mirrored per side.
_REST_STYLES = (
    ((0.35, 0.10), (-0.85, 0.5), (0.12, 0.92), 0.3, 0.7),  # hands on the lap
    ((0.85, -0.10), (0.0, 1.0), (0.25, 0.95), 0.4, 0.6),  # forearms on armrests
    ((0.12, 0.05), (-0.95, 0.3), (0.05, 0.95), 0.55, 0.7),  # hands clasped in the lap
)


def generate_sequence(
    seed: int, num_frames: int, config: SynthConfig | None = None
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """One synthetic sequence: keypoints (num_frames, 258) float32 and (label, start, end) annotations.

    Frames are 0-based; ``end`` is exclusive (the instance covers frames ``start .. end - 1``).
    Labels are SMG's 1-based class ids.
    """
    cfg = config or SynthConfig()
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    rng = np.random.default_rng(seed)
    p = _seq_params(rng, cfg)
    n = num_frames
    fps = cfg.fps
    tsec = np.arange(n) / fps
    instances = _schedule(rng, n, cfg, p)

    # --- torso: sway, breathing, turtling, nods
    lean = _smooth_noise(rng, n, 2, int(fps * 2), 0.03) * np.array([1.0, 0.3])
    breath = 0.012 * np.sin(2 * np.pi * rng.uniform(0.2, 0.3) * tsec + rng.uniform(0, 2 * np.pi))
    shrug = breath.copy()
    head = np.tile(_NOSE_REST, (n, 1)) + lean * 1.2 + _smooth_noise(rng, n, 2, int(fps), 0.015)
    for inst in instances:
        if inst.torso is None:
            continue
        sl = slice(inst.start, inst.end)
        a = _envelope(inst.end - inst.start, rng)
        tt = tsec[sl] - tsec[inst.start]
        shrug[sl] += a * inst.torso.shrug
        head[sl, 1] += a * (inst.torso.head_drop - inst.torso.shrug * 0.2)
        head[sl, 1] += a * inst.torso.nod_amp * np.sin(2 * np.pi * inst.torso.nod_freq * tt)

    shoulders = np.empty((n, 2, 2))
    for i, s in enumerate(SIDES):
        shoulders[:, i, 0] = s * 0.5 + lean[:, 0]
        shoulders[:, i, 1] = -shrug + lean[:, 1]
    neck = shoulders.mean(axis=1)
    hip_c = np.tile(_HIP.mean(axis=0), (n, 1)) + lean * 0.15
    anchors = {"head": head, "neck": neck, "hip": hip_c}

    # --- arms: rest pose (with posture changes and drift), then gesture excursions
    style = np.full(n, p.rest_style)
    for _ in range(int(rng.poisson(n / fps / 60.0 * 1.5))):
        style[int(rng.integers(n)) :] = int(rng.integers(3))
    onehot = np.eye(3)[style]
    k = np.ones(15) / 15
    onehot = np.stack([np.convolve(np.pad(onehot[:, j], 7, mode="edge"), k, "valid") for j in range(3)], 1)
    wrist = np.empty((n, 2, 2))
    elbow = np.empty((n, 2, 2))
    hdir = np.empty((n, 2, 2))
    curl = np.empty((n, 2, 5))
    fore = np.empty((n, 2))
    wz = np.full((n, 2), -0.45)
    wvis = np.full((n, 2), 0.95)
    hidden = np.zeros((n, 2), dtype=bool)
    for i, s in enumerate(SIDES):
        styles = np.array(
            [[s * w[0], w[1], s * d[0], d[1], s * e[0], e[1], c, fo] for w, d, e, c, fo in _REST_STYLES]
        )
        rest = onehot @ styles  # (n, 8)
        drift = _smooth_noise(rng, n, 2, int(fps * 3), 0.03)
        wrist[:, i] = hip_c + rest[:, 0:2] + drift
        hdir[:, i] = rest[:, 2:4]
        elbow[:, i] = shoulders[:, i] + rest[:, 4:6] + drift * 0.3
        curl[:, i] = rest[:, 6:7] + _smooth_noise(rng, n, 5, int(fps), 0.05)
        fore[:, i] = rest[:, 7]

    for inst in instances:
        for arm in inst.arms:
            i = SIDES.index(arm.side)
            sl = slice(inst.start, inst.end)
            m = inst.end - inst.start
            a = _envelope(m, rng)[:, None]
            a2 = a * a
            tt = tsec[sl] - tsec[inst.start]
            anchor = (
                shoulders[sl, 1 - i]
                if arm.anchor == "osh"
                else (shoulders[sl, i] if arm.anchor == "sh" else anchors[arm.anchor][sl])
            )
            target = anchor + np.asarray(arm.offset)
            target = target + a2 * np.outer(
                np.sin(2 * np.pi * arm.osc_freq * tt + arm.osc_phase) * arm.osc_amp, arm.osc_dir
            )
            el_target = shoulders[sl, i] + np.asarray(arm.elbow)
            direction = np.broadcast_to(np.asarray(arm.direction), (m, 2)).copy()
            if arm.waypoints is not None:
                knots = np.linspace(0.0, 1.0, len(arm.waypoints) + 2)
                path_t = np.linspace(0.0, 1.0, m)
                pts = np.vstack([[0.0, 0.0], arm.waypoints, [0.0, 0.0]])
                wp = np.stack([np.interp(path_t, knots, pts[:, d]) for d in range(2)], axis=1)
                target = target + wp
                el_target = el_target + 0.5 * wp
                direction = direction + 0.8 * wp[:, ::-1] * np.array([1.0, -1.0])
            wrist[sl, i] = (1 - a) * wrist[sl, i] + a * target
            elbow[sl, i] = (1 - a) * elbow[sl, i] + a * el_target
            hdir[sl, i] = (1 - a) * hdir[sl, i] + a * direction
            c = arm.curl + a2 * arm.finger_amp * np.sin(
                2 * np.pi * arm.finger_freq * tt[:, None] + rng.uniform(0, 2 * np.pi, 5)
            )
            curl[sl, i] = (1 - a) * curl[sl, i] + a * c
            fore[sl, i] = (1 - a[:, 0]) * fore[sl, i] + a[:, 0] * arm.fore
            wz[sl, i] = (1 - a[:, 0]) * wz[sl, i] + a[:, 0] * arm.z
            wvis[sl, i] = (1 - a[:, 0]) * wvis[sl, i] + a[:, 0] * arm.wrist_vis
            if arm.hide_hand:
                hidden[sl, i] |= a[:, 0] > 0.5

    # --- legs
    knee = np.tile(_KNEE, (n, 1, 1)).astype(float)
    ankle = np.tile(_ANKLE, (n, 1, 1)).astype(float)
    leg_vis = np.ones((n, 2))
    for inst in instances:
        if inst.legs is None:
            continue
        lg = inst.legs
        sl = slice(inst.start, inst.end)
        a = _envelope(inst.end - inst.start, rng)
        tt = tsec[sl] - tsec[inst.start]
        wave = np.sin(2 * np.pi * lg.freq * tt)
        for s in lg.sides:
            i = SIDES.index(s)
            if lg.kind == "bounce":
                lift = a * lg.amp * 0.5 * (1 - np.cos(2 * np.pi * lg.freq * tt))
                knee[sl, i, 1] -= lift
                ankle[sl, i, 1] -= 0.6 * lift
            elif lg.kind == "sway":
                knee[sl, i, 0] += a * s * lg.amp * wave
                ankle[sl, i, 0] += a * s * 0.3 * lg.amp * wave
            else:  # cross: this knee goes over the other one, the foot lifts and swings
                knee_t = np.array([-s * 0.05, 1.45])
                ankle_t = np.array([-s * 0.25, 2.05])
                knee[sl, i] += a[:, None] * (knee_t - knee[sl, i])
                ankle[sl, i] += a[:, None] * (ankle_t - ankle[sl, i])
                ankle[sl, i, 0] += a * a * lg.amp * wave
                leg_vis[sl, 1 - i] -= 0.5 * a

    # --- hands from wrist, direction, curl, foreshortening
    hdir /= np.linalg.norm(hdir, axis=-1, keepdims=True) + 1e-9
    perp = np.stack([-hdir[..., 1], hdir[..., 0]], axis=-1)
    thumb_side = np.array([1.0, -1.0])[None, :, None]
    uv = np.broadcast_to(_HAND_UV, (n, 2, 21, 2))
    base = _HAND_UV[_BASE_OF]
    c_lm = curl[:, :, _FINGER_OF]  # (n, 2, 21)
    shrink = 1.0 - _CURL_GAIN * np.clip(c_lm, 0.0, 1.0)
    uv = base + (uv - base) * shrink[..., None]
    hs = p.hand_size
    u = uv[..., 0] * fore[:, :, None] * hs
    v = uv[..., 1] * hs * thumb_side
    hand_xy = wrist[:, :, None, :] + u[..., None] * hdir[:, :, None, :] + v[..., None] * perp[:, :, None, :]

    # --- assemble pose (body units)
    pose = np.empty((n, POSE_LANDMARKS, 2))
    pose[:, 0:11] = _FACE[None] - _NOSE_REST + head[:, None, :]
    pose[:, 11] = shoulders[:, 0]
    pose[:, 12] = shoulders[:, 1]
    pose[:, 13], pose[:, 14] = elbow[:, 0], elbow[:, 1]
    pose[:, 15], pose[:, 16] = wrist[:, 0], wrist[:, 1]
    for i in range(2):
        pose[:, 17 + i] = hand_xy[:, i, 18]  # pinky knuckle
        pose[:, 19 + i] = hand_xy[:, i, 6]  # index
        pose[:, 21 + i] = hand_xy[:, i, 3]  # thumb
    pose[:, 23:25] = _HIP + lean[:, None, :] * 0.15
    pose[:, 25:27] = knee
    pose[:, 27:29] = ankle
    pose[:, 29:31] = ankle + _HEEL_FROM_ANKLE
    pose[:, 31:33] = ankle + _TOE_FROM_ANKLE
    pz = np.tile(_POSE_Z, (n, 1))
    pz[:, 15:17] = wz
    vis = np.tile(_POSE_VIS, (n, 1)) + rng.uniform(-0.04, 0.01, (n, POSE_LANDMARKS))
    vis[:, 15:17] *= wvis / 0.95
    vis[:, 25:33] *= np.tile(leg_vis, (1, 4))  # knees, ankles, heels, toes: left/right interleaved

    # --- project into the image and add tracking jitter
    sx, sy = p.scale, p.scale * cfg.aspect_ratio
    out = np.empty((n, KEYPOINT_DIM), dtype=np.float64)
    pose_block = np.empty((n, POSE_LANDMARKS, 4))
    pose_block[..., 0] = p.cx + sx * pose[..., 0] + rng.normal(0, cfg.jitter, (n, POSE_LANDMARKS))
    pose_block[..., 1] = p.cy + sy * pose[..., 1] + rng.normal(0, cfg.jitter, (n, POSE_LANDMARKS))
    pose_block[..., 2] = sx * pz + rng.normal(0, cfg.jitter * 3, (n, POSE_LANDMARKS))
    pose_block[..., 3] = np.clip(vis, 0.0, 1.0)
    out[:, : POSE_LANDMARKS * 4] = pose_block.reshape(n, -1)
    hand_jit = rng.normal(0, cfg.jitter, (n, 2, 1, 2)) + rng.normal(0, cfg.jitter * 0.4, (n, 2, 21, 2))
    hands = np.empty((n, 2, HAND_LANDMARKS, 3))
    hands[..., 0] = p.cx + sx * hand_xy[..., 0] + hand_jit[..., 0]
    hands[..., 1] = p.cy + sy * hand_xy[..., 1] + hand_jit[..., 1]
    hands[..., 2] = sx * (_HAND_Z[None, None, :] * (2 - fore[:, :, None])) + rng.normal(
        0, cfg.jitter, (n, 2, 21)
    )

    # --- dropped hands: random detection losses plus hands hidden by the gesture
    for i in range(2):
        for _ in range(int(rng.poisson(cfg.hand_drops_per_minute * n / fps / 60.0))):
            s0 = int(rng.integers(n))
            hidden[s0 : s0 + int(rng.integers(4, 60)), i] = True
    hands[hidden] = np.nan
    out[:, POSE_LANDMARKS * 4 :] = hands.reshape(n, -1)

    annotations = [(inst.label, inst.start, inst.end) for inst in instances if inst.label > 0]
    annotations.sort(key=lambda r: (r[1], r[2], r[0]))
    return out.astype(np.float32), annotations


# ----------------------------------------------------------------------------- dataset writer


def sample_name(index: int) -> str:
    """SMG's sample naming: ``Sample0001`` ..."""
    return f"Sample{index:04d}"


def split_counts(num_sequences: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Sizes of train/val/test; every split with a positive fraction gets at least one sequence if it can."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers, got {fractions}")
    total = float(sum(fractions))
    n_val = int(round(num_sequences * fractions[1] / total))
    n_test = int(round(num_sequences * fractions[2] / total))
    if fractions[1] > 0 and n_val == 0 and num_sequences >= 3:
        n_val = 1
    if fractions[2] > 0 and n_test == 0 and num_sequences >= 3:
        n_test = 1
    n_train = num_sequences - n_val - n_test
    if n_train < 1 and fractions[0] > 0:
        raise ValueError(f"{num_sequences} sequences are too few for splits {fractions}")
    return n_train, n_val, n_test


def write_dataset(
    root: str | Path,
    num_sequences: int,
    seed: int,
    frames_per_sequence: int,
    long_tail: bool = False,
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    config: SynthConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write ``num_sequences`` sequences in SMG's layout under ``root``; return the dataset description.

    ``root/SampleXXXX/SampleXXXX_finelabels.csv`` (``label,start_frame,end_frame``, no header),
    ``root/SampleXXXX/SampleXXXX_keypoints.npy`` (T, 258) float32, ``root/splits.json`` and
    ``root/dataset.json``. Sequence ``i`` is generated from ``(seed, i)``, so the output is
    byte-identical for the same arguments. ``progress`` is called with 1 after each sequence.
    """
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be positive, got {num_sequences}")
    cfg = config or SynthConfig()
    if cfg.long_tail != long_tail:
        cfg = SynthConfig(**{**cfg.to_dict(), "long_tail": long_tail})
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n_train, n_val, _ = split_counts(num_sequences, splits)
    names = [sample_name(i + 1) for i in range(num_sequences)]
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    for i, name in enumerate(names):
        seq_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        kp, ann = generate_sequence(seq_seed, frames_per_sequence, cfg)
        folder = root / name
        folder.mkdir(exist_ok=True)
        np.save(folder / f"{name}_keypoints.npy", kp)
        with open(folder / f"{name}_finelabels.csv", "w", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows(ann)
        for label, _, _ in ann:
            counts[label - 1] += 1
        if progress is not None:
            progress(1)
    split_map = {
        "train": names[:n_train],
        "val": names[n_train : n_train + n_val],
        "test": names[n_train + n_val :],
    }
    (root / "splits.json").write_text(json.dumps(split_map, indent=2) + "\n")
    description = {
        "description": DESCRIPTION,
        "generator": "models.synth",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_sequences": num_sequences,
        "frames_per_sequence": frames_per_sequence,
        "fps": cfg.fps,
        "keypoint_layout": "mediapipe-holistic-258",
        "frame_convention": "0-based frames, end exclusive",
        "label_base": 1,
        "config": cfg.to_dict(),
        "split_fractions": list(splits),
        "split_sizes": {k: len(v) for k, v in split_map.items()},
        "classes": list(SMG_CLASSES),
        "class_counts": {str(c + 1): int(counts[c]) for c in range(NUM_CLASSES)},
    }
    (root / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    return description
