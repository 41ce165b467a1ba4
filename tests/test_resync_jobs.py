"""Resync jobs for the HTTP API: progress readable while they run, one
running resync per configuration (enforced by the database, for the command
line too), and no configuration blocked for long by a process that died."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumer import resync as rs
from consumer import store
from consumer.providers.memory import MemoryCalendar, MemoryProvider
from consumer.settings import Settings
from tests.conftest import Publisher, settings_env, wait_until
from tests.harness import apply
from tests.resync_support import configs, publish, run_cli

ROOT = Path(__file__).resolve().parent.parent


def _memory(calendar: MemoryCalendar) -> Any:
    def factory(_: store.StoredConfig) -> MemoryProvider:
        return MemoryProvider(calendar)

    return factory


def _phase(pool: asyncpg.Pool, job_id: str, phase: str) -> Any:
    async def check() -> bool:
        return bool(await pool.fetchval(
            "SELECT phase = $2 FROM resync_jobs WHERE id = $1", job_id, phase
        ))

    return check


def _ended(pool: asyncpg.Pool, job_id: str) -> Any:
    async def check() -> bool:
        return bool(await pool.fetchval(
            "SELECT state <> 'running' FROM resync_jobs WHERE id = $1", job_id
        ))

    return check


async def test_job_progress_and_one_resync_per_configuration(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, *configs())
    topic = await publish(publisher, 300, seed=17)
    expected = topic.in_scope([c for c in configs() if c.id == "acme-all"])
    bootstrap = settings.kafka_bootstrap_servers
    assert bootstrap
    # waits for writes nobody makes (no dispatcher anywhere): stays running
    holding = rs.ResyncRequest(config_ids=("acme-all",), wait=True, dispatch=False)
    try:
        job_id = await rs.start_job(pool, settings, bootstrap, holding)
        await wait_until(_phase(pool, job_id, "writing"))
        await wait_until(lambda: _counted(pool, job_id, len(expected)))
        job = await rs.get_job(pool, job_id, "acme")
        assert job is not None
        assert (job.state, job.tenant, job.config_ids) == ("running", "acme", ("acme-all",))
        assert (job.records_read, job.records_total) == (topic.records, topic.records)
        assert job.in_scope == job.marked == len(expected)
        assert (job.written, job.unchanged, job.failed, job.summary) == (0, 0, 0, None)
        assert job.request["config_ids"] == ["acme-all"] and job.request["wait"] is True
        doc = json.loads(json.dumps(job.as_dict()))
        assert doc["state"] == "running" and doc["marked"] == len(expected)
        assert doc["config_ids"] == ["acme-all"] and doc["id"] == job_id
        # tenant isolation: another tenant's job is an unknown job
        assert await rs.get_job(pool, job_id, "globex") is None
        assert await rs.get_job(pool, "no-such-job", "acme") is None

        with pytest.raises(rs.ResyncConflict) as refused:
            await rs.start_job(pool, settings, bootstrap, rs.ResyncRequest(tenant="acme"))
        assert (refused.value.config_id, refused.value.job_id) == ("acme-all", job_id)
        assert "acme-all" in str(refused.value) and job_id in str(refused.value)
        code, _, err = await run_cli(settings, "resync", "--config", "acme-all", "--json")
        assert code == 1
        assert "acme-all" in err and job_id in err and "Traceback" not in err

        # other configurations, and dry runs, are not held
        other = await rs.resync(
            pool, settings, bootstrap, rs.ResyncRequest(config_ids=("acme-paris",))
        )
        assert other.marked > 0
        dry = await rs.resync(
            pool, settings, bootstrap, rs.ResyncRequest(config_ids=("acme-all",), dry_run=True)
        )
        assert dry.in_scope == len(expected)
        with pytest.raises(rs.UnknownConfiguration, match="'globex-all' for tenant 'acme'"):
            await rs.start_job(pool, settings, bootstrap, rs.ResyncRequest(
                tenant="acme", config_ids=("globex-all",)))
        with pytest.raises(rs.ResyncError, match="dry run"):
            await rs.start_job(pool, settings, bootstrap, rs.ResyncRequest(
                tenant="acme", dry_run=True))

        # cancelling records the job as failed and frees the configuration
        assert await rs.cancel_job(job_id)
        job = await rs.get_job(pool, job_id, "acme")
        assert job is not None and job.state == "failed" and job.error
        assert "interrupted" in job.error
        assert await pool.fetchval("SELECT count(*) FROM resync_locks") == 0

        # a job that runs to its end, writing with a dispatcher of its own
        calendar = MemoryCalendar()
        done_id = await rs.start_job(
            pool, settings, bootstrap, rs.ResyncRequest(tenant="acme", wait=True),
            provider_factory=_memory(calendar),
        )
        await wait_until(_ended(pool, done_id), timeout=60)
        done = await rs.get_job(pool, done_id, "acme")
        assert done is not None and done.state == "succeeded" and done.error is None
        assert done.summary is not None
        assert done.summary["marked"] == done.marked == done.in_scope > len(expected)
        assert done.summary["written"] == done.written == len(calendar.all()) == done.marked
        assert done.finished_at is not None and done.phase == "done"
    finally:
        await rs.cancel_jobs()


async def _counted(pool: asyncpg.Pool, job_id: str, marked: int) -> bool:
    return bool(await pool.fetchval(
        "SELECT marked = $2 FROM resync_jobs WHERE id = $1", job_id, marked
    ))


async def test_simultaneous_starts_one_wins(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, *configs())
    await publish(publisher, 50, seed=2)
    bootstrap = settings.kafka_bootstrap_servers
    assert bootstrap
    holding = rs.ResyncRequest(tenant="acme", wait=True, dispatch=False)
    try:
        for _ in range(3):
            results = await asyncio.gather(
                *(rs.start_job(pool, settings, bootstrap, holding) for _ in range(4)),
                return_exceptions=True,
            )
            started = [r for r in results if isinstance(r, str)]
            refused = [r for r in results if isinstance(r, rs.ResyncConflict)]
            assert len(started) == 1 and len(refused) == 3, results
            assert {r.job_id for r in refused} == set(started)
            await rs.cancel_jobs()
    finally:
        await rs.cancel_jobs()


async def test_a_job_whose_process_died_blocks_nobody_for_long(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, *configs())
    await publish(publisher, 60, seed=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSENCE_SYNC_")}
    env.update(settings_env(settings))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.resyncproc", "acme-all", "2", env=env, cwd=ROOT,
    )
    try:
        async def running() -> bool:
            return bool(await pool.fetchval(
                "SELECT count(*) FROM resync_jobs WHERE phase = 'writing' AND state = 'running'"
            ))

        await wait_until(running, timeout=60)
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    dead = await pool.fetchval("SELECT id FROM resync_jobs")
    bootstrap = settings.kafka_bootstrap_servers
    assert bootstrap
    started: list[str] = []

    async def takes_over() -> bool:
        try:
            started.append(await rs.start_job(
                pool, settings, bootstrap, rs.ResyncRequest(config_ids=("acme-all",))
            ))
        except rs.ResyncConflict as exc:
            assert exc.job_id == dead
            return False
        return True

    try:
        await wait_until(takes_over, timeout=60, interval=0.2)
        await wait_until(_ended(pool, started[0]), timeout=60)
    finally:
        await rs.cancel_jobs()
    job = await rs.get_job(pool, dead, "acme")
    assert job is not None and job.state == "failed"
    assert job.error is not None and job.error.startswith("abandoned")
    new = await rs.get_job(pool, started[0], "acme")
    assert new is not None and new.state == "succeeded"
