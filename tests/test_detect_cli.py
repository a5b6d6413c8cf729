"""``mgstream detect FILE``: the real command in a subprocess against a real server on loopback."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from service.config import Settings
from tests.batchkit import astronaut_video, model_for_tests, serve
from tests.streamkit import REPO

API_KEY = "cli-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    settings = Settings(
        model_path=model_for_tests(tmp), data_dir=tmp / "data", api_keys=[API_KEY], providers=["CPUExecutionProvider"]
    )
    with serve(settings) as live:
        yield live


def mgstream(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_detect_video_writes_json_csv_png_to_out(server, tmp_path):
    video = astronaut_video(tmp_path / "clip.mp4", frames=45)
    out = tmp_path / "results"
    proc = mgstream("detect", str(video), "--url", server.url, "--api-key", API_KEY, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.split()
    assert paths == [str(out / f"clip.mgstream.{ext}") for ext in ("json", "csv", "png")]
    body = json.loads((out / "clip.mgstream.json").read_text())
    assert body["filename"] == "clip.mp4" and body["frames"] == 45
    rows = list(csv.reader((out / "clip.mgstream.csv").open()))
    assert len(rows) == body["count"]
    assert (out / "clip.mgstream.png").read_bytes()[:4] == b"\x89PNG"
    assert "detections" in proc.stderr


def test_detect_npy_next_to_input_and_no_wait(server, tmp_path):
    kp = tmp_path / "seq.npy"
    np.save(kp, np.random.default_rng(1).normal(0.5, 0.1, (200, 258)).astype(np.float32))
    proc = mgstream("detect", str(kp), "--url", server.url, "--api-key", API_KEY)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "seq.mgstream.json").is_file() and (tmp_path / "seq.mgstream.png").is_file()

    proc = mgstream("detect", str(kp), "--url", server.url, "--api-key", API_KEY, "--no-wait")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert len(job_id) == 32
    with server.client(headers={"X-API-Key": API_KEY}) as c:
        assert c.get(f"/v1/jobs/{job_id}").status_code == 200


def test_detect_reports_refusals_clearly(server, tmp_path):
    bad = tmp_path / "letter.mp4"
    bad.write_bytes(b"not a film\n" * 100)
    proc = mgstream("detect", str(bad), "--url", server.url, "--api-key", API_KEY)
    assert proc.returncode == 1 and "not a video" in proc.stderr

    proc = mgstream("detect", str(bad), "--url", server.url)  # no key
    assert proc.returncode == 1 and "API key" in proc.stderr

    proc = mgstream("detect", str(bad), "--url", "http://127.0.0.1:9")  # nothing listens there
    assert proc.returncode == 1 and "cannot reach" in proc.stderr


def test_jobs_api_requires_the_key(server):
    with server.client() as c:
        assert c.get("/v1/jobs").status_code == 401
        assert c.post("/v1/detect", files={"file": ("a.npy", b"x")}).status_code == 401
    with server.client(headers={"X-API-Key": API_KEY}) as c:
        assert c.get("/v1/jobs").status_code == 200
