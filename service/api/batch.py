"""Batch detection over HTTP: upload a file, watch its job, fetch JSON / CSV / PNG results.

POST /v1/detect                 multipart upload (field ``file``): a video, or a keypoints/features .npy
GET  /v1/jobs                   newest first, paged (offset, limit, state)
GET  /v1/jobs/{id}              state, progress, ETA, error, links to results
GET  /v1/jobs/{id}/result.json  detections (also .csv, scored CSV with ?scores=true, and .png)
DELETE /v1/jobs/{id}            cancels a queued/running job; removes a finished one with its files

Errors are JSON ``{"detail": "..."}`` naming the problem. Limits: 413 (upload size, duration),
429 + Retry-After (too many jobs), 415 (file type or codec), 422 (unreadable input), 507 (disk full).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from service.api.deps import require_api_key
from service.jobs import inputs
from service.jobs.results import RESULT_FILES, detections_csv, fsync_dir, read_detections_json
from service.jobs.runner import JobRunner, QueueFull, disk_full
from service.jobs.store import Job, JobNotFound, JobState
from service.jobs.upload import Upload, UploadError, receive_upload

router = APIRouter(prefix="/v1", tags=["batch"], dependencies=[Depends(require_api_key)])

MEDIA_TYPES = {"json": "application/json", "csv": "text/csv; charset=utf-8", "png": "image/png"}


def _runner(request: Request) -> JobRunner:
    runner = getattr(request.app.state, "jobs", None)
    if runner is None:
        raise HTTPException(503, "batch jobs are not available on this server")
    return runner


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_view(job: Job) -> dict[str, Any]:
    """The public shape of a job (docs/protocol.md describes it)."""
    base = f"/v1/jobs/{job.id}"
    links = {"self": base}
    if job.state == JobState.DONE:
        links.update({f"result.{fmt}": f"{base}/result.{fmt}" for fmt in RESULT_FILES})
    total = job.frames_total
    return {
        "id": job.id,
        "state": job.state,
        "input_kind": job.input_kind,
        "filename": job.filename,
        "video_id": job.video_id,
        "upload_bytes": job.upload_bytes,
        "fps": job.fps,
        "duration_s": round(job.duration_s, 3),
        "progress": {
            "frames_done": job.frames_done,
            "frames_total": total,
            "fraction": round(job.frames_done / total, 4) if total else 0.0,
            "phase": job.phase or None,
            "eta_s": None if job.eta_s is None else round(job.eta_s, 1),
        },
        "detections": job.detections,
        "error": job.error,
        "note": job.note,
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "links": links,
    }


def _get(runner: JobRunner, job_id: str) -> Job:
    try:
        return runner.store.get(job_id)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id}") from None


@router.post("/detect", status_code=202, responses={200: {"description": "with ?wait=true: the detections"}})
async def detect(
    request: Request,
    wait: bool = Query(False, description="answer with the detections when the input is short enough"),
    fps: float | None = Query(None, gt=0, le=1000, description=".npy inputs: frames per second (default: the model's)"),
    video_id: str | None = Query(None, max_length=128, description="id written in the scored CSV; default: file stem"),
    score_threshold: float | None = Query(None, ge=0.0, le=1.0),
) -> Response:
    runner = _runner(request)
    settings = runner.settings
    card = runner.pipeline.card
    try:
        with runner.reserve():
            upload = await receive_upload(
                request.stream(),
                request.headers.get("content-type"),
                request.headers.get("content-length"),
                runner.store.tmp_dir,
                int(settings.upload_max_mb * 2**20),
                runner.writer,
            )
            try:
                info = await asyncio.to_thread(inputs.probe, upload.path, upload.filename, card, fps)
                if info.duration_s > settings.max_video_s:
                    raise UploadError(
                        413,
                        f"input lasts {info.duration_s:.1f} s, over the limit of {settings.max_video_s:g} s",
                    )
                job = _create_job(runner, upload, info, video_id or upload.fields.get("video_id"), score_threshold)
            except BaseException:
                upload.discard()
                raise
    except QueueFull as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
    except UploadError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    except inputs.InputError as exc:
        msg = str(exc) if upload.filename in str(exc) else f"{upload.filename}: {exc}"
        raise HTTPException(exc.status, msg) from None
    except OSError as exc:
        if disk_full(exc):
            raise HTTPException(507, "the server's disk is full; the upload was discarded") from None
        raise

    location = {"Location": f"/v1/jobs/{job.id}"}
    if wait and job.duration_s <= settings.sync_max_s:
        job = await runner.wait(job.id)
        if job.state == JobState.DONE:
            body = _result_json(runner, job)
            return JSONResponse({"job": job_view(job), **body}, status_code=200, headers=location)
        status = 422 if (job.error or "").startswith("bad input") else 500
        return JSONResponse({"detail": job.error, "job": job_view(job)}, status_code=status, headers=location)
    return JSONResponse(job_view(job), status_code=202, headers=location)


def _create_job(
    runner: JobRunner, upload: Upload, info: inputs.InputInfo, video_id: str | None, threshold: float | None
) -> Job:
    """Move the complete upload into its job directory, then insert the record (in that order)."""
    job_id = Job.new_id()
    job_dir = runner.store.job_dir(job_id)
    job_dir.mkdir(parents=True)
    ext = inputs.extension_of(upload.filename)
    dest = job_dir / f"input{ext}"
    upload.path.replace(dest)
    fsync_dir(job_dir)
    job = Job(
        id=job_id,
        state=JobState.QUEUED,
        input_kind=info.kind,
        filename=upload.filename,
        input_path=runner.store.relative(dest),
        upload_bytes=upload.size,
        video_id=video_id or Path(upload.filename).stem,
        fps=info.fps,
        duration_s=info.duration_s,
        frames_total=info.frames,
        created_at=time.time(),
        options={} if threshold is None else {"score_threshold": threshold},
    )
    return runner.submit(job)


@router.get("/jobs")
async def list_jobs(
    request: Request,
    offset: int = Query(0, ge=0),
    limit: int = Query(50, ge=1, le=500),
    state: str | None = Query(None, pattern="^(queued|running|done|failed|cancelled)$"),
) -> dict[str, Any]:
    runner = _runner(request)
    jobs, total = runner.store.page(offset=offset, limit=limit, state=state)
    nxt = offset + len(jobs)
    query = f"&state={state}" if state else ""
    return {
        "jobs": [job_view(j) for j in jobs],
        "total": total,
        "offset": offset,
        "limit": limit,
        "next": f"/v1/jobs?offset={nxt}&limit={limit}{query}" if nxt < total else None,
    }


@router.get("/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    return job_view(_get(_runner(request), job_id))


def _result_path(runner: JobRunner, job: Job, fmt: str) -> Path:
    if job.state != JobState.DONE:
        raise HTTPException(409, f"job {job.id} is {job.state}; results exist once it is done")
    rel = job.results.get(fmt)
    path = runner.store.path(rel) if rel else None
    if path is None or not path.is_file():
        raise HTTPException(404, f"job {job.id} has no {fmt} result on disk")
    return path


def _result_json(runner: JobRunner, job: Job) -> dict[str, Any]:
    return json.loads(_result_path(runner, job, "json").read_bytes())


@router.get("/jobs/{job_id}/result.{fmt}")
async def get_result(
    request: Request,
    job_id: str,
    fmt: str,
    scores: bool = Query(False, description="CSV: the variant with video_id and score columns"),
) -> Response:
    if fmt not in RESULT_FILES:
        raise HTTPException(404, f"unknown result format '{fmt}'; one of {', '.join(RESULT_FILES)}")
    runner = _runner(request)
    job = _get(runner, job_id)
    path = _result_path(runner, job, fmt)
    if fmt == "csv" and scores:
        dets, _ = read_detections_json(_result_path(runner, job, "json").read_bytes())
        body = detections_csv(dets, video_id=job.video_id, scores=True)
        return Response(body, media_type=MEDIA_TYPES["csv"])
    filename = f"{job.video_id or job.id}.{fmt}"
    return FileResponse(path, media_type=MEDIA_TYPES[fmt], filename=filename, content_disposition_type="inline")


@router.delete("/jobs/{job_id}", status_code=204, responses={202: {"description": "cancellation requested"}})
async def delete_job(request: Request, job_id: str) -> Response:
    runner = _runner(request)
    job = _get(runner, job_id)
    if job.state in JobState.ACTIVE:
        job = runner.cancel(job_id)
        if job.state in JobState.ACTIVE:  # running: give it a moment to stop at its next frame
            job = await runner.wait(job_id, timeout=2.0)
        return JSONResponse(job_view(job), status_code=202)
    try:
        runner.remove(job_id)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id}") from None
    return Response(status_code=204)
