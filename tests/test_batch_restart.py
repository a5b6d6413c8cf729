"""Durability across a crash: ``mgstream serve`` in a subprocess is SIGKILLed mid-job and restarted.

First kill: the interrupted job is resumed from its stored upload. Second kill (its second attempt):
the job is failed with a reason instead of being retried forever. Throughout, a completed job and
its results survive, and an upload cut off by the crash never becomes a job.
"""

from __future__ import annotations

import socket
import time

import httpx
import numpy as np

from tests.batchkit import astronaut_video, model_for_tests, npy_bytes, wait_job
from tests.streamkit import run_server


def _wait_running(client: httpx.Client, job_id: str, timeout: float = 120.0) -> dict:
    """Until the job has featurized some frames (it is truly mid-job)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] == "running" and job["progress"]["frames_done"] > 0:
            return job
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not start")


def _start_partial_upload(port: int) -> socket.socket:
    """Send the headers and the first part of a multipart upload, then stall."""
    sock = socket.create_connection(("127.0.0.1", port))
    body_start = (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="cut.npy"\r\n\r\n'
        + npy_bytes(np.zeros((2000, 258), np.float32))[:50_000]
    )
    sock.sendall(
        b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
        b"Content-Length: 3000000\r\n\r\n" + body_start
    )
    return sock


def test_kill_mid_job_then_resume_then_fail_cleanly(tmp_path):
    model = model_for_tests(tmp_path)
    video = astronaut_video(tmp_path / "interview.mp4", frames=240)
    kp = np.random.default_rng(0).normal(0.5, 0.1, (300, 258)).astype(np.float32)

    with run_server(model, tmp_path) as srv, httpx.Client(base_url=srv.http, timeout=120) as c:
        done = c.post("/v1/detect", params={"wait": "true"}, files={"file": ("done.npy", npy_bytes(kp))})
        assert done.status_code == 200, done.text
        done_id = done.json()["job"]["id"]
        result = c.get(f"/v1/jobs/{done_id}/result.json").content
        job_id = c.post("/v1/detect", files={"file": ("interview.mp4", video.read_bytes())}).json()["id"]
        _wait_running(c, job_id)
        sock = _start_partial_upload(srv.port)
        time.sleep(0.5)  # let the server write part of that upload into tmp/
        srv.proc.kill()
        srv.proc.wait()
        sock.close()
    assert list((tmp_path / "data" / "tmp").iterdir()), "the cut upload was being written when the server died"

    with run_server(model, tmp_path) as srv, httpx.Client(base_url=srv.http, timeout=120) as c:
        assert not list((tmp_path / "data" / "tmp").iterdir()), "the partial upload was swept on start-up"
        listing = c.get("/v1/jobs").json()
        assert {j["id"] for j in listing["jobs"]} == {done_id, job_id}, "the cut upload never became a job"
        assert c.get(f"/v1/jobs/{done_id}/result.json").content == result
        job = _wait_running(c, job_id)
        assert job["attempts"] == 2 and "resumed after a server restart" in job["note"]
        srv.proc.kill()
        srv.proc.wait()

    with run_server(model, tmp_path) as srv, httpx.Client(base_url=srv.http, timeout=120) as c:
        job, _ = wait_job(c, job_id, timeout=30)
        assert job["state"] == "failed"
        assert "server stopped while this job was running" in job["error"] and "giving up" in job["error"]
        assert job["finished_at"] is not None
        # Completed work is untouched and new work is taken.
        assert c.get(f"/v1/jobs/{done_id}").json()["state"] == "done"
        assert c.get(f"/v1/jobs/{done_id}/result.json").content == result
        assert c.get(f"/v1/jobs/{done_id}/result.png").status_code == 200
        again = c.post("/v1/detect", params={"wait": "true"}, files={"file": ("again.npy", npy_bytes(kp))})
        assert again.status_code == 200
        assert again.json()["detections"] == c.get(f"/v1/jobs/{done_id}/result.json").json()["detections"]


def test_graceful_stop_requeues_and_the_job_completes_after_restart(tmp_path):
    model = model_for_tests(tmp_path)
    video = astronaut_video(tmp_path / "short.mp4", frames=90)
    with run_server(model, tmp_path) as srv, httpx.Client(base_url=srv.http, timeout=120) as c:
        job_id = c.post("/v1/detect", files={"file": ("short.mp4", video.read_bytes())}).json()["id"]
        _wait_running(c, job_id)
    # run_server stopped it with SIGTERM: the job went back to the queue, not to "failed".
    with run_server(model, tmp_path) as srv, httpx.Client(base_url=srv.http, timeout=120) as c:
        job, _ = wait_job(c, job_id)
        assert job["state"] == "done", job
        assert job["progress"]["frames_done"] == 90
        assert c.get(f"/v1/jobs/{job_id}/result.csv").status_code == 200
