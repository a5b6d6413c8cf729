"""Batch detection over real HTTP: uploads, jobs, progress, results, parity with streaming, limits, bad input.

Servers are ``create_app(Settings(...))`` under uvicorn on loopback ports; videos are written with
OpenCV; the pose featurizer is the real MediaPipe one; the model is a real ONNX file.
"""

from __future__ import annotations

import csv
import io
import time

import cv2
import numpy as np
import pytest

from service.config import Settings
from service.contract.features import KEYPOINT_DIM
from service.jobs.results import AtomicWriter
from tests.batchkit import FullDisk, astronaut_video, model_for_tests, npy_bytes, serve, wait_job


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_for_tests(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    mp4 = astronaut_video(d / "astronaut.mp4", frames=60, fourcc="mp4v")
    avi = astronaut_video(d / "astronaut.avi", frames=48, fourcc="MJPG")
    data = mp4.read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (d / "notvideo.mp4").write_bytes(b"these bytes are a letter, not a film\n" * 50)
    astronaut_video(d / "zero.mp4", frames=0, fourcc="mp4v")
    # A valid AVI whose codec FourCC names no decoder.
    (d / "codec.avi").write_bytes(avi.read_bytes().replace(b"MJPG", b"QQQQ"))
    return d


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    settings = Settings(
        model_path=model,
        data_dir=data,
        max_concurrent_jobs=2,
        max_queued_jobs=8,
        inbound_queue_frames=100_000,
        sync_max_s=120,
        providers=["CPUExecutionProvider"],
    )
    with serve(settings) as live:
        yield live


@pytest.fixture(scope="module")
def tight(model, tmp_path_factory):
    """Small limits: 1 MiB uploads, 5 s inputs, one job at a time and no queue."""
    data = tmp_path_factory.mktemp("tight")
    settings = Settings(
        model_path=model,
        data_dir=data,
        upload_max_mb=1.0,
        max_video_s=5.0,
        max_concurrent_jobs=1,
        max_queued_jobs=0,
        sync_max_s=1.0,
        providers=["CPUExecutionProvider"],
    )
    with serve(settings) as live:
        yield live


def synth(frames: int, seed: int) -> np.ndarray:
    from models.synth import generate_sequence

    keypoints, _ = generate_sequence(seed, frames)
    return keypoints.astype(np.float32)


def upload(client, name: str, data: bytes, **params):
    return client.post("/v1/detect", params=params, files={"file": (name, data)})


# ---- keypoints path ----


def test_keypoints_wait_returns_detections_and_results(server):
    kp = synth(600, seed=3)
    with server.client() as c:
        r = upload(c, "Sample0003.npy", npy_bytes(kp), wait="true")
        assert r.status_code == 200, r.text
        body = r.json()
        job = body["job"]
        assert job["state"] == "done" and job["input_kind"] == "keypoints"
        assert job["progress"]["frames_done"] == job["progress"]["frames_total"] == 600
        assert job["progress"]["fraction"] == 1.0 and job["duration_s"] == 20.0
        assert body["count"] == len(body["detections"]) == job["detections"]
        for d in body["detections"]:
            assert 1 <= d["class_id"] <= 17 and 0 <= d["start_frame"] <= d["end_frame"]
            assert d["start_s"] == pytest.approx(d["start_frame"] / 30.0)

        got = c.get(f"/v1/jobs/{job['id']}").json()
        assert set(got["links"]) == {"self", "result.json", "result.csv", "result.png"}
        assert c.get(got["links"]["result.json"]).json()["detections"] == body["detections"]
        rows = list(csv.reader(io.StringIO(c.get(got["links"]["result.csv"]).text)))
        assert rows == [[str(d["class_id"]), str(d["start_frame"]), str(d["end_frame"])] for d in body["detections"]]
        scored = list(csv.DictReader(io.StringIO(c.get(got["links"]["result.csv"], params={"scores": "true"}).text)))
        assert all(row["video_id"] == "Sample0003" for row in scored) and len(scored) == body["count"]
        png = c.get(got["links"]["result.png"])
        assert png.headers["content-type"] == "image/png"
        assert cv2.imdecode(np.frombuffer(png.content, np.uint8), cv2.IMREAD_COLOR) is not None


def test_batch_equals_streaming_gesture_ends(server):
    """The acceptance test: batch detections == the gesture_end events of a live stream of the same input."""
    from client.sync import connect

    kp = synth(900, seed=11)
    with server.client() as c:
        r = upload(c, "parity.npy", npy_bytes(kp), wait="true")
        assert r.status_code == 200, r.text
        batch = r.json()["detections"]

    with connect(server.url, input="keypoints", fps=30.0) as stream:
        for frame in kp:
            stream.send_keypoints(frame)
        ended = stream.end(timeout=120)
        events = [e for e in stream.events(timeout=60) if getattr(e, "type", "") == "gesture_end"]
    assert ended is not None and ended.frames_dropped == 0 and ended.frames_processed == len(kp)
    live = [
        {
            "class_id": e.class_id,
            "label": e.label,
            "score": e.score,
            "start_frame": e.start_frame,
            "end_frame": e.end_frame,
            "start_s": e.start_time,
            "end_s": e.end_time,
        }
        for e in events
    ]
    key = lambda d: (d["start_frame"], d["end_frame"], d["class_id"], -d["score"])  # noqa: E731
    assert live, "the stream produced no gesture_end events; the parity check would be vacuous"
    assert sorted(batch, key=key) == sorted(live, key=key)


def test_features_npy_and_listing(server):
    from service.contract.features import keypoints_to_steps

    steps = keypoints_to_steps(synth(400, seed=5))
    with server.client() as c:
        r = upload(c, "steps.npy", npy_bytes(steps))
        assert r.status_code == 202, r.text
        assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
        job, _ = wait_job(c, r.json()["id"])
        assert job["state"] == "done" and job["input_kind"] == "features"
        assert job["progress"]["frames_total"] == 400

        page = c.get("/v1/jobs", params={"limit": 1}).json()
        assert page["total"] >= 1 and len(page["jobs"]) == 1 and page["jobs"][0]["id"] == job["id"]
        assert page["next"] == "/v1/jobs?offset=1&limit=1"
        assert all(j["state"] == "done" for j in c.get("/v1/jobs", params={"state": "done"}).json()["jobs"])


# ---- video path (real MediaPipe pose) ----


@pytest.mark.parametrize("name", ["astronaut.mp4", "astronaut.avi"])
def test_video_upload_job_progress_results(server, videos, name):
    path = videos / name
    frames = int(cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FRAME_COUNT))
    with server.client() as c, path.open("rb") as f:
        r = c.post("/v1/detect", files={"file": (name, f)})
        assert r.status_code == 202, r.text
        assert r.json()["state"] in ("queued", "running")
        job, history = wait_job(c, r.json()["id"])
    assert job["state"] == "done", job
    assert job["input_kind"] == "video" and job["fps"] == 30.0
    assert job["progress"]["frames_done"] == job["progress"]["frames_total"] == frames
    done = [h["progress"]["frames_done"] for h in history]
    assert done == sorted(done), "progress never goes backwards"
    with server.client() as c:
        result = c.get(f"/v1/jobs/{job['id']}/result.json").json()
        assert result["frames"] == frames and result["input_kind"] == "video"
        assert result["count"] == len(result["detections"])
        assert c.get(f"/v1/jobs/{job['id']}/result.png").status_code == 200


