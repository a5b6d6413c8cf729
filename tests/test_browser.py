"""The browser demo in real headless Chromium, with a fake camera fed from a .y4m file, against a real server.

Chromium is driven through the DevTools protocol over a plain WebSocket (the ``websockets`` package), so no
driver is needed. The page exposes ``window.mgstreamState``; the server confirms what arrived (its ``status``
messages and ``/metrics``). A screenshot goes to tmp_path and to benchmarks/out/ (gitignored).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect as ws_connect

from service.contract.features import FRAME_DIM
from tests.clientkit import serve, stop
from tests.streamkit import REPO, Gesture, build_tiny_model, free_port, synth_keypoints

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

SCREENSHOT_DIR = REPO / "benchmarks" / "out"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-device-for-media-stream",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--remote-debugging-port=0",
    "--window-size=1400,1000",
]


def _chromium() -> str:
    """Debian's chromium, installed with apt when missing; skip loudly when that is impossible."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = "Chromium is missing"
    if shutil.which("apt-get") and os.geteuid() == 0:
        result = subprocess.run(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
            shell=True,
            capture_output=True,
            text=True,
            timeout=900,
        )
        found = shutil.which("chromium")
        if found:
            return found
        reason += f" and `apt-get install chromium` failed: {result.stderr.strip()[-300:]}"
    else:
        reason += " and cannot be installed here (needs root and apt-get)"
    warnings.warn(f"BROWSER TEST SKIPPED: {reason}", stacklevel=2)
    pytest.skip(f"BROWSER TEST SKIPPED: {reason}")


def write_y4m(path: Path, size: tuple[int, int] = (320, 240), fps: int = 15) -> Path:
    """A YUV4MPEG2 clip that Chromium loops as the camera: the astronaut photo swaying a little for 3 s,
    then 2 s of an empty grey frame (the person leaves, so detections start and end)."""
    from skimage.data import astronaut

    w, h = size
    photo = cv2.resize(astronaut(), (h, h))  # RGB, square, centred on a grey canvas
    x0 = (w - h) // 2
    present, absent = 3 * fps, 2 * fps
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(present + absent):
            frame = np.full((h, w, 3), 128, np.uint8)
            if i < present:
                angle = 2.0 * np.sin(2 * np.pi * i / present)
                m = cv2.getRotationMatrix2D((h / 2, h / 2), angle, 1.0)
                frame[:, x0 : x0 + h] = cv2.warpAffine(photo, m, (h, h), borderMode=cv2.BORDER_REPLICATE)
            out.write(b"FRAME\n")
            out.write(cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420).tobytes())  # planar Y, U, V
    return path


def build_presence_model(path: Path) -> Path:
    """The tiny test detector rewired so that class 1 follows the *pose* presence flag (class 2 stays on the
    right hand): the astronaut clip then yields real gesture_start/gesture_end through MediaPipe."""
    import onnx
    from onnx import numpy_helper

    build_tiny_model(path)
    model = onnx.load(str(path))
    for i, init in enumerate(model.graph.initializer):
        if init.name == "flag_idx":
            flags = numpy_helper.to_array(init).copy()
            flags[0] = FRAME_DIM - 3  # presence flags: pose, left hand, right hand
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(flags, "flag_idx"))
    onnx.save(model, str(path))
    return path


