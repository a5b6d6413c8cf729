"""Detector network: causality, anchor contract, packed heads, live DFA gates, assignment, losses, errors."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads stall on 2 shared cores

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.assign import AssignConfig, assign, default_ranges  # noqa: E402
from models.detector import Detector, load_checkpoint, run_sequence, save_checkpoint  # noqa: E402
from models.losses import DetectionLoss, diou_loss_1d, sigmoid_focal_loss  # noqa: E402
from models.nn.config import ModelConfig  # noqa: E402
from models.nn.layers import upsample2  # noqa: E402
from service.contract.model_card import PostProcess, anchor_steps, anchor_strides  # noqa: E402

SMALL = {"channels": 32, "window_steps": 64, "sta_reduction": 4}


def small_model(seed: int = 0, **kw) -> Detector:
    torch.manual_seed(seed)
    return Detector(ModelConfig(**{**SMALL, **kw})).eval()


@pytest.mark.parametrize("sta", [True, False])
def test_causal_future_perturbation_leaves_past_outputs_unchanged(sta: bool) -> None:
    model = small_model(sta=sta)
    x = torch.randn(2, 128, model.cfg.input_dim)
    t0 = 70
    y = x.clone()
    y[:, t0 + 1 :] += 5.0 * torch.randn_like(y[:, t0 + 1 :])
    with torch.no_grad():
        cls_a, off_a = model(x)
        cls_b, off_b = model(y)
    for lvl, s in enumerate(model.cfg.strides):
        final = (t0 + 1) // s  # anchors i with (i+1)*s-1 <= t0 have seen only steps <= t0
        assert torch.equal(cls_a[lvl][:, :final], cls_b[lvl][:, :final]), f"level {lvl} cls leaked the future"
        assert torch.equal(off_a[lvl][:, :final], off_b[lvl][:, :final]), f"level {lvl} reg leaked the future"
        # The test can see leaks: outputs after t0 do change.
        assert not torch.allclose(cls_a[lvl][:, final:], cls_b[lvl][:, final:])


def test_centred_mode_does_see_the_future() -> None:
    model = small_model(causal=False)
    x = torch.randn(1, 64, model.cfg.input_dim)
    y = x.clone()
    y[:, 40:] += 5.0
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    assert not torch.allclose(a[0][:, :39], b[0][:, :39])


def test_whole_sequence_forward_is_prefix_consistent() -> None:
    """run_sequence on a prefix equals the same anchors of the longer sequence (causal streaming)."""
    model = small_model()
    steps = np.random.default_rng(0).normal(size=(150, model.cfg.input_dim)).astype(np.float32)
    s_full, o_full, a_full = run_sequence(model, steps)
    s_pre, o_pre, a_pre = run_sequence(model, steps[:101])
    assert a_pre.max() <= 100 and a_full.max() <= 149

    def by_level(anchors: np.ndarray) -> list[np.ndarray]:
        return np.split(np.arange(len(anchors)), np.flatnonzero(np.diff(anchors) < 0) + 1)

    full_levels, pre_levels = by_level(a_full), by_level(a_pre)
    assert len(full_levels) == len(pre_levels) == len(model.cfg.strides)
    for full_idx, pre_idx in zip(full_levels, pre_levels, strict=True):
        head = full_idx[: len(pre_idx)]
        np.testing.assert_array_equal(a_pre[pre_idx], a_full[head])
        np.testing.assert_allclose(s_pre[pre_idx], s_full[head], atol=1e-6)
        np.testing.assert_allclose(o_pre[pre_idx], o_full[head], atol=1e-5)


def test_predict_follows_anchor_contract() -> None:
    model = small_model()
    w = model.cfg.window_steps
    with torch.no_grad():
        scores, offsets = model.predict(torch.randn(3, w, model.cfg.input_dim))
        _, per_level = model(torch.randn(1, w, model.cfg.input_dim))
    n = len(anchor_steps(w, model.cfg.strides))
    assert scores.shape == (3, n, model.cfg.num_classes) and offsets.shape == (3, n, 2)
    assert float(scores.min()) >= 0 and float(scores.max()) <= 1 and float(offsets.min()) >= 0
    assert [p.shape[1] for p in per_level] == [w // s for s in model.cfg.strides]
    np.testing.assert_array_equal(anchor_strides(w, model.cfg.strides)[:w], np.ones(w))


def test_packed_heads_equal_per_level_heads() -> None:
    model = small_model()
    x = torch.randn(2, 64, model.cfg.input_dim)
    with torch.no_grad():
        feats = model.encoder(((x - model.feat_mean) / model.feat_std).transpose(1, 2))
        for head in (model.cls_head, model.reg_head):
            for a, b in zip(head(feats), head.forward_levels(feats), strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_causal_upsample_uses_only_completed_coarse_positions() -> None:
    coarse = torch.arange(1.0, 5.0).view(1, 1, 4)  # coarse j is complete at fine 2j+1
    np.testing.assert_array_equal(upsample2(coarse, causal=True)[0, 0].numpy(), [0, 1, 1, 2, 2, 3, 3, 4])
    np.testing.assert_array_equal(upsample2(coarse, causal=False)[0, 0].numpy(), [1, 1, 2, 2, 3, 3, 4, 4])


def test_dynamic_branches_start_alive() -> None:
    """Every DFA gate and aggregation weight gets a gradient at init (no dead zero-init branches)."""
    model = small_model()
    model.train()
    cls, off = model(torch.randn(2, 64, model.cfg.input_dim))
    (sum(c.sum() for c in cls) + sum(o.sum() for o in off)).backward()
    dead = [
        name
        for name, p in model.named_parameters()
        if ("gate" in name or "agg" in name) and ("encoder" in name or "depth" in name) and p.grad.abs().sum() == 0
    ]
    assert not dead, f"parameters without gradient at init: {dead}"


def test_bad_inputs_fail_with_clear_messages() -> None:
    model = small_model()
    with pytest.raises(ValueError, match="dim 10 but the model expects 372"):
        model(torch.randn(1, 64, 10))
    with pytest.raises(ValueError, match="multiple of the largest stride"):
        model(torch.randn(1, 50, 372))
    with pytest.raises(ValueError, match="non-empty"):
        run_sequence(model, np.zeros((0, 372), np.float32))
    with pytest.raises(ValueError, match="strides must start at 1"):
        ModelConfig(strides=(2, 4))
    with pytest.raises(ValueError, match="unknown model config keys: bogus"):
        ModelConfig.from_dict({"bogus": 1})


def test_checkpoint_roundtrip(tmp_path) -> None:
    model = small_model()
    model.set_feature_stats(np.full(372, 0.5), np.full(372, 2.0))
    pp = PostProcess(score_threshold=0.42, nms_method="soft-nms")
    save_checkpoint(tmp_path / "m.pt", model, pp, {"name": "t"})
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt.postprocess == pp and ckpt.meta["name"] == "t" and ckpt.model.cfg == model.cfg
    x = torch.randn(1, 64, 372)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model.predict(x), model.predict(x))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")


# ----------------------------------------------------------------------------- assignment


def test_assignment_positives_sit_on_the_segment_near_the_sampling_centre() -> None:
    strides, w = (1, 2, 4, 8, 16), 64
    t = assign(np.array([[20.0, 26.0]]), np.array([3]), w, strides, 17, AssignConfig(center_frac=0.75, radius=1.5))
    anchors, strd = anchor_steps(w, strides), anchor_strides(w, strides)
    pos = np.flatnonzero(t.pos)
    assert pos.size > 0
    # Reach max(p - start, end - p) is 3..6 steps here: levels 0 ([0, 4]) and 1 ([4, 8]) only.
    assert set(strd[pos]) == {1.0, 2.0}
    ranges = dict(zip((1, 2, 4, 8, 16), default_ranges(strides), strict=True))
    reach = np.maximum(anchors[pos] - 20, 26 - anchors[pos])
    assert all(ranges[int(s)][0] <= r <= ranges[int(s)][1] for s, r in zip(strd[pos], reach, strict=True))
    assert np.all((anchors[pos] >= 20) & (anchors[pos] <= 26))
    assert np.all(np.abs(anchors[pos] - 24.5) <= 1.5 * 2)
    np.testing.assert_allclose(t.reg[pos, 0] * strd[pos], anchors[pos] - 20)
    np.testing.assert_allclose(t.reg[pos, 1] * strd[pos], 26 - anchors[pos])
    assert np.all(t.cls[pos, 2] == 1) and t.cls.sum() == pos.size


def test_assignment_ties_ignores_and_padding() -> None:
    strides, w = (1, 2, 4), 32
    segs = np.array([[2.0, 9.0], [3.0, 7.0], [-4.0, 30.0]])
    t = assign(segs, np.array([1, 2, 5]), w, strides, 17, valid_steps=20, ignore=np.array([False, False, True]))
    anchors = anchor_steps(w, strides)
    assert np.all(t.weight[anchors >= 20] == 0)
    both = np.flatnonzero(t.pos)
    assert both.size and not t.cls[both, 4].any()  # the ignored (cut) segment never becomes a target
    # Where segments 1 and 2 both qualify, the shorter (class 2) wins.
    overlap = [i for i in both if 3 <= anchors[i] <= 7 and t.cls[i].sum() == 1]
    assert overlap and all(t.cls[i, 1] == 1 for i in overlap if t.cls[i, 0] == 0)
    with pytest.raises(ValueError, match="labels must be in 1..17"):
        assign(np.array([[1.0, 5.0]]), np.array([18]), w, strides, 17)
    assert default_ranges((1, 2, 4))[-1][1] > 1e6


# ----------------------------------------------------------------------------- losses


def test_losses() -> None:
    target = torch.tensor([[2.0, 3.0], [1.0, 1.0]])
    assert torch.allclose(diou_loss_1d(target, target), torch.zeros(2), atol=1e-6)
    worse = diou_loss_1d(torch.tensor([[1.0, 4.0]]), target[:1])
    assert float(worse) > 0
    logits = torch.tensor([[-5.0, 5.0]])
    good = sigmoid_focal_loss(logits, torch.tensor([[0.0, 1.0]])).sum()
    bad = sigmoid_focal_loss(logits, torch.tensor([[1.0, 0.0]])).sum()
    assert float(good) < 1e-3 < float(bad)
    loss = DetectionLoss()
    out = loss(
        torch.zeros(1, 4, 3, requires_grad=True),
        torch.ones(1, 4, 2, requires_grad=True),
        torch.zeros(1, 4, 3),
        torch.ones(1, 4, 2),
        torch.tensor([[True, False, False, False]]),
        torch.ones(1, 4),
    )
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and float(out["reg"]) < 1e-6
