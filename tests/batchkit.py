"""Test kit for batch jobs: the model to use, real video files written with OpenCV, an in-process server.

The in-process server is real uvicorn on a loopback port in a thread, so tests talk HTTP to it and
can still reach ``app.state`` (e.g. to hand the job runner a writer that simulates a full disk).
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np

from service.config import DEFAULT_MODEL
from tests.streamkit import build_tiny_model, free_port

FINISHED = ("done", "failed", "cancelled")


def model_for_tests(tmp_dir: Path) -> Path:
    """The shipped default model when present, else the streaming tests' tiny real ONNX model."""
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL
    return build_tiny_model(tmp_dir / "tiny.onnx")


def astronaut_video(
    path: Path,
    *,
    frames: int = 60,
    fps: float = 30.0,
    fourcc: str = "mp4v",
    size: tuple[int, int] = (384, 384),
) -> Path:
    """skimage's astronaut photo with a small sway (a person for the pose featurizer), written by OpenCV."""
    from skimage import data

    img = cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), size)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} to {path}"
    for i in range(frames):
        shift = np.float32([[1, 0, 4 * np.sin(i / 6)], [0, 1, 2 * np.cos(i / 9)]])
        writer.write(cv2.warpAffine(img, shift, size, borderMode=cv2.BORDER_REFLECT))
    writer.release()
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@dataclass
class LiveServer:
    app: object
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120.0), **kw)


@contextlib.contextmanager
def serve(settings) -> Iterator[LiveServer]:
    """``create_app(settings)`` under uvicorn on a free loopback port, in a thread; lifespan included."""
    import uvicorn

    from service.app import create_app

    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("in-process server did not start")
        time.sleep(0.05)
    try:
        yield LiveServer(app, port)
    finally:
        server.should_exit = True
        thread.join(30)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300.0) -> tuple[dict, list[dict]]:
    """Poll a job to its end; returns the last record and every record seen (progress history)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = client.get(f"/v1/jobs/{job_id}")
        resp.raise_for_status()
        job = resp.json()
        seen.append(job)
        if job["state"] in FINISHED:
            return job, seen
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} not finished after {timeout} s: {seen[-1] if seen else None}")


class FullDisk:
    """An opener for :class:`service.jobs.results.AtomicWriter`: files that take ``quota`` bytes in total,
    then fail with ENOSPC exactly as a full file system does."""

    def __init__(self, quota: int = 0) -> None:
        self.left = quota

    def __call__(self, path: Path):
        return _QuotaFile(open(path, "wb"), self)  # noqa: SIM115 - closed by the writer


class _QuotaFile:
    def __init__(self, f, disk: FullDisk) -> None:
        self._f, self._disk = f, disk

    def write(self, data) -> int:
        if len(data) > self._disk.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._disk.left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()
