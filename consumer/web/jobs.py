"""Resync jobs as the API and the page need them: the seam to the resync library.

INTERIM IMPLEMENTATION. The real resync (`consumer/resync.py`: a
`resync_jobs` table, `start_job(...)`, `get_job(pool, job_id, tenant)` and a
dry-run count, re-reading the Kafka topic in a temporary consumer group) is
being written on another branch. Until it is merged, this module gives the
three functions below a minimal, working meaning so the API and the page run
end to end:

- the scope is computed from the absences recorded in PostgreSQL (not from
  the topic): absences of the tenant whose end date is on or after `since`,
  of the given establishments; `in_scope` counts those rule 5.1 wants;
- a job re-queues every absence of the scope (`store.requeue`, with `force`)
  and notes each item's change number; it is done when the dispatcher has
  processed every marked item up to that change;
- jobs live in this process's memory (the last `MAX_JOBS`): another replica,
  or a restarted worker, does not know them.

What callers rely on, and what the replacement must keep: the signatures and
the `Scope` and `Job` fields; `get` answers None for a job of another tenant,
exactly as for an unknown id.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import asyncpg

from consumer import store
from consumer.render import wanted
from consumer.store import admin as admin_store

MAX_JOBS = 1000
JobState = Literal["running", "done"]


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
    read: int  # absences examined
    in_scope: int  # of which the configuration wants an event
    marked: int  # items re-queued
    done: int  # marked items processed so far
    written: int  # of which changed a calendar
    unchanged: int  # of which needed no write
    failed: int  # of which failed
    started_at: dt.datetime
    finished_at: dt.datetime | None


@dataclass
class _Record:
    job: Job
    seqs: dict[str, int] = field(default_factory=dict)


_jobs: OrderedDict[str, _Record] = OrderedDict()


async def _scope(
    pool: asyncpg.Pool, stored: store.StoredConfig, scope: Scope
) -> tuple[int, list[str], int]:
    absences = await admin_store.absences_in_scope(
        pool, stored.config.tenant, since=scope.since, establishments=scope.establishments
    )
    count = sum(1 for a in absences if wanted(a, stored.config))
    return len(absences), [a.id for a in absences], count


async def count_in_scope(pool: asyncpg.Pool, stored: store.StoredConfig, scope: Scope) -> int:
    """The dry run: how many events the resync would initialize. Touches nothing."""
    return (await _scope(pool, stored, scope))[2]


async def start(
    pool: asyncpg.Pool,
    stored: store.StoredConfig,
    scope: Scope,
    notify: Callable[[], None],
) -> Job:
    """Start a resync of `stored` over `scope`; `notify` wakes the dispatcher."""
    read, ids, in_scope = await _scope(pool, stored, scope)
    config_id = stored.config.id
    started = dt.datetime.now(dt.UTC)
    marked = 0
    seqs: dict[str, int] = {}
    for chunk in range(0, len(ids), 1000):
        part = ids[chunk:chunk + 1000]
        marked += await store.requeue(
            pool, config_id, only_failed=False, force=scope.force, absence_ids=part
        )
        seqs.update(await admin_store.item_seqs(pool, config_id, part))
    notify()
    job = Job(
        id=str(uuid.uuid4()), sync_id=config_id, tenant=stored.config.tenant, scope=scope,
        state="running" if seqs else "done", read=read, in_scope=in_scope, marked=marked,
        done=0, written=0, unchanged=0, failed=0, started_at=started,
        finished_at=None if seqs else started,
    )
    _jobs[job.id] = _Record(job, seqs)
    while len(_jobs) > MAX_JOBS:
        _jobs.popitem(last=False)
    return job


async def get(pool: asyncpg.Pool, job_id: str, tenant: str) -> Job | None:
    """The job's progress and summary; None when unknown or of another tenant."""
    record = _jobs.get(job_id)
    if record is None or record.job.tenant != tenant:
        return None
    job = record.job
    if job.state == "done":
        return job
    done = await admin_store.progress(pool, job.sync_id, record.seqs, job.started_at)
    finished = done.done + done.gone >= len(record.seqs)
    record.job = replace(
        job, done=done.done, written=done.written, failed=done.failed,
        unchanged=done.done - done.written - done.failed,
        state="done" if finished else "running",
        finished_at=dt.datetime.now(dt.UTC) if finished else None,
    )
    return record.job
