"""Causal event logic: the tracker on hand-made detections, then the detector end to end on the
tiny real ONNX model (offline sync == offline through the scheduler == ground truth)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.batching.scheduler import Scheduler
from service.contract.features import keypoints_to_steps
from service.detection.decode import Detection
from service.detection.events import EventTracker, StreamDetector, TrackerParams, window_ends
from service.detection.offline import (
    detect_steps,
    detect_steps_sync,
    full_sequence_detections,
    gesture_ends,
    window_at,
)
from tests.streamkit import Gesture, synth_keypoints, tiny_card

CARD = tiny_card()


def tracker(**params) -> EventTracker:
    return EventTracker(CARD, frames_per_step=4, fps=30.0, window_steps=64, params=TrackerParams(**params))


def det(cls: int, start: float, end: float, score: float = 0.9) -> Detection:
    return Detection(cls, score, start, end)


def test_open_gesture_starts_then_ends_once_with_its_best_bounds() -> None:
    t = tracker()
    first = t.update(20, [det(1, 10, 20, 0.8)])  # still open at the window edge
    assert [(e.type, e.event_id) for e in first] == [("gesture_start", 1)]
    assert t.update(24, [det(1, 10, 24, 0.95), det(1, 11, 22, 0.7)]) == []  # same gesture, two detections
    assert t.update(28, [det(1, 10, 27, 0.9)]) == []  # ends within the 2-step margin: still open
    ended = t.update(32, [det(1, 10, 27, 0.9)])  # now 5 steps in the past
    assert [(e.type, e.event_id) for e in ended] == [("gesture_end", 1)]
    end = ended[0]
    assert (end.start_step, end.end_step, end.score) == (10, 24, 0.95)  # the best-scoring detection's bounds
    assert (end.start_frame, end.end_frame, end.decided_at_frame) == (40, 96, 128)
    assert end.end_time == pytest.approx(96 / 30) and end.label == CARD.classes[0]
    # Overlapping windows keep seeing it: never reported again.
    assert t.update(36, [det(1, 10, 25, 0.99)]) == []
    assert t.open_gestures == 0


def test_closed_detection_seen_first_emits_start_and_end_together() -> None:
    t = tracker()
    events = t.update(40, [det(2, 10, 20)])
    assert [(e.type, e.event_id) for e in events] == [("gesture_start", 1), ("gesture_end", 1)]


def test_disappearing_gesture_ends_after_patience_with_end_clipped_to_the_decision() -> None:
    t = tracker(patience_windows=2)
    t.update(20, [det(1, 10, 30)])
    assert t.update(24, []) == []
    ended = t.update(28, [])
    assert ended[0].type == "gesture_end" and ended[0].end_step == 28


def test_classes_and_distinct_gestures_are_separate_events() -> None:
    t = tracker()
    events = t.update(20, [det(1, 10, 20), det(2, 10, 20), det(1, 0, 3)])
    starts = [(e.class_id, e.start_step) for e in events if e.type == "gesture_start"]
    assert sorted(starts) == [(1, 0), (1, 10), (2, 10)]
    assert len({e.event_id for e in events}) == 3
    assert [e.type for e in events].count("gesture_end") == 1  # the (1, 0, 3) one is already over


def test_finish_closes_open_gestures_at_the_last_step() -> None:
    t = tracker()
    t.update(20, [det(1, 10, 40)])
    ended = t.finish(22)
    assert [(e.type, e.end_step) for e in ended] == [("gesture_end", 22)]


def test_padding_only_detections_are_ignored_and_starts_clipped() -> None:
    t = tracker()
    assert t.update(8, [det(1, -10, -1)]) == []
    events = t.update(12, [det(1, -3, 12)])
    assert events[0].start_step == 0


def test_window_ends_cover_the_final_partial_hop() -> None:
    assert window_ends(10, 4) == [4, 8, 10]
    assert window_ends(8, 4) == [4, 8]
    assert window_ends(0, 4) == []


def test_window_at_left_pads_like_the_ring() -> None:
    steps = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.testing.assert_array_equal(window_at(steps, 2, 4), [[0, 0], [0, 0], [0, 1], [2, 3]])


def test_hop_must_fit_the_window() -> None:
    with pytest.raises(ValueError, match="hop"):
        StreamDetector(CARD, hop_steps=65)


GESTURES = [Gesture(1, 40, 120), Gesture(2, 200, 290), Gesture(1, 400, 470)]


@pytest.fixture(scope="module")
def steps() -> np.ndarray:
    return keypoints_to_steps(synth_keypoints(560, GESTURES, seed=3))


def test_offline_events_find_every_gesture_with_close_bounds(tiny_runtime, steps) -> None:
    events = detect_steps_sync(tiny_runtime, steps, tiny_runtime.card)
    ends = gesture_ends(events)
    assert [(e.class_id, e.start_frame, e.end_frame) for e in ends] == [(1, 40, 120), (2, 200, 288), (1, 400, 468)]
    starts = {e.event_id for e in events if e.type == "gesture_start"}
    assert starts == {e.event_id for e in ends}  # every end has its start, with the shared id
    for e in ends:
        assert e.decided_at_frame > e.end_frame  # causal: decided after the gesture ended


def test_offline_through_the_scheduler_equals_direct(tiny_runtime, steps) -> None:
    async def main():
        sched = Scheduler(tiny_runtime, max_batch=8, max_wait_ms=2, buckets=[1, 2, 4, 8])
        sched.start()
        events = await detect_steps(steps, card=tiny_runtime.card, scheduler=sched, key="job", concurrency=5)
        await sched.stop()
        return events

    assert asyncio.run(main()) == detect_steps_sync(tiny_runtime, steps, tiny_runtime.card, max_batch=3)


def test_a_plain_window_function_drives_the_same_path(tiny_runtime, steps) -> None:
    def window_fn(batch):
        out = tiny_runtime.run({"features": batch})
        return out["scores"], out["offsets"]

    expected = detect_steps_sync(tiny_runtime, steps, tiny_runtime.card)
    assert detect_steps_sync(window_fn, steps, tiny_runtime.card) == expected


def test_stream_options_filter_classes_and_thresholds(tiny_runtime, steps) -> None:
    only_right = gesture_ends(detect_steps_sync(tiny_runtime, steps, tiny_runtime.card, classes=[2]))
    assert [e.class_id for e in only_right] == [2]
    assert detect_steps_sync(tiny_runtime, steps, tiny_runtime.card, score_threshold=1.0) == []


def test_full_sequence_reference_sees_the_same_gestures(tiny_runtime, steps) -> None:
    found = full_sequence_detections(tiny_runtime, steps, tiny_runtime.card)
    best = {}
    for d in found:
        best.setdefault(d.class_id, []).append(d)
    assert {d.class_id for d in found} == {1, 2}
    top = max(found, key=lambda d: d.score)
    assert top.class_id in (1, 2) and top.end_step > top.start_step


def test_bad_steps_are_refused(tiny_runtime) -> None:
    with pytest.raises(ValueError, match="shape"):
        detect_steps_sync(tiny_runtime, np.zeros((10, 5)), tiny_runtime.card)
    bad = np.zeros((10, 372), dtype=np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        detect_steps_sync(tiny_runtime, bad, tiny_runtime.card)
