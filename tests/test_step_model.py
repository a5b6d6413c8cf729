"""The step (incremental) detector equals the full causal forward, in torch and in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.detector import Detector, run_sequence  # noqa: E402
from models.export import build_card  # noqa: E402
from models.export_step import OUTPUTS, export_step_onnx, step_parity_check, step_path_for  # noqa: E402
from models.nn.config import ModelConfig  # noqa: E402
from models.step import StepDetector, run_chunks  # noqa: E402
from service.contract.model_card import ModelCard, PostProcess  # noqa: E402
from service.contract.step_layout import StepLayout  # noqa: E402
from service.detection.decode import decode  # noqa: E402

T = 64  # steps per test sequence: a multiple of every chunk size and of the largest stride
CHANNELS = 16
STRIDES = (1, 2, 4, 8)


def _detector(seed: int = 0, **overrides) -> Detector:
    torch.manual_seed(seed)
    cfg = ModelConfig(channels=CHANNELS, window_steps=32, strides=STRIDES, sta_reduction=4, **overrides)
    det = Detector(cfg).eval()
    with torch.no_grad():
        # Random-but-nonzero standardisation and neighbour fusion: alpha starts at 0, which would
        # leave the cross-level links (and their cached state) untested.
        det.feat_mean.normal_(0.0, 0.1)
        det.feat_std.uniform_(0.5, 1.5)
        for head in (det.cls_head, det.reg_head):
            for layer in head.layers:
                layer.alpha.fill_(0.8)
                layer.beta.fill_(0.9)
    return det


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A chunk is hundreds of tiny ops: intra-op threads only add synchronisation (on a busy 2-core
    machine 2 threads ran ~50x slower than 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def detector() -> Detector:
    return _detector()


@pytest.fixture(scope="module")
def sequence() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, T, ModelConfig().input_dim, generator=g)


def _full(det: Detector, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    with torch.no_grad():
        cls, off = det(x)
    return [torch.sigmoid(c) for c in cls], [o * float(s) for o, s in zip(off, det.cfg.strides, strict=True)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("chunk", [1, 2, 4, 8, 16, 32])
def test_chunked_equals_full_causal_forward(detector: Detector, sequence: torch.Tensor, chunk: int) -> None:
    ref_scores, ref_offsets = _full(detector, sequence)
    scores, offsets = run_chunks(StepDetector(detector, chunk), sequence)
    for lvl, s in enumerate(STRIDES):  # every level yields every position, in order
        assert scores[lvl].shape == ref_scores[lvl].shape == (2, T // s, detector.cfg.num_classes)
    assert _max_diff(scores, ref_scores) <= 1e-4
    assert _max_diff(offsets, ref_offsets) <= 1e-4
    assert max(float(o.abs().max()) for o in offsets) > 0  # the comparison is not between zeros


@pytest.mark.parametrize("overrides", [{"sta": False, "stem_layers": 2}, {"sta_residual": True, "stat_window": 1}])
def test_other_architectures_step_exactly(sequence: torch.Tensor, overrides: dict) -> None:
    det = _detector(seed=3, **overrides)
    scores, offsets = run_chunks(StepDetector(det, 2), sequence)
    ref_scores, ref_offsets = _full(det, sequence)
    assert _max_diff(scores, ref_scores) <= 1e-4
    assert _max_diff(offsets, ref_offsets) <= 1e-4


def test_streams_at_different_phases_share_a_batch(detector: Detector, sequence: torch.Tensor) -> None:
    """Stream b joins b chunks late; the stacked batch still gives each stream its own outputs."""
    step = StepDetector(detector, 2)
    h, joins = 2, [0, 1, 3]
    xs = torch.cat([sequence, sequence[:1].flip(1)], dim=0)
    state, phase = step.initial_state(len(joins))
    got: list[list[list[torch.Tensor]]] = [[[] for _ in STRIDES] for _ in joins]
    levels = step.layout.slot_levels()
    mixed = False
    with torch.no_grad():
        for c in range(T // h + max(joins)):
            chunk = torch.zeros(len(joins), h, xs.shape[-1])
            for b, j in enumerate(joins):
                if j <= c < j + T // h:
                    chunk[b] = xs[b, (c - j) * h : (c - j + 1) * h]
            scores, _, valid, state, phase = step(chunk, state, phase)
            mixed |= not bool((valid == valid[:1]).all())
            for b, j in enumerate(joins):
                if c < j:  # not started yet: a fresh stream's state
                    state[b], phase[b] = 0.0, 0
                elif c < j + T // h:
                    for slot in np.flatnonzero(valid[b].numpy()):
                        got[b][levels[slot]].append(scores[b, slot])
    assert mixed  # some chunks completed a coarse position for one stream and not for another
    for b in range(len(joins)):
        ref, _ = _full(detector, xs[b : b + 1])
        mine = [torch.stack(v)[None] for v in got[b]]
        assert _max_diff(mine, ref) <= 1e-4


def test_state_size_is_fixed_and_documented(detector: Detector, sequence: torch.Tensor) -> None:
    step = StepDetector(detector, 4)
    layout = step.layout
    assert layout.state_size == sum(s.size for s in layout.segments) == step.state_size
    names = [s.name for s in layout.segments]
    assert len(set(names)) == len(names)
    assert {"enc.embed0.x", "enc.L1.u", "head.cls.layer0.x", "head.reg.sta.pooled"} <= set(names)
    state, phase = step.initial_state(2)
    sizes = set()
    with torch.no_grad():
        for c in range(40):  # far longer than any receptive field: the state does not grow
            x = sequence[:, (c % (T // 4)) * 4 : (c % (T // 4) + 1) * 4]
            *_, state, phase = step(x, state, phase)
            sizes.add(tuple(state.shape))
    assert sizes == {(2, layout.state_size)}
    again = StepLayout.from_dict(layout.to_dict())
    assert again == layout
    assert again.num_slots == sum(max(4 // s, 1) for s in STRIDES)
    assert again.slot_anchor_offsets().tolist() == [0, 1, 2, 3, 1, 3, 3, 3]
    assert StepDetector(detector, 16).state_size < StepDetector(detector, 1).state_size  # fewer pending pairs


def test_invalid_step_configs_are_refused(detector: Detector) -> None:
    with pytest.raises(ValueError, match="power of two"):
        StepDetector(detector, 3)
    torch.manual_seed(0)
    centred = Detector(ModelConfig(channels=CHANNELS, window_steps=32, strides=STRIDES, sta_reduction=4, causal=False))
    with pytest.raises(ValueError, match="causal"):
        StepDetector(centred, 4)


@pytest.fixture(scope="module")
def step_onnx(detector: Detector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    card = build_card(detector, PostProcess(score_threshold=0.2), meta={}, name="step-test")
    return export_step_onnx(detector, step_path_for(tmp_path_factory.mktemp("step") / "m.onnx"), card, 4)


def test_onnx_step_model_matches_torch(detector: Detector, step_onnx: Path) -> None:
    assert step_onnx.name == "m.step.onnx"
    assert step_parity_check(detector, step_onnx, chunks=10, batch=3) <= 1e-4


def test_onnx_step_graph_has_static_sizes_and_no_per_call_weight_work(step_onnx: Path) -> None:
    """Every size in the step graph is a constant and re-laid weights are initializers: a traced
    shape or a weight transform would add nodes to every call, which is what a chunk costs."""
    import onnx

    graph = onnx.load(str(step_onnx)).graph
    ops = [n.op_type for n in graph.node]
    assert "Shape" not in ops and "Size" not in ops
    weights = {init.name for init in graph.initializer}
    # No op reads only initializers (Identity aliases of equal weights aside, which cost nothing).
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type == "Identity":
            continue
        assert not inputs or not set(inputs) <= weights, f"{node.op_type} {node.name} works on weights alone"


def test_onnx_card_carries_the_layout(detector: Detector, step_onnx: Path) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(step_onnx), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata(sess.get_modelmeta().custom_metadata_map)
    layout = StepLayout.from_dict(card.step_model)
    assert layout == StepDetector(detector, 4).layout
    assert card.window_steps == detector.cfg.window_steps and card.causal
    inputs = {i.name: i for i in sess.get_inputs()}
    assert inputs["state"].shape[1] == layout.state_size and inputs["features"].shape[1:] == [4, 372]
    assert {i.type for i in sess.get_inputs()} == {"tensor(float)"}  # stacks like any request
    assert [o.name for o in sess.get_outputs()] == OUTPUTS
    assert all(isinstance(i.shape[0], str) for i in sess.get_inputs())  # dynamic batch


def _onnx_stream(path: Path, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run one stream through the step ONNX; gather valid slots as (scores, offsets, anchors), sorted
    like the window model's output (levels concatenated, anchors ascending)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    layout = StepLayout.from_dict(ModelCard.from_metadata(sess.get_modelmeta().custom_metadata_map).step_model)
    h = layout.chunk_steps
    init = layout.initial_state()
    state, phase = init["state"][None], init["phase"][None]
    rows = []
    for c in range(len(steps) // h):
        scores, offsets, valid, state, phase = sess.run(
            OUTPUTS, {"features": steps[None, c * h : (c + 1) * h], "state": state, "phase": phase}
        )
        for slot in np.flatnonzero(valid[0]):
            anchor = c * h + layout.slot_anchor_offsets()[slot]
            rows.append((layout.slot_levels()[slot], anchor, scores[0, slot], offsets[0, slot]))
    rows.sort(key=lambda r: (r[0], r[1]))
    return np.stack([r[2] for r in rows]), np.stack([r[3] for r in rows]), np.array([r[1] for r in rows], np.float32)


def test_onnx_stream_equals_full_forward_and_its_events(detector: Detector, step_onnx: Path) -> None:
    rng = np.random.default_rng(5)
    steps = rng.normal(size=(T, detector.cfg.input_dim)).astype(np.float32)
    scores, offsets, anchors = _onnx_stream(step_onnx, steps)
    ref_scores, ref_offsets, ref_anchors = run_sequence(detector, steps)
    np.testing.assert_array_equal(anchors, ref_anchors)
    assert np.abs(scores - ref_scores).max() <= 1e-4
    assert np.abs(offsets - ref_offsets).max() <= 1e-4
    pp = PostProcess(score_threshold=float(np.quantile(ref_scores, 0.97)), min_duration_steps=0.0)
    events = decode(scores, offsets, anchors, pp)
    ref_events = decode(ref_scores, ref_offsets, ref_anchors, pp)
    assert len(ref_events) >= 3
    assert [(e.class_id, round(e.start_step, 3), round(e.end_step, 3)) for e in events] == [
        (e.class_id, round(e.start_step, 3), round(e.end_step, 3)) for e in ref_events
    ]
