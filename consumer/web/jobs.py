"""Resync jobs as the API and the page see them: one configuration, one scope.

A view over `consumer.resync`, the same operation as `absence-sync resync`:
the dry run re-reads the topic and counts the (configuration, absence) pairs
in scope without changing anything; a job runs in this worker process,
records what it reads, marks the pairs and follows their writes (done by
this worker's dispatcher and the other replicas'). Jobs are rows of the
database, so any replica answers for them, and at most one resync runs per
configuration at a time.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

import asyncpg

from consumer import resync, store
from consumer.settings import Settings

JobState = Literal["running", "done", "failed"]


@dataclass(frozen=True, slots=True)
class Scope:
    """What to resynchronize: absences ending on or after `since` (None: all),
    of these establishments (None: all the configuration covers)."""

    since: dt.date | None = None
    establishments: tuple[str, ...] | None = None
    force: bool = False


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    sync_id: str
    tenant: str
    scope: Scope
    state: JobState
    phase: str  # starting, reading, selecting, writing, done
    read: int  # topic records read
    total: int  # topic records to read
    in_scope: int  # pairs the configuration wants
    marked: int  # pairs marked for a write
    done: int  # marked pairs processed so far
    written: int  # of which changed a calendar
    unchanged: int  # of which needed no write
    failed: int  # of which failed
    error: str | None
    started_at: dt.datetime
    finished_at: dt.datetime | None


def _request(stored: store.StoredConfig, scope: Scope, *, dry_run: bool) -> resync.ResyncRequest:
    return resync.ResyncRequest(
        config_ids=(stored.config.id,),
        establishments=scope.establishments or (),
        since=scope.since,
        dry_run=dry_run,
        force=scope.force,
        # in a worker, its dispatcher (and the other replicas') do the writes
        wait=not dry_run,
        dispatch=False,
    )


async def count_in_scope(
    pool: asyncpg.Pool, settings: Settings, bootstrap: str,
    stored: store.StoredConfig, scope: Scope,
) -> int:
    """The dry run: how many events the resync would initialize. Touches nothing."""
    summary = await resync.resync(
        pool, settings, bootstrap, _request(stored, scope, dry_run=True)
    )
    return summary.in_scope


async def start(
    pool: asyncpg.Pool, settings: Settings, bootstrap: str,
    stored: store.StoredConfig, scope: Scope,
) -> Job:
    """Start a resync of `stored` over `scope`; raises `resync.ResyncConflict`
    when one is already running for this configuration."""
    job_id = await resync.start_job(
        pool, settings, bootstrap, _request(stored, scope, dry_run=False)
    )
    job = await get(pool, job_id, stored.config.tenant)
    assert job is not None
    return job


async def get(pool: asyncpg.Pool, job_id: str, tenant: str) -> Job | None:
    """The job's progress and summary; None when unknown or of another tenant."""
    row = await resync.get_job(pool, job_id, tenant)
    if row is None or not row.config_ids or row.tenant != tenant:
        return None
    request = row.request
    since = request.get("since")
    establishments = request.get("establishments") or None
    state: JobState = (
        "running" if row.state == "running" else "failed" if row.state == "failed" else "done"
    )
    return Job(
        id=row.id,
        sync_id=row.config_ids[0],
        tenant=tenant,
        scope=Scope(
            dt.date.fromisoformat(since) if since else None,
            tuple(establishments) if establishments else None,
            bool(request.get("force", False)),
        ),
        state=state,
        phase=row.phase,
        read=row.records_read,
        total=max(row.records_total, row.records_read),
        in_scope=row.in_scope,
        marked=row.marked,
        done=row.written + row.unchanged + row.failed,
        written=row.written,
        unchanged=row.unchanged,
        failed=row.failed,
        error=row.error,
        started_at=row.created_at,
        finished_at=row.finished_at,
    )
