"""The durable job store: WAL SQLite, state transitions, recovery after a crash, orphans, retention."""

from __future__ import annotations

import sqlite3
import time

import pytest

from service.jobs.store import Job, JobNotFound, JobState, JobStore


def _job(store: JobStore, **kw) -> Job:
    job_id = kw.pop("id", None) or Job.new_id()
    d = store.job_dir(job_id)
    d.mkdir(parents=True, exist_ok=True)
    (d / "input.npy").write_bytes(b"x")
    fields = dict(
        id=job_id,
        state=JobState.QUEUED,
        input_kind="keypoints",
        filename="a.npy",
        input_path=store.relative(d / "input.npy"),
        upload_bytes=1,
        frames_total=100,
    )
    fields.update(kw)
    return store.insert(Job(**fields))


def test_wal_mode_and_round_trip(tmp_path):
    store = JobStore(tmp_path)
    assert store.journal_mode == "wal"
    job = _job(store, options={"score_threshold": 0.4}, video_id="v1")
    got = store.get(job.id)
    assert got == job
    assert got.options == {"score_threshold": 0.4}
    store.update(job.id, frames_done=40, eta_s=3.5, results={"json": "jobs/x/result.json"})
    got = store.get(job.id)
    assert (got.frames_done, got.eta_s, got.results) == (40, 3.5, {"json": "jobs/x/result.json"})
    with pytest.raises(JobNotFound):
        store.get("nope")
    with pytest.raises(ValueError):
        store.update(job.id, not_a_column=1)


def test_records_survive_reopen_from_another_connection(tmp_path):
    store = JobStore(tmp_path)
    job = _job(store)
    store.update(job.id, state=JobState.DONE, finished_at=time.time())
    # A second reader (another process would do the same) sees the committed row.
    other = sqlite3.connect(tmp_path / "jobs.sqlite3")
    assert other.execute("SELECT state FROM jobs WHERE id = ?", (job.id,)).fetchone()[0] == "done"
    other.close()
    store.close()
    assert JobStore(tmp_path).get(job.id).state == JobState.DONE


def test_transition_only_from_expected_states(tmp_path):
    store = JobStore(tmp_path)
    job = _job(store)
    assert store.transition(job.id, (JobState.QUEUED,), state=JobState.CANCELLED)
    # A late "done" from the worker must not overwrite the cancel.
    assert not store.transition(job.id, (JobState.RUNNING,), state=JobState.DONE)
    assert store.get(job.id).state == JobState.CANCELLED


def test_paging_newest_first_and_by_state(tmp_path):
    store = JobStore(tmp_path)
    ids = [_job(store, created_at=1000.0 + i).id for i in range(7)]
    store.update(ids[0], state=JobState.DONE)
    page, total = store.page(offset=0, limit=3)
    assert total == 7 and [j.id for j in page] == ids[::-1][:3]
    page, _ = store.page(offset=6, limit=3)
    assert [j.id for j in page] == [ids[0]]
    done, total = store.page(state=JobState.DONE)
    assert total == 1 and done[0].id == ids[0]
    assert store.count_active() == 6


def test_recover_resumes_or_fails_with_a_reason(tmp_path):
    store = JobStore(tmp_path)
    resumable = _job(store, state=JobState.RUNNING, attempts=1, frames_done=50)
    exhausted = _job(store, state=JobState.RUNNING, attempts=2)
    lost = _job(store, state=JobState.RUNNING, attempts=1)
    (store.job_dir(lost.id) / "input.npy").unlink()
    finished = _job(store, state=JobState.DONE)

    resumed, failed = JobStore(tmp_path).recover(max_attempts=2)
    assert [j.id for j in resumed] == [resumable.id]
    job = store.get(resumable.id)
    assert job.state == JobState.QUEUED and job.frames_done == 0 and "resumed" in job.note
    assert {j.id for j in failed} == {exhausted.id, lost.id}
    assert "giving up" in store.get(exhausted.id).error
    assert "input file is gone" in store.get(lost.id).error
    assert store.get(lost.id).finished_at is not None
    assert store.get(finished.id).state == JobState.DONE


def test_sweep_removes_partial_uploads_and_orphan_dirs(tmp_path):
    store = JobStore(tmp_path)
    kept = _job(store)
    (store.tmp_dir / "abc.part").write_bytes(b"half an upload")
    orphan = store.job_dir("deadbeef")
    orphan.mkdir()
    (orphan / "input.mp4").write_bytes(b"renamed but never inserted")
    assert store.sweep_orphans() == 2
    assert not list(store.tmp_dir.iterdir())
    assert not orphan.exists()
    assert store.job_dir(kept.id).exists()


def test_retention_deletes_old_finished_jobs_and_files(tmp_path):
    store = JobStore(tmp_path)
    now = 10_000.0
    old = _job(store, state=JobState.DONE, finished_at=now - 7200)
    recent = _job(store, state=JobState.FAILED, finished_at=now - 60)
    running = _job(store, state=JobState.RUNNING, created_at=now - 99999)
    assert store.expire(3600, now=now) == [old.id]
    assert not store.job_dir(old.id).exists()
    with pytest.raises(JobNotFound):
        store.get(old.id)
    assert store.get(recent.id) and store.get(running.id)


def test_delete_removes_record_and_files(tmp_path):
    store = JobStore(tmp_path)
    job = _job(store)
    store.delete(job.id)
    assert not store.job_dir(job.id).exists()
    with pytest.raises(JobNotFound):
        store.delete(job.id)
