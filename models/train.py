"""Training loop: windows sampled from long sequences, focal + DIoU, AdamW, EMA, validation selection.

Config file (YAML, see models/configs/default.yaml): top-level ``name``, ``version``, ``model``
(ModelConfig fields), ``data`` (DataConfig), ``train`` (TrainConfig), ``assign`` (AssignConfig).
Model selection and post-processing tuning use the validation split only; the test split is
never read here.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from models.assign import AssignConfig, assign
from models.augment import expand_instances
from models.datasets import DataError, Sequence, load_generic, load_smg
from models.detector import Detector, run_sequence, save_checkpoint
from models.infer import SequenceOutputs
from models.losses import DetectionLoss
from models.nn.config import ModelConfig
from models.run_eval import evaluate_outputs
from models.tune import TuneResult, best_threshold, tune_postprocess
from service.contract.classes import SMG_CLASSES
from service.contract.features import DEFAULT_SPEC, FeatureSpec
from service.contract.model_card import PostProcess


def _from_dict(cls, data: dict | None, what: str):
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} config keys: {', '.join(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class DataConfig:
    format: str = "smg"  # "smg" (SampleXXXX folders) or "generic" (ActionFormer JSON + .npy)
    root: str = "data/synth"  # smg: dataset root; generic: feature directory
    annotations: str | None = None  # generic: the JSON annotation file
    source: str = "auto"  # smg: auto | features | keypoints | kinect
    units: str = "seconds"  # generic: segment units
    frames_per_step: int = 4  # generic: backbone feature stride in frames
    frame_offset: float = 0.0  # generic: frame that step 0 stands for
    fps: float = 30.0  # generic: default fps
    train_split: str = "train"
    val_split: str = "val"
    feature_name: str | None = None  # generic: name of the backbone's feature spec (e.g. videomaev2-g)


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_iterations: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    eval_every: int = 250
    seed: int = 0
    background_fraction: float = 0.2  # share of windows drawn at random positions (not around an instance)
    aug_alpha: float | None = None  # log2 label augmentation threshold alpha; None disables it
    label_smoothing: float = 0.0
    reg_weight: float = 1.0
    threads: int = 2
    max_minutes: float | None = None  # hard wall-clock cap (the schedule still assumes `iterations`)


@dataclass
class RunConfig:
    name: str = "mgstream-detector"
    version: str = "0.1.0"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    assign: AssignConfig = field(default_factory=AssignConfig)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        data = dict(data or {})
        unknown = sorted(set(data) - {"name", "version", "model", "data", "train", "assign"})
        if unknown:
            raise ValueError(f"unknown top-level config keys: {', '.join(unknown)}")
        assign_data = dict(data.get("assign") or {})
        if assign_data.get("ranges") is not None:
            assign_data["ranges"] = tuple(tuple(r) for r in assign_data["ranges"])
        return cls(
            name=str(data.get("name", cls.name)),
            version=str(data.get("version", cls.version)),
            model=ModelConfig.from_dict(data.get("model") or {}),
            data=_from_dict(DataConfig, data.get("data"), "data"),
            train=_from_dict(TrainConfig, data.get("train"), "train"),
            assign=_from_dict(AssignConfig, assign_data, "assign"),
        )

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            return cls.from_dict(yaml.safe_load(path.read_text()) or {})
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "model": self.model.to_dict(),
            "data": asdict(self.data),
            "train": asdict(self.train),
            "assign": asdict(self.assign),
        }


# ----------------------------------------------------------------------------- data


def load_split(cfg: DataConfig, split: str, feature_dim: int) -> list[Sequence]:
    """Load one split; feature dims are checked against the model config by the loaders."""
    if cfg.format == "smg":
        return load_smg(cfg.root, split, source=cfg.source, feature_dim=feature_dim)
    if cfg.format == "generic":
        if not cfg.annotations:
            raise ValueError("data.annotations (the JSON file) is required for format 'generic'")
        return load_generic(
            cfg.annotations,
            cfg.root,
            split,
            units=cfg.units,
            frames_per_step=cfg.frames_per_step,
            feature_dim=feature_dim,
            default_fps=cfg.fps,
            frame_offset=cfg.frame_offset,
        )
    raise ValueError(f"data.format must be 'smg' or 'generic', got {cfg.format!r}")


def feature_spec_for(cfg: DataConfig, feature_dim: int) -> FeatureSpec:
    from_keypoints = cfg.format == "smg" and cfg.source in ("auto", "keypoints", "kinect")
    if from_keypoints and feature_dim == DEFAULT_SPEC.feature_dim:
        return DEFAULT_SPEC
    return FeatureSpec(
        name=cfg.feature_name or "external-features",
        version=1,
        input_kind="features",
        feature_dim=feature_dim,
        frames_per_step=cfg.frames_per_step,
        fps=cfg.fps,
    )


def describe_data(cfg: DataConfig, train: list[Sequence], val: list[Sequence]) -> str:
    """Human-readable training-data description for the model card."""
    head = f"{cfg.format} data at {cfg.root}"
    meta_file = Path(cfg.root) / "dataset.json"
    if cfg.format == "smg" and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            head = (
                f"{meta.get('description', 'dataset')} ({meta.get('generator', '?')} "
                f"v{meta.get('generator_version', '?')}, seed {meta.get('seed', '?')}, "
                f"{meta.get('num_sequences', '?')} sequences x {meta.get('frames_per_sequence', '?')} frames, "
                f"long_tail={meta.get('config', {}).get('long_tail', '?')})"
            )
        except (json.JSONDecodeError, AttributeError):
            pass
    n_train = sum(len(s.labels) for s in train)
    return (
        f"{head}; trained on split '{cfg.train_split}' ({len(train)} sequences, {n_train} instances), "
        f"selected and tuned on '{cfg.val_split}' ({len(val)} sequences)"
    )


@dataclass
class Batch:
    features: torch.Tensor  # (B, W, D)
    cls: torch.Tensor  # (B, N, C)
    reg: torch.Tensor  # (B, N, 2)
    pos: torch.Tensor  # (B, N) bool
    weight: torch.Tensor  # (B, N)


class WindowSampler:
    """Training windows of W steps cut from long sequences.

    An epoch is a shuffled list of instance anchors (each instance ``R_c`` times with log2
    augmentation, see models/augment.py) plus a share of random background windows. An anchored
    window contains its instance at a random offset; every window carries all ground truth in it.
    Segments cut by the window start are ignored in the loss (the model cannot see their start).
    """

    def __init__(
        self,
        sequences: list[Sequence],
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        assign_cfg: AssignConfig,
        rng: np.random.Generator,
    ) -> None:
        if not sequences:
            raise DataError("no training sequences")
        self.seqs, self.mcfg, self.tcfg, self.acfg, self.rng = sequences, model_cfg, train_cfg, assign_cfg, rng
        self.window = model_cfg.window_steps
        self.instances = expand_instances([s.labels for s in sequences], train_cfg.aug_alpha)
        lengths = np.array([s.steps.shape[0] for s in sequences], np.float64)
        self.seq_p = lengths / lengths.sum()
        self._queue: list[tuple[int, int]] = []

    def _refill(self) -> None:
        items = list(self.instances)
        frac = self.tcfg.background_fraction
        n_bg = int(round(len(items) * frac / max(1e-9, 1 - frac))) if items else 64
        items += [(-1, -1)] * n_bg
        order = self.rng.permutation(len(items))
        self._queue = [items[i] for i in order]

    def _window_start(self, si: int, ii: int) -> int:
        t = self.seqs[si].steps.shape[0]
        hi_limit = max(t - self.window, 0)
        if ii < 0:
            return int(self.rng.integers(0, hi_limit + 1))
        a, b = self.seqs[si].segments[ii]
        lo, hi = math.ceil(b) - self.window, math.floor(a)
        if lo > hi:
            lo, hi = hi, lo
        start = int(self.rng.integers(lo, hi + 1))
        return int(np.clip(start, 0, hi_limit))

    def sample(self, batch_size: int) -> Batch:
        w, cfg = self.window, self.mcfg
        feats = np.zeros((batch_size, w, cfg.input_dim), np.float32)
        cls, reg, pos, weight = [], [], [], []
        for b in range(batch_size):
            if not self._queue:
                self._refill()
            si, ii = self._queue.pop()
            if si < 0:
                si = int(self.rng.choice(len(self.seqs), p=self.seq_p))
            seq = self.seqs[si]
            start = self._window_start(si, ii)
            chunk = seq.steps[start : start + w]
            feats[b, : chunk.shape[0]] = chunk
            segs = seq.segments.astype(np.float64) - start
            inside = (segs[:, 1] > 0) & (segs[:, 0] < w)
            targets = assign(
                segs[inside],
                seq.labels[inside],
                w,
                cfg.strides,
                cfg.num_classes,
                self.acfg,
                valid_steps=chunk.shape[0],
                ignore=segs[inside, 0] < 0,
            )
            cls.append(targets.cls)
            reg.append(targets.reg)
            pos.append(targets.pos)
            weight.append(targets.weight)
        return Batch(
            torch.from_numpy(feats),
            torch.from_numpy(np.stack(cls)),
            torch.from_numpy(np.stack(reg)),
            torch.from_numpy(np.stack(pos)),
            torch.from_numpy(np.stack(weight)),
        )


# ----------------------------------------------------------------------------- optimisation


class ModelEma:
    """Exponential moving average of every float tensor in the state dict (weights and buffers)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))  # fast start
        own = self.module.state_dict()
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                own[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                own[k].copy_(v)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on conv/linear weight matrices (not biases, norms, gates, scalars)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2 and name.endswith(".weight") and "norm" not in name
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 1 % of the peak, per iteration."""
    if it < cfg.warmup_iterations:
        return cfg.lr * (it + 1) / cfg.warmup_iterations
    progress = (it - cfg.warmup_iterations) / max(1, cfg.iterations - cfg.warmup_iterations)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def compute_stats(sequences: list[Sequence]) -> tuple[np.ndarray, np.ndarray]:
    allsteps = np.concatenate([s.steps for s in sequences], axis=0).astype(np.float64)
    return allsteps.mean(axis=0), allsteps.std(axis=0)


# ----------------------------------------------------------------------------- evaluation


def offline_outputs(model: Detector, sequences: list[Sequence]) -> list[SequenceOutputs]:
    """Causal forward over each whole sequence."""
    out = []
    for s in sequences:
        scores, offsets, anchors = run_sequence(model, s.steps)
        out.append(
            SequenceOutputs(
                s.video_id, scores, offsets, anchors, s.steps.shape[0], s.frames_per_step, s.frame_offset, s.num_frames
            )
        )
    return out


def ground_truth(sequences: list[Sequence]) -> dict[str, list]:
    return {s.video_id: s.ground_truth() for s in sequences}


# ----------------------------------------------------------------------------- main loop


@dataclass
class TrainResult:
    checkpoint: Path
    val_f1: float
    tuned: TuneResult | None
    iterations: int
    seconds: float
    history: list[dict]


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    progress: bool = True,
    train_seqs: list[Sequence] | None = None,
    val_seqs: list[Sequence] | None = None,
    log=print,
) -> TrainResult:
    """Train, select the best EMA weights on validation F1, tune post-processing, save best.pt."""
    from tqdm import tqdm

    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    torch.set_num_threads(max(1, tc.threads))
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)

    if train_seqs is None:
        train_seqs = load_split(cfg.data, cfg.data.train_split, cfg.model.input_dim)
    if val_seqs is None:
        try:
            val_seqs = load_split(cfg.data, cfg.data.val_split, cfg.model.input_dim)
        except DataError as exc:
            log(f"warning: no validation split ({exc}); keeping the last EMA weights, default post-processing")
            val_seqs = []
    for s in train_seqs + val_seqs:
        if s.steps.shape[1] != cfg.model.input_dim:
            raise DataError(f"{s.video_id}: feature dim {s.steps.shape[1]} != model input_dim {cfg.model.input_dim}")

    model = Detector(cfg.model)
    model.set_feature_stats(*compute_stats(train_seqs))
    ema = ModelEma(model, tc.ema_decay)
    opt = make_optimizer(model, tc)
    loss_fn = DetectionLoss(reg_weight=tc.reg_weight, label_smoothing=tc.label_smoothing)
    sampler = WindowSampler(train_seqs, cfg.model, tc, cfg.assign, rng)
    gt_val = ground_truth(val_seqs)
    select_pp = PostProcess()

    best_f1, best_state, best_it = -1.0, None, 0
    history: list[dict] = []
    deadline = t0 + tc.max_minutes * 60 if tc.max_minutes else None

    def validate(it: int) -> None:
        nonlocal best_f1, best_state, best_it
        if not val_seqs:
            return
        thr, f1, _ = best_threshold(offline_outputs(ema.module, val_seqs), gt_val, select_pp)
        history.append({"iteration": it, "val_f1": f1, "threshold": thr, "seconds": time.time() - t0})
        if f1 > best_f1:
            best_f1, best_it = f1, it
            best_state = copy.deepcopy(ema.module.state_dict())

    bar = tqdm(total=tc.iterations, disable=not progress, desc="train", dynamic_ncols=True)
    it = 0
    running = None
    model.train()
    while it < tc.iterations:
        if deadline and time.time() > deadline:
            log(f"stopping at iteration {it}: max_minutes={tc.max_minutes} reached")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(it, tc)
        batch = sampler.sample(tc.batch_size)
        cls_logits, offsets = model(batch.features)
        losses = loss_fn(
            torch.cat(cls_logits, dim=1), torch.cat(offsets, dim=1), batch.cls, batch.reg, batch.pos, batch.weight
        )
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        ema.update(model)
        it += 1
        value = float(losses["loss"].detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}", best_f1=f"{max(best_f1, 0):.3f}")
        if tc.eval_every and it % tc.eval_every == 0 and it < tc.iterations:
            validate(it)
    bar.close()
    validate(it)
    if best_state is not None:
        ema.module.load_state_dict(best_state)
    final = ema.module.eval()

    tuned = None
    metrics: dict = {"selected_iteration": best_it if val_seqs else it, "iterations": it}
    pp = select_pp
    if val_seqs:
        outputs = offline_outputs(final, val_seqs)
        tuned = tune_postprocess(outputs, gt_val, base=select_pp)
        pp = tuned.postprocess
        val_report = evaluate_outputs(outputs, val_seqs, pp)
        metrics.update(
            {
                "val_smg_f1": val_report["smg_f1"]["f1"],
                "val_strict_f1": val_report["strict_f1"]["f1"],
                "val_map": val_report["map"]["mean"],
            }
        )
    seconds = time.time() - t0
    metrics["train_seconds"] = round(seconds, 1)
    meta = {
        "name": cfg.name,
        "version": cfg.version,
        "feature": feature_spec_for(cfg.data, cfg.model.input_dim).to_dict(),
        "classes": list(SMG_CLASSES[: cfg.model.num_classes]),
        "training_data": describe_data(cfg.data, train_seqs, val_seqs),
        "metrics": metrics,
        "run_config": cfg.to_dict(),
        "history": history,
    }
    path = out_dir / "best.pt"
    save_checkpoint(path, final, pp, meta)
    (out_dir / "metrics.json").write_text(json.dumps({"metrics": metrics, "history": history}, indent=2))
    return TrainResult(path, best_f1, tuned, it, seconds, history)