class Browser:
    """One headless Chromium process and a DevTools session on its page."""

    def __init__(self, binary: str, url: str, profile: Path, extra: list[str]) -> None:
        self.proc = subprocess.Popen(
            [binary, *FLAGS, *extra, f"--user-data-dir={profile}", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped as a whole, by id
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        while True:
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            pages = [t for t in targets if t["type"] == "page"]
            if pages:
                self.ws_url = pages[0]["webSocketDebuggerUrl"]
                break
            if time.monotonic() > deadline:
                raise RuntimeError("Chromium opened no page")
            time.sleep(0.1)
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        async with ws_connect(self.ws_url, max_size=None) as cdp:
            msg_id = next(self._ids)
            await cdp.send(json.dumps({"id": msg_id, "method": method, "params": params}))
            while True:
                reply = json.loads(await cdp.recv())
                if reply.get("id") == msg_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]

    def upload(self, form_id: str, input_id: str, path: Path) -> None:
        """Choose ``path`` in a file input and submit its form (one DevTools session: object ids are
        only valid inside the session that made them)."""

        async def run() -> None:
            async with ws_connect(self.ws_url, max_size=None) as cdp:

                async def call(method: str, **params: Any) -> dict[str, Any]:
                    msg_id = next(self._ids)
                    await cdp.send(json.dumps({"id": msg_id, "method": method, "params": params}))
                    while True:
                        reply = json.loads(await cdp.recv())
                        if reply.get("id") == msg_id:
                            assert "error" not in reply, reply
                            return reply["result"]

                found = await call("Runtime.evaluate", expression=f"document.getElementById('{input_id}')")
                await call("DOM.setFileInputFiles", files=[str(path)], objectId=found["result"]["objectId"])
                await call("Runtime.evaluate", expression=f"document.getElementById('{form_id}').requestSubmit()")

        asyncio.run(run())

    def evaluate(self, expression: str) -> Any:
        result = asyncio.run(self.call("Runtime.evaluate", expression=expression, returnByValue=True))
        return result["result"].get("value")

    def state(self) -> dict[str, Any]:
        return json.loads(self.evaluate("JSON.stringify(window.mgstreamState || null)") or "null") or {}

    def wait_for(self, what: str, check: Callable[[dict[str, Any]], bool], timeout: float = 45) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = self.state()
            if state and check(state):
                return state
            time.sleep(0.5)
        raise AssertionError(f"page never reached: {what}; last state: {_brief(state)}")

    def screenshot(self, *paths: Path) -> None:
        data = asyncio.run(self.call("Page.captureScreenshot", format="png"))["data"]
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _brief(state: dict[str, Any]) -> dict[str, Any]:
    keys = ("connection", "camera", "framesSent", "eventsReceived", "lastStatus", "lastError", "lastClose")
    return {k: state.get(k) for k in keys}


@contextlib.contextmanager
def browser(url: str, tmp: Path, y4m: Path | None, extra: list[str]) -> Iterator[Browser]:
    profile = tmp / f"profile-{time.monotonic_ns()}"
    profile.mkdir()
    camera = [f"--use-file-for-fake-video-capture={y4m}"] if y4m else []
    b = Browser(_chromium(), url, profile, [*camera, *extra])
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_presence_model(tmp_path_factory.mktemp("model") / "presence.onnx")


def _metric(port: int, name: str) -> float:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_page_streams_the_fake_camera_and_survives_a_server_restart(model: Path, tmp_path: Path) -> None:
    _chromium()  # install or skip before starting anything
    y4m = write_y4m(tmp_path / "camera.y4m")
    port = free_port()
    server = serve(model, port, tmp_path)
    url = f"http://127.0.0.1:{port}/?autostart=1&fps=10"
    try:
        with browser(url, tmp_path, y4m, ["--use-fake-ui-for-media-stream"]) as page:
            # Frames arrive: the server's own status messages count them, and /metrics agrees.
            state = page.wait_for(
                "streaming, with the server confirming frames",
                lambda s: s["connection"] == "streaming" and (s["lastStatus"] or {}).get("frames_processed", 0) >= 10,
            )
            assert state["camera"] == "granted" and state["ready"]["input"] == "jpeg"
            assert _metric(port, "mgstream_frames_total") >= 10
            assert state["eventsReceived"] >= 2  # ready + status at least
            # What the user sees: the state badge, the counters, the event log.
            shown = page.evaluate(
                "JSON.stringify({badge: document.getElementById('connection').textContent,"
                " body: document.body.dataset.connection,"
                " sent: Number(document.getElementById('stat-sent').textContent),"
                " log: document.getElementById('events').textContent,"
                " lag: document.getElementById('lag').textContent})"
            )
            shown = json.loads(shown)
            assert shown["badge"].startswith("streaming") and shown["body"] == "streaming"
            assert shown["sent"] >= 10 and "ready" in shown["log"] and shown["lag"].endswith(" ms")
            # Gestures: the person comes and goes every 5 s of the looped clip.
            state = page.wait_for("a gesture start and end", lambda s: s["gestureEnds"] >= 1, 40)
            assert state["gestureStarts"] >= state["gestureEnds"]
            label = state["recent"][0]["label"]
            assert label in page.evaluate("document.getElementById('events').textContent")
            # While the person is in view again, the gesture in progress is drawn over the video.
            state = page.wait_for("a gesture in progress", lambda s: bool(s["active"]), 20)
            assert label in page.evaluate("document.getElementById('current').textContent")

            # The upload form: a keypoints file becomes a batch job; the page follows it to the timeline PNG.
            recording = tmp_path / "recording.npy"
            np.save(recording, synth_keypoints(240, [Gesture(2, 60, 150)], seed=1))
            page.upload("upload", "upload-file", recording)
            state = page.wait_for("the batch job done", lambda s: (s["job"] or {}).get("state") == "done", 60)
            page.wait_for("the job's results shown", lambda s: s.get("jobShown") is True, 30)  # fetched after done
            result = json.loads(
                page.evaluate(
                    "(() => { const img = document.getElementById('job-timeline');"
                    " const table = document.getElementById('job-detections');"
                    " return JSON.stringify({png: !img.hidden && img.naturalWidth > 0, table: !table.hidden,"
                    " rows: table.tBodies[0].rows.length, status: document.getElementById('job-state').textContent})"
                    " })()"
                )
            )
            assert result["png"] and result["table"], result
            assert result["rows"] == min(state["job"]["detections"], 200) and result["status"].startswith("done")
            page.screenshot(tmp_path / "browser-demo.png", SCREENSHOT_DIR / "browser-demo.png")

            # The server dies (no close frame): the page notices and retries with backoff...
            stop(server)
            page.wait_for("reconnecting", lambda s: s["connection"] in ("reconnecting", "connecting"), 20)
            # ...and streams again once it is back on the same port.
            server = serve(model, port, tmp_path)
            state = page.wait_for(
                "streaming again after the restart",
                lambda s: s["connection"] == "streaming" and s["reconnects"] >= 1 and s["lastStatus"] is not None,
                60,
            )
            assert state["lastClose"]["code"] == 1006
            before = state["framesSent"]
            page.wait_for("frames flowing after the restart", lambda s: s["framesSent"] >= before + 10, 20)
    finally:
        stop(server, signal.SIGTERM)
    assert (tmp_path / "browser-demo.png").stat().st_size > 10_000


def test_page_handles_a_refused_camera(model: Path, tmp_path: Path) -> None:
    _chromium()
    port = free_port()
    server = serve(model, port, tmp_path)
    try:
        # No fake-UI flag and prompts denied: getUserMedia rejects, as when a user clicks "Block".
        with browser(f"http://127.0.0.1:{port}/?autostart=1", tmp_path, None, ["--deny-permission-prompts"]) as page:
            state = page.wait_for("camera refused", lambda s: s["camera"] in ("denied", "unavailable"), 30)
            assert state["connection"] in ("camera-denied", "camera-unavailable")
            assert state["framesSent"] == 0
            message = page.evaluate("(m => m.hidden ? '' : m.textContent)(document.getElementById('camera-message'))")
            assert "camera" in message.lower()
            # Nothing was opened on the server for a page without a camera.
            assert _metric(port, "mgstream_sessions_active") == 0
            page.screenshot(tmp_path / "camera-refused.png", SCREENSHOT_DIR / "browser-camera-refused.png")
    finally:
        stop(server, signal.SIGTERM)