def test_delete_cancels_a_running_job_then_removes_it(server, videos):
    long_video = astronaut_video(videos / "long.mp4", frames=300)
    with server.client() as c:
        job_id = upload(c, "long.mp4", long_video.read_bytes()).json()["id"]
        deadline = time.monotonic() + 120
        while c.get(f"/v1/jobs/{job_id}").json()["progress"]["frames_done"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = c.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 202
        job, _ = wait_job(c, job_id)
        assert job["state"] == "cancelled" and job["progress"]["frames_done"] < 300
        assert c.get(f"/v1/jobs/{job_id}/result.json").status_code == 409
        assert c.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404
    assert not (server.app.state.jobs.store.job_dir(job_id)).exists()


# ---- bad input: each answered with a 4xx naming the problem, before any job exists ----


@pytest.mark.parametrize(
    ("name", "status", "words"),
    [
        ("notvideo.mp4", 422, "not a video"),
        ("truncated.mp4", 422, "truncated"),
        ("zero.mp4", 422, "no video frames"),
        ("codec.avi", 415, "codec 'QQQQ'"),
    ],
)
def test_bad_videos_are_refused(server, videos, name, status, words):
    with server.client() as c:
        before = c.get("/v1/jobs").json()["total"]
        r = upload(c, name, (videos / name).read_bytes())
        assert r.status_code == status, r.text
        assert words in r.json()["detail"] and name in r.json()["detail"]
        assert c.get("/v1/jobs").json()["total"] == before
    assert not list(server.app.state.jobs.store.tmp_dir.iterdir()), "refused uploads leave no temp file"


def test_bad_arrays_and_types_are_refused(server):
    with server.client() as c:
        r = upload(c, "notes.txt", b"hello")
        assert r.status_code == 415 and ".txt" in r.json()["detail"]
        r = upload(c, "broken.npy", b"\x93NUMPY garbage header")
        assert r.status_code == 422 and ".npy" in r.json()["detail"]
        r = upload(c, "text.npy", b"just text")
        assert r.status_code == 422 and "not a .npy file" in r.json()["detail"]
        r = upload(c, "wrongdim.npy", npy_bytes(np.zeros((40, 100), np.float32)))
        assert r.status_code == 422 and "wrong feature dimension 100" in r.json()["detail"]
        r = upload(c, "ints.npy", npy_bytes(np.zeros((40, KEYPOINT_DIM), np.int32)))
        assert r.status_code == 422 and "floating-point" in r.json()["detail"]
        r = c.post("/v1/detect", content=b"raw", headers={"content-type": "application/octet-stream"})
        assert r.status_code == 415 and "multipart" in r.json()["detail"]
        r = c.post("/v1/detect", files={"other": ("a.npy", b"x")})
        assert r.status_code == 400 and "'file'" in r.json()["detail"]


def test_unknown_job_is_404(server):
    with server.client() as c:
        assert c.get("/v1/jobs/0123456789abcdef").status_code == 404
        assert c.get("/v1/jobs/0123456789abcdef/result.json").status_code == 404
        assert c.delete("/v1/jobs/0123456789abcdef").status_code == 404
        assert "no job" in c.get("/v1/jobs/nope").json()["detail"]


def test_disk_full_fails_the_job_and_the_server_keeps_serving(server):
    runner = server.app.state.jobs
    kp = npy_bytes(synth(200, seed=2))
    runner.writer = AtomicWriter(opener=FullDisk(quota=0))
    try:
        with server.client() as c:
            r = upload(c, "full.npy", kp)
            # The upload itself goes through the same writer: refused with 507, nothing kept.
            assert r.status_code == 507 and "disk is full" in r.json()["detail"]
            runner.writer = AtomicWriter(opener=FullDisk(quota=len(kp) + 10_000))  # upload fits, results do not
            r = upload(c, "full.npy", kp)
            assert r.status_code == 202, r.text
            job, _ = wait_job(c, r.json()["id"])
            assert job["state"] == "failed" and job["error"].startswith("disk full")
            assert "No space left" in job["error"]
            assert c.get(f"/v1/jobs/{job['id']}/result.json").status_code == 409
    finally:
        runner.writer = AtomicWriter()
    job_dir = runner.store.job_dir(job["id"])
    assert [p.name for p in job_dir.iterdir()] == ["input.npy"], "no partial result set left behind"
    with server.client() as c:  # still serving
        r = upload(c, "after.npy", kp, wait="true")
        assert r.status_code == 200 and r.json()["job"]["state"] == "done"


# ---- limits ----


def test_oversize_upload_is_413(tight):
    big = npy_bytes(np.zeros((1100, KEYPOINT_DIM), np.float32))  # 1.08 MiB > 1 MiB
    with tight.client() as c:
        r = upload(c, "big.npy", big)
        assert r.status_code == 413 and "limit of 1 MiB" in r.json()["detail"]

        # Chunked (no Content-Length): the cap is enforced while the body streams in.
        def chunks():
            boundary = b"xyzBOUNDARY"
            yield (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.npy"\r\n\r\n')
            for i in range(0, len(big), 65536):
                yield big[i : i + 65536]
            yield b"\r\n--" + boundary + b"--\r\n"

        r = c.post(
            "/v1/detect",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=xyzBOUNDARY"},
        )
        assert r.status_code == 413
    assert not list(tight.app.state.jobs.store.tmp_dir.iterdir())


def test_too_long_input_is_413(tight):
    kp = np.zeros((100, KEYPOINT_DIM), np.float32)
    with tight.client() as c:
        r = upload(c, "long.npy", npy_bytes(kp), fps="10")  # 10 s > 5 s
        assert r.status_code == 413 and "10.0 s" in r.json()["detail"] and "5 s" in r.json()["detail"]


def test_too_many_jobs_is_429_with_retry_after(tight, videos):
    # Under both limits (1 MiB, 5 s) and slow enough (MediaPipe per frame) to hold the only slot.
    clip = astronaut_video(videos / "busy.mp4", frames=140, size=(192, 192)).read_bytes()
    assert len(clip) < 2**20
    with tight.client() as c:
        first = upload(c, "busy.mp4", clip)
        assert first.status_code == 202, first.text
        r = upload(c, "second.npy", npy_bytes(np.zeros((40, KEYPOINT_DIM), np.float32)))
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert "limit" in r.json()["detail"]
        assert c.delete(f"/v1/jobs/{first.json()['id']}").status_code == 202  # frees the slot
        wait_job(c, first.json()["id"])
        r = upload(c, "third.npy", npy_bytes(np.zeros((40, KEYPOINT_DIM), np.float32)))
        assert r.status_code == 202
        assert wait_job(c, r.json()["id"])[0]["state"] == "done"


def test_wait_beyond_sync_limit_answers_202(tight):
    kp = np.zeros((120, KEYPOINT_DIM), np.float32)  # 4 s > sync_max_s = 1 s
    with tight.client() as c:
        r = upload(c, "async.npy", npy_bytes(kp), wait="true")
        assert r.status_code == 202 and r.json()["state"] in ("queued", "running", "done")
        wait_job(c, r.json()["id"])
