"""Bounded storage (docs/runbook.md, 'Bounded history'): the history trim and
the table-size metrics."""

from __future__ import annotations

import asyncio
import datetime as dt

import asyncpg

from consumer import store
from consumer.maintenance import Maintenance
from consumer.metrics import Metrics
from consumer.settings import Settings
from tests.conftest import wait_until
from tests.harness import apply, sync_config, worker


async def _history(pool: asyncpg.Pool, config: str, absence: str, ages_days: list[float]) -> None:
    now = dt.datetime.now(dt.UTC)
    await pool.executemany(
        "INSERT INTO sync_log (config_id, absence_id, operation, outcome, at)"
        " VALUES ($1, $2, 'update', 'ok', $3)",
        [(config, absence, now - dt.timedelta(days=age)) for age in ages_days],
    )


async def _rows(pool: asyncpg.Pool, absence: str) -> list[float]:
    """Ages (days, rounded) of an item's history rows, newest first."""
    rows = await pool.fetch(
        "SELECT EXTRACT(EPOCH FROM now() - at) / 86400 AS age FROM sync_log"
        " WHERE absence_id = $1 ORDER BY id DESC", absence,
    )
    return [round(float(r["age"])) for r in rows]


async def _setup(pool: asyncpg.Pool) -> None:
    await apply(pool, sync_config())
    # inserted oldest first, like real history (ids grow with time)
    await _history(pool, "acme-cal", "busy", [float(d) for d in range(50, 0, -1)])
    await _history(pool, "acme-cal", "old", [90, 60, 45])
    await _history(pool, "acme-cal", "quiet", [3, 2])
    await pool.execute(
        "INSERT INTO consent_states (state, config_id, created_at) VALUES"
        " ('expired', 'acme-cal', now() - interval '2 days'),"
        " ('fresh', 'acme-cal', now() - interval '1 hour')"
    )


def _settings(settings: Settings, **extra: object) -> Settings:
    return settings.model_copy(update={
        "history_keep_days": 30, "history_keep_per_item": 10, **extra,
    })


async def test_trim_keeps_recent_rows_and_the_newest_per_item(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    await _setup(pool)
    metrics = Metrics()
    trimmed = await Maintenance(_settings(settings), pool, metrics).once()
    assert trimmed is not None
    assert await _rows(pool, "busy") == list(range(1, 11))  # the newest 10, all recent
    assert await _rows(pool, "old") == []  # all older than 30 days
    assert await _rows(pool, "quiet") == [2, 3]
    states = await pool.fetch("SELECT state FROM consent_states")
    assert [r["state"] for r in states] == ["fresh"]
    assert trimmed.rows == {"sync_log": 55 - 12, "consent_states": 1}
    assert metrics.trimmed.labels("sync_log")._value.get() == 43
    assert metrics.trimmed.labels("consent_states")._value.get() == 1
    assert metrics.table_rows.labels("sync_log")._value.get() == 12
    assert metrics.table_rows.labels("consent_states")._value.get() == 1
    assert metrics.table_bytes.labels("sync_items")._value.get() > 0


async def test_replicas_take_turns(settings: Settings, pool: asyncpg.Pool) -> None:
    """One trim per interval for the whole fleet: concurrent runs do it once, a run
    soon after another one skips, and a later one trims again."""
    await _setup(pool)
    own = _settings(settings, trim_interval_seconds=3600)
    runs = await asyncio.gather(*(
        Maintenance(own, pool, Metrics()).once() for _ in range(4)
    ))
    done = [r for r in runs if r is not None]
    assert len(done) == 1 and done[0].rows["sync_log"] == 43
    await _history(pool, "acme-cal", "old", [40])
    assert await Maintenance(own, pool, Metrics()).once() is None  # trimmed moments ago
    assert await _rows(pool, "old") == [40]
    await pool.execute("UPDATE maintenance_runs SET finished_at = now() - interval '2 hours'")
    again = await Maintenance(own, pool, Metrics()).once()
    assert again is not None and again.rows["sync_log"] == 1


async def test_a_run_holding_the_lock_makes_the_others_skip(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    await _setup(pool)
    async with pool.acquire() as other_replica:
        await other_replica.execute("SELECT pg_advisory_lock($1)", store.TRIM_LOCK)
        assert await Maintenance(_settings(settings), pool, Metrics()).once() is None
        await other_replica.execute("SELECT pg_advisory_unlock($1)", store.TRIM_LOCK)
    assert await _rows(pool, "old") == [45, 60, 90]


async def test_the_worker_trims_periodically(settings: Settings, pool: asyncpg.Pool) -> None:
    await _setup(pool)
    own = _settings(settings, trim_interval_seconds=0.5)
    async with worker(own) as running:
        async def trimmed() -> bool:
            return await _rows(pool, "old") == []

        await wait_until(trimmed, timeout=30)
        await pool.execute(
            "UPDATE maintenance_runs SET finished_at = now() - interval '1 hour'"
        )
        await _history(pool, "acme-cal", "old", [40])
        await wait_until(trimmed, timeout=30)  # and again, at its next turn

        async def counted() -> bool:
            return bool(running.metrics.trimmed.labels("sync_log")._value.get() == 44)

        await wait_until(counted, timeout=30)
