"""Durable job records: SQLite in WAL mode under ``Settings.data_dir``, files beside it.

Layout of the data directory::

    jobs.sqlite3            the job table (WAL: readers never block the writer)
    tmp/                    uploads while they stream in; anything here at start-up is a dead upload
    jobs/<id>/input.<ext>   the accepted upload (renamed from tmp/ only once complete and fsynced)
    jobs/<id>/result.*      results, each written to a temporary name, fsynced and renamed

A job row is inserted only after its upload sits complete in ``jobs/<id>/``, so a partial upload
never becomes a job. Paths in the table are relative to the data directory, so it can be moved.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

DB_NAME = "jobs.sqlite3"
SCHEMA_VERSION = 1


class JobState:
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    ACTIVE = (QUEUED, RUNNING)
    FINISHED = (DONE, FAILED, CANCELLED)
    ALL = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)


class InputKind:
    VIDEO = "video"
    KEYPOINTS = "keypoints"
    FEATURES = "features"


# Share of a job's time spent featurizing, by input (pose estimation dominates video; the detector
# dominates arrays). Only used to turn two counters into one progress fraction and an ETA.
FEATURIZE_SHARE = {InputKind.VIDEO: 0.9, InputKind.KEYPOINTS: 0.05, InputKind.FEATURES: 0.0}


@dataclass
class Job:
    id: str
    state: str
    input_kind: str
    filename: str
    input_path: str  # relative to the data directory
    upload_bytes: int
    video_id: str = ""
    fps: float = 30.0
    duration_s: float = 0.0
    frames_total: int = 0
    frames_done: int = 0  # frames decoded and featurized
    windows_total: int = 0  # detector windows (decision points), known once featurizing is over
    windows_done: int = 0
    eta_s: float | None = None
    phase: str = ""  # what a running job is doing: featurizing, detecting, writing
    error: str | None = None
    note: str | None = None  # e.g. "resumed after a server restart"
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    detections: int | None = None
    results: dict[str, str] = field(default_factory=dict)  # format -> path relative to the data directory
    options: dict[str, Any] = field(default_factory=dict)  # e.g. score_threshold

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    @property
    def finished(self) -> bool:
        return self.state in JobState.FINISHED

    @property
    def fraction(self) -> float:
        """Overall progress estimate: featurizing and detecting weighted by their usual cost for the input."""
        if self.state == JobState.DONE:
            return 1.0
        feat = self.frames_done / self.frames_total if self.frames_total else 0.0
        det = self.windows_done / self.windows_total if self.windows_total else 0.0
        share = FEATURIZE_SHARE.get(self.input_kind, 0.5)
        return round(min(share * feat + (1 - share) * det, 1.0), 4)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = [f.name for f in fields(Job)]
_JSON_COLUMNS = {"results", "options"}
_TYPES = {
    "upload_bytes": "INTEGER",
    "frames_total": "INTEGER",
    "frames_done": "INTEGER",
    "windows_total": "INTEGER",
    "windows_done": "INTEGER",
    "attempts": "INTEGER",
    "detections": "INTEGER",
    "fps": "REAL",
    "duration_s": "REAL",
    "eta_s": "REAL",
    "created_at": "REAL",
    "started_at": "REAL",
    "finished_at": "REAL",
}


class JobNotFound(KeyError):
    pass


class JobStore:
    """Thread-safe: the event loop and job worker threads share one connection behind a lock."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.tmp_dir = self.data_dir / "tmp"
        self.jobs_dir = self.data_dir / "jobs"
        for d in (self.data_dir, self.tmp_dir, self.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit, each statement is its own transaction (short writes only).
        self._db = sqlite3.connect(self.data_dir / DB_NAME, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a power loss may lose the last commits, never corrupts the database.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            cols = ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" + (" PRIMARY KEY" if c == "id" else "") for c in _COLUMNS)
            self._db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({cols})")
            self._db.execute("CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at)")
            self._db.execute("CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state)")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def journal_mode(self) -> str:
        with self._lock:
            return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    # ---- paths ----

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def path(self, relative: str) -> Path:
        return self.data_dir / relative

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.data_dir))

    # ---- rows ----

    @staticmethod
    def _to_row(job: Job) -> dict[str, Any]:
        row = job.to_dict()
        for c in _JSON_COLUMNS:
            row[c] = json.dumps(row[c])
        return row

    @staticmethod
    def _from_row(row: sqlite3.Row) -> Job:
        data = dict(row)
        for c in _JSON_COLUMNS:
            data[c] = json.loads(data[c] or "{}")
        return Job(**data)

    def insert(self, job: Job) -> Job:
        row = self._to_row(job)
        names = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", row)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return self._from_row(row)

    def update(self, job_id: str, **changes: Any) -> Job:
        unknown = set(changes) - set(_COLUMNS) - {"id"}
        if unknown or "id" in changes:
            raise ValueError(f"cannot update {sorted(unknown | ({'id'} & set(changes)))}")
        values = {k: json.dumps(v) if k in _JSON_COLUMNS else v for k, v in changes.items()}
        assignments = ", ".join(f"{k} = :{k}" for k in values)
        with self._lock:
            cur = self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = :id", {**values, "id": job_id})
        if cur.rowcount == 0:
            raise JobNotFound(job_id)
        return self.get(job_id)

    def transition(self, job_id: str, from_states: tuple[str, ...], **changes: Any) -> bool:
        """Update only if the job is still in one of ``from_states`` (so a cancel is never overwritten)."""
        values = {k: json.dumps(v) if k in _JSON_COLUMNS else v for k, v in changes.items()}
        assignments = ", ".join(f"{k} = :{k}" for k in values)
        marks = ", ".join(f":s{i}" for i in range(len(from_states)))
        params = {**values, "id": job_id, **{f"s{i}": s for i, s in enumerate(from_states)}}
        with self._lock:
            cur = self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = :id AND state IN ({marks})", params)
        return cur.rowcount == 1

    def page(self, *, offset: int = 0, limit: int = 50, state: str | None = None) -> tuple[list[Job], int]:
        """Newest first; returns (page, total matching)."""
        where, params = ("WHERE state = ?", [state]) if state else ("", [])
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM jobs {where}", params).fetchone()[0]
            rows = self._db.execute(
                f"SELECT * FROM jobs {where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
        return [self._from_row(r) for r in rows], int(total)

    def by_state(self, *states: str) -> list[Job]:
        marks = ", ".join("?" for _ in states)
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at, id", states
            ).fetchall()
        return [self._from_row(r) for r in rows]

    def count_active(self) -> int:
        with self._lock:
            return int(
                self._db.execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", JobState.ACTIVE).fetchone()[0]
            )

    def delete(self, job_id: str) -> None:
        """Remove the record, then its files (a crash in between leaves only an orphan dir, swept later)."""
        with self._lock:
            cur = self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        if cur.rowcount == 0:
            raise JobNotFound(job_id)
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    # ---- start-up and retention ----

    def recover(self, max_attempts: int) -> tuple[list[Job], list[Job]]:
        """After a restart: jobs left ``running`` are requeued (resumed from the start) or failed.

        Returns (resumed, failed). A job is failed when its input file is gone or it was already
        interrupted ``max_attempts`` times (it may be what brings the server down).
        """
        resumed, failed = [], []
        for job in self.by_state(JobState.RUNNING):
            if not self.path(job.input_path).is_file():
                reason = "the server stopped while this job was running and its input file is gone"
            elif job.attempts >= max_attempts:
                reason = f"the server stopped while this job was running ({job.attempts} attempts); giving up"
            else:
                reason = None
            if reason:
                self.update(job.id, state=JobState.FAILED, error=reason, finished_at=time.time(), eta_s=None, phase="")
                failed.append(self.get(job.id))
            else:
                note = f"resumed after a server restart (attempt {job.attempts + 1})"
                self.update(
                    job.id,
                    state=JobState.QUEUED,
                    frames_done=0,
                    windows_done=0,
                    eta_s=None,
                    phase="",
                    note=note,
                )
                resumed.append(self.get(job.id))
        return resumed, failed

    def sweep_orphans(self) -> int:
        """Delete dead partial uploads in tmp/ and job directories that have no record."""
        removed = 0
        for p in self.tmp_dir.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT id FROM jobs").fetchall()}
        for d in self.jobs_dir.iterdir():
            if d.name not in known:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed

    def expire(self, retention_s: float, now: float | None = None) -> list[str]:
        """Delete finished jobs (and their files) that finished more than ``retention_s`` ago."""
        cutoff = (time.time() if now is None else now) - retention_s
        marks = ", ".join("?" for _ in JobState.FINISHED)
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM jobs WHERE state IN ({marks}) AND COALESCE(finished_at, created_at) < ?",
                [*JobState.FINISHED, cutoff],
            ).fetchall()
        expired = [r[0] for r in rows]
        for job_id in expired:
            with contextlib.suppress(JobNotFound):
                self.delete(job_id)
        return expired
