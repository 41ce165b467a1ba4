"""Migration 0011 (targets) on a database that already holds work: every existing
item keeps its state and becomes the `calendar` item of its pair; the target set
is closed; the upgraded database goes on working (intake, creates in doubt,
a team calendar added afterwards)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import asyncpg
import pytest

from consumer import store
from consumer.config import SyncConfig
from consumer.embedded import EmbeddedPostgres
from consumer.providers.memory import MemoryCalendar, MemoryProvider
from consumer.render import Mark
from consumer.secrets import SecretBox
from tests.conftest import dsn_for, event
from tests.harness import sync_config
from tests.provider_contract import desired
from tests.test_executor import executor, jobs, lease, record, run

TARGETS_MIGRATION = 11


@pytest.fixture
async def old_pool(postgres: EmbeddedPostgres) -> AsyncIterator[asyncpg.Pool]:
    """A database at the last migration before targets."""
    name = f"old_{os.getpid()}"
    conn = await asyncpg.connect(postgres.dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    pool = await store.connect(dsn_for(postgres.dsn, name))
    await pool.execute(
        "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for version, file, sql in store._migrations():
        if version < TARGETS_MIGRATION:
            await pool.execute(sql)
            await pool.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, file
            )
    yield pool
    await pool.close()


async def _old_config(pool: asyncpg.Pool, config: SyncConfig) -> None:
    settings = json.dumps(config.public_dict(), sort_keys=True)
    await pool.execute(
        "INSERT INTO sync_configs (id, tenant, provider, settings, render_hash)"
        " VALUES ($1, $2, $3, $4::jsonb, $5)",
        config.id, config.tenant, config.provider, settings, store._render_hash(config),
    )


async def test_existing_items_become_calendar_items_and_keep_their_state(
    old_pool: asyncpg.Pool,
) -> None:
    pool = old_pool
    config = sync_config()
    await _old_config(pool, config)
    await pool.execute(
        "INSERT INTO absences (tenant, id, version, deleted, data) VALUES"
        " ('acme', 'abs-synced', 1, false, $1::jsonb), ('acme', 'abs-doubt', 1, false, $2::jsonb)",
        json.dumps(event("abs-synced", 1)["data"]), json.dumps(event("abs-doubt", 1)["data"]),
    )
    await pool.execute(
        "INSERT INTO sync_items (config_id, tenant, absence_id, change_seq, done_seq, status,"
        " event_id, mailbox, applied_hash, generation, intent) VALUES"
        " ('acme-cal', 'acme', 'abs-synced', 3, 3, 'synced', 'mem-old', 'jane.doe@acme.com',"
        "  'h1', 2, NULL),"
        " ('acme-cal', 'acme', 'abs-doubt', 1, 0, 'pending', NULL, 'jane.doe@acme.com',"
        "  NULL, 1, 'create')"
    )
    await pool.execute(
        "INSERT INTO sync_log (config_id, absence_id, operation, outcome, mailbox)"
        " VALUES ('acme-cal', 'abs-synced', 'create', 'ok', 'jane.doe@acme.com')"
    )
    before = {r["absence_id"]: dict(r) for r in await pool.fetch("SELECT * FROM sync_items")}

    assert await store.migrate(pool) == ["0011_targets.sql"]
    assert await store.migrate(pool) == []

    after = {r["absence_id"]: dict(r) for r in await pool.fetch("SELECT * FROM sync_items")}
    for absence_id, row in after.items():
        assert row.pop("target") == "calendar"
        assert row == before[absence_id]
    assert await pool.fetchval("SELECT targets FROM sync_configs") == ["calendar"]
    assert await pool.fetchval("SELECT target FROM sync_log") == "calendar"
    key = await pool.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'sync_items_pkey'"
    )
    assert key == "PRIMARY KEY (config_id, absence_id, target)"
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute("UPDATE sync_items SET target = 'elsewhere'")

    # the create in doubt from before the upgrade: found by its mark, not written twice
    calendar = MemoryCalendar()
    provider = MemoryProvider(calendar)
    landed = desired("jane.doe@acme.com", "abs-doubt", mark=Mark("acme-cal", "abs-doubt"))
    await provider.create(landed, transaction_id="acme-cal/abs-doubt/1")
    calendar.calls.clear()
    await run(executor(pool), await jobs(pool, await lease(pool), provider))
    assert calendar.calls[0] == ("find", "jane.doe@acme.com")
    assert ("create", "jane.doe@acme.com") not in calendar.calls
    assert len(calendar.all()) == 1

    # intake marks the upgraded item (same key, target calendar), not a new one
    await record(pool, event("abs-synced", 2))
    seqs = {(r["absence_id"], r["target"]): r["change_seq"]
            for r in await pool.fetch("SELECT * FROM sync_items")}
    assert seqs == {("abs-synced", "calendar"): 4, ("abs-doubt", "calendar"): 1}

    # a team calendar given afterwards: every known absence gets its team item
    team = sync_config(team_calendar={"address": "team@acme.com"})  # type: ignore[arg-type]
    assert await store.apply_configs(pool, [team], SecretBox(None)) == {"acme-cal": "updated"}
    rows = await pool.fetch("SELECT absence_id, target FROM sync_items ORDER BY 1, 2")
    assert [(r["absence_id"], r["target"]) for r in rows] == [
        ("abs-doubt", "calendar"), ("abs-doubt", "team"),
        ("abs-synced", "calendar"), ("abs-synced", "team"),
    ]
    assert await pool.fetchval("SELECT targets FROM sync_configs") == ["calendar", "team"]
