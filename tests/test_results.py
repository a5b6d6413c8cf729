"""Result formats: JSON detections, MiGA/SMG CSV (plain and scored), timeline PNG, atomic writes."""

from __future__ import annotations

import csv
import errno
import io
import json

import cv2
import numpy as np
import pytest

from service.contract.classes import SMG_CLASSES
from service.jobs.results import (
    AtomicWriter,
    BatchDetection,
    detections_csv,
    read_detections_json,
    timeline_png,
    write_results,
)

DETS = [
    BatchDetection(13, SMG_CLASSES[12], 0.35, 100, 160, 100 / 30, 160 / 30),
    BatchDetection(3, SMG_CLASSES[2], 0.92, 30, 90, 1.0, 3.0),
    BatchDetection(17, SMG_CLASSES[16], 0.6, 200, 204, 200 / 30, 204 / 30),
]


def test_from_gesture_end_event():
    from service.api.protocol import GestureEvent

    ev = GestureEvent(
        type="gesture_end",
        stream_id="s",
        event_id=4,
        class_id=6,
        label=SMG_CLASSES[5],
        score=0.7,
        start_frame=40,
        end_frame=88,
        start_time=40 / 30,
        end_time=88 / 30,
        decided_at_frame=92,
        decided_at_time=92 / 30,
    )
    d = BatchDetection.from_event(ev)
    assert d == BatchDetection(6, SMG_CLASSES[5], 0.7, 40, 88, 40 / 30, 88 / 30)


def test_csv_is_smg_layout_without_header():
    rows = list(csv.reader(io.StringIO(detections_csv(DETS).decode())))
    assert rows == [["13", "100", "160"], ["3", "30", "90"], ["17", "200", "204"]]


def test_scored_csv_variant_has_header_video_id_and_score():
    rows = list(csv.DictReader(io.StringIO(detections_csv(DETS, video_id="Sample0001", scores=True).decode())))
    assert list(rows[0]) == ["video_id", "label", "start_frame", "end_frame", "score"]
    assert rows[1] == {
        "video_id": "Sample0001",
        "label": "3",
        "start_frame": "30",
        "end_frame": "90",
        "score": "0.9200",
    }


def test_timeline_png_is_a_real_picture():
    png = timeline_png(DETS, duration_s=10.0)
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[1] >= 800 and img.shape[0] >= 400
    # Bars are drawn in blue shades: a confident detection leaves dark blue pixels.
    b, g, r = img[..., 0].astype(int), img[..., 1].astype(int), img[..., 2].astype(int)
    assert ((b > 100) & (r < 60) & (g < 90)).sum() > 200
    empty = cv2.imdecode(np.frombuffer(timeline_png([], duration_s=0.0), np.uint8), cv2.IMREAD_COLOR)
    assert empty is not None


def test_write_results_all_formats_sorted_by_time(tmp_path):
    paths = write_results(tmp_path, DETS, {"job_id": "j1", "filename": "a.mp4", "fps": 30.0}, duration_s=10.0)
    assert set(paths) == {"json", "csv", "png"}
    dets, meta = read_detections_json(paths["json"].read_bytes())
    assert [d.start_frame for d in dets] == [30, 100, 200]
    assert meta["job_id"] == "j1"
    body = json.loads(paths["json"].read_text())
    assert body["count"] == 3
    assert set(body["detections"][0]) == {
        "class_id",
        "label",
        "score",
        "start_frame",
        "end_frame",
        "start_s",
        "end_s",
    }
    assert paths["csv"].read_text().splitlines()[0] == "3,30,90"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


class _Quota:
    """A file that accepts ``limit`` bytes, then fails as a full disk does."""

    def __init__(self, path, limit):
        self._f = open(path, "wb")  # noqa: SIM115
        self._left = limit

    def write(self, data):
        if len(data) > self._left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_disk_full_raises_enospc_and_leaves_no_partial_file(tmp_path):
    writer = AtomicWriter(opener=lambda p: _Quota(p, 100))
    with pytest.raises(OSError) as info:
        write_results(tmp_path, DETS, {"job_id": "j"}, duration_s=10.0, writer=writer)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
