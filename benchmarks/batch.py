"""Batch detection speed, as a multiple of real time, through the real HTTP job path.

    python benchmarks/batch.py [--model PATH] [--keypoint-minutes 10] [--video-seconds 20] [--runs 2]

A server (``create_app`` under uvicorn, loopback) takes each input as a job; the figures are media
duration divided by the job's processing time (started -> finished, i.e. featurize + detect +
write results) and by the client's wall time (upload + queue + processing + polling).

- keypoints: a synthetic sequence from ``models.synth`` uploaded as a (T, 258) .npy;
- video: ``skimage.data.astronaut()`` at 640x480 with a small sway, written with OpenCV (mp4v),
  through the real MediaPipe pose featurizer.

The model is the shipped default when present, else the test suite's tiny ONNX model (said so in the
output): the detector's cost differs, the featurizer's does not.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.config import DEFAULT_MODEL, Settings  # noqa: E402


def _model(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL, "shipped default"
    from tests.streamkit import build_tiny_model

    return build_tiny_model(tmp / "tiny.onnx"), "TINY TEST MODEL (no shipped default found)"


def _keypoints(minutes: float) -> np.ndarray:
    from models.synth import generate_sequence

    kp, _ = generate_sequence(seed=7, num_frames=int(minutes * 60 * 30))
    return kp.astype(np.float32)


def _video(path: Path, seconds: float) -> Path:
    import cv2
    from skimage import data

    size = (640, 480)
    img = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (480, 480))
    canvas = np.full((480, 640, 3), 128, np.uint8)
    canvas[:, 80:560] = img
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, size)
    for i in range(int(seconds * 30)):
        shift = np.float32([[1, 0, 6 * np.sin(i / 8)], [0, 1, 3 * np.cos(i / 11)]])
        writer.write(cv2.warpAffine(canvas, shift, size, borderMode=cv2.BORDER_REPLICATE))
    writer.release()
    return path


def _run_job(client, name: str, payload: bytes) -> tuple[dict, float]:
    t0 = time.perf_counter()
    r = client.post("/v1/detect", files={"file": (name, payload)})
    r.raise_for_status()
    job_id = r.json()["id"]
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if job["state"] != "done":
        raise RuntimeError(f"job {job_id} {job['state']}: {job['error']}")
    return job, wall


def _processing_s(job: dict) -> float:
    parse = datetime.fromisoformat
    return (
        parse(job["finished_at"].replace("Z", "+00:00")) - parse(job["started_at"].replace("Z", "+00:00"))
    ).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--keypoint-minutes", type=float, default=10.0)
    ap.add_argument("--video-seconds", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()

    import httpx

    from tests.batchkit import serve

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model, origin = _model(args.model, tmp)
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"python {platform.python_version()}"
        )
        print(f"model: {model} ({origin})")
        kp = _keypoints(args.keypoint_minutes)
        buf = io.BytesIO()
        np.save(buf, kp)
        video = _video(tmp / "astronaut.mp4", args.video_seconds).read_bytes()
        settings = Settings(
            model_path=model, data_dir=tmp / "data", providers=["CPUExecutionProvider"], max_concurrent_jobs=1
        )
        with serve(settings) as live, httpx.Client(base_url=live.url, timeout=600) as client:
            for label, name, payload, media_s in (
                (f"keypoints .npy ({args.keypoint_minutes:g} min)", "kp.npy", buf.getvalue(), len(kp) / 30.0),
                (f"video mp4 640x480 + pose ({args.video_seconds:g} s)", "astronaut.mp4", video, args.video_seconds),
            ):
                proc, walls = [], []
                for _ in range(args.runs):
                    job, wall = _run_job(client, name, payload)
                    proc.append(_processing_s(job))
                    walls.append(wall)
                p, w = statistics.median(proc), statistics.median(walls)
                print(
                    f"{label:42s} processing {p:7.2f} s = {media_s / p:7.1f}x real time | "
                    f"end to end {w:7.2f} s = {media_s / w:7.1f}x | {job['detections']} detections "
                    f"(median of {args.runs})"
                )


if __name__ == "__main__":
    main()
