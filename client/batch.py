"""Blocking HTTP client for batch detection jobs (``POST /v1/detect``, ``/v1/jobs``).

from client.batch import BatchClient
with BatchClient("http://127.0.0.1:8000") as api:
    job = api.submit("interview.mp4")
    job = api.wait(job["id"], on_progress=lambda j: print(j["progress"]))
    paths = api.download_results(job["id"], "out/")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from client.streaming import API_KEY_HEADER, http_base_url

RESULT_FORMATS = ("json", "csv", "png")
FINISHED = ("done", "failed", "cancelled")


class BatchError(Exception):
    """The server refused a request; ``status`` and ``detail`` come from its answer."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        self.body = body


class JobFailed(BatchError):
    """The job ended failed or cancelled; ``job`` is its last record."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(200, f"job {job['id']} {job['state']}: {job.get('error')}", body=job)
        self.job = job


def _raise_for(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    try:
        body = resp.json()
        detail = body.get("detail", resp.text) if isinstance(body, dict) else resp.text
    except ValueError:
        body, detail = None, resp.text
    retry = resp.headers.get("Retry-After")
    raise BatchError(resp.status_code, str(detail), float(retry) if retry else None, body)


class BatchClient:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        self._http = httpx.Client(base_url=http_base_url(url), headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> BatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- jobs ----

    def submit(
        self,
        path: str | Path,
        *,
        wait: bool = False,
        fps: float | None = None,
        video_id: str | None = None,
        score_threshold: float | None = None,
        wait_timeout: float = 600.0,
    ) -> dict[str, Any]:
        """Upload a file (streamed from disk). Returns the job record, or with ``wait`` and a short enough
        input ``{"job": ..., "detections": [...], ...}``. Raises BatchError on 4xx/5xx (429 carries
        ``retry_after``)."""
        path = Path(path)
        params: dict[str, Any] = {"wait": str(wait).lower()}
        for key, value in (("fps", fps), ("video_id", video_id), ("score_threshold", score_threshold)):
            if value is not None:
                params[key] = value
        timeout = httpx.Timeout(
            self._http.timeout.connect,
            read=wait_timeout if wait else self._http.timeout.read,
            write=None,
            pool=None,
        )
        with path.open("rb") as f:
            resp = self._http.post("/v1/detect", params=params, files={"file": (path.name, f)}, timeout=timeout)
        _raise_for(resp)
        return resp.json()

    def job(self, job_id: str) -> dict[str, Any]:
        resp = self._http.get(f"/v1/jobs/{job_id}")
        _raise_for(resp)
        return resp.json()

    def jobs(self, *, offset: int = 0, limit: int = 50, state: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if state:
            params["state"] = state
        resp = self._http.get("/v1/jobs", params=params)
        _raise_for(resp)
        return resp.json()

    def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 0.5,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is finished; returns it when done, raises JobFailed otherwise."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["state"] in FINISHED:
                if job["state"] != "done":
                    raise JobFailed(job)
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(poll_s)

    def result(self, job_id: str, fmt: str = "json", *, scores: bool = False) -> bytes:
        if fmt not in RESULT_FORMATS:
            raise ValueError(f"format must be one of {RESULT_FORMATS}")
        params = {"scores": "true"} if scores else {}
        resp = self._http.get(f"/v1/jobs/{job_id}/result.{fmt}", params=params)
        _raise_for(resp)
        return resp.content

    def detections(self, job_id: str) -> list[dict[str, Any]]:
        import json

        return json.loads(self.result(job_id, "json"))["detections"]

    def download_results(self, job_id: str, out_dir: str | Path, stem: str | None = None) -> dict[str, Path]:
        """Write ``<stem>.mgstream.json``, ``.csv`` and ``.png`` into ``out_dir``; returns format -> path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = stem or job_id
        paths = {}
        for fmt in RESULT_FORMATS:
            path = out_dir / f"{stem}.mgstream.{fmt}"
            path.write_bytes(self.result(job_id, fmt))
            paths[fmt] = path
        return paths

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel an active job (returns its record), or delete a finished one and its files (None)."""
        resp = self._http.delete(f"/v1/jobs/{job_id}")
        _raise_for(resp)
        return resp.json() if resp.status_code == 202 else None

    delete = cancel
