"""PostgreSQL: the only module that knows SQL (STYLE: one-way data flow).

Tables are created by versioned plain-SQL migrations (`migrations/NNNN_*.sql`)
applied under an advisory lock, so several replicas may start at once.
`is_unavailable` tells callers which errors are an outage to wait out
(connection lost, server restarting, timeout) rather than a refusal.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg

from consumer.config import SyncConfig
from consumer.events import Absence, InvalidEvent, absence_from_data
from consumer.secrets import SecretBox

MIGRATION_LOCK = 0x616273656E6365  # "absence"
TRIM_LOCK = MIGRATION_LOCK + 1
# a migration (an index on a large table) or waiting for another replica's
# migrations may take far longer than the pool's command_timeout
MIGRATION_TIMEOUT_SECONDS = 3600.0

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, no such socket
    TimeoutError,  # command_timeout, or a connect that did not complete
    asyncpg.InterfaceError,  # the connection was closed under us
    asyncpg.exceptions.InternalClientError,  # the protocol broke off mid-statement
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.exceptions.OperatorInterventionError,  # 57: shutdown, starting up, cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.exceptions.PostgresSystemError,  # 58: I/O error
    asyncpg.exceptions.TransactionRollbackError,  # 40: deadlock, serialization failure
)


def is_unavailable(exc: BaseException) -> bool:
    """The database is (for now) out of reach: try again later. False for a
    refusal of what was sent (data error, constraint), which repeats."""
    return isinstance(exc, _UNAVAILABLE)


async def connect(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout: float | None = None,
) -> asyncpg.Pool:
    """A pool; `command_timeout` bounds every statement and every new connection,
    so a dead server (no reset, no answer) raises TimeoutError instead of hanging
    its caller."""
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout,
        timeout=command_timeout or 60.0,
    )
    assert pool is not None
    return pool


def _migrations() -> list[tuple[int, str, str]]:
    folder = resources.files("consumer.store") / "migrations"
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply pending migrations; returns the names applied (empty when current)."""
    applied: list[str] = []
    timeout = MIGRATION_TIMEOUT_SECONDS
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK, timeout=timeout)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in _migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql, timeout=timeout)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                applied.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied


# --- configurations ---------------------------------------------------------


def _render_hash(config: SyncConfig) -> str:
    raw = json.dumps(config.render_dict(), sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredConfig:
    config: SyncConfig
    revision: int
    granted_tenant_id: str | None
    updated_at: dt.datetime
    # known without any key, for listings (`config.secrets` is empty when read without a box)
    secret_names: tuple[str, ...] = ()
    # what a provider reported about this configuration (e.g. an out-of-support server)
    warnings: tuple[str, ...] = ()


def _config_from_row(row: asyncpg.Record, box: SecretBox | None) -> StoredConfig:
    settings = json.loads(row["settings"])
    names = settings.pop("secrets", None) or []
    secrets = box.decrypt(row["secrets"]) if box is not None else {}
    if row["granted_tenant_id"] and not settings["provider_settings"].get("tenant_id"):
        settings["provider_settings"]["tenant_id"] = row["granted_tenant_id"]
    config = SyncConfig(**settings, secrets=secrets)
    return StoredConfig(
        config, row["revision"], row["granted_tenant_id"], row["updated_at"],
        tuple(sorted(secrets or names)), tuple(json.loads(row["warnings"])),
    )


async def apply_configs(
    pool: asyncpg.Pool, configs: Sequence[SyncConfig], box: SecretBox
) -> dict[str, str]:
    """Create or update configurations in one transaction.

    Returns id -> "created" | "updated" | "unchanged". A configuration whose
    rendering fields change re-renders all its absences; any change re-queues
    its failed items (credentials may have been fixed).
    """
    outcome: dict[str, str] = {}
    encrypted = {c.id: box.encrypt(c.secrets) for c in configs}
    async with pool.acquire() as conn, conn.transaction():
        # wait for intake transactions in flight, and hold new ones until we commit:
        # an absence recorded concurrently is then either backfilled here or
        # sees the new configuration when intake marks its items
        await conn.execute("LOCK TABLE absences IN SHARE MODE")
        for config in configs:
            # every field, and the names (never the values) of the secrets
            settings = json.dumps(config.public_dict(), sort_keys=True)
            render_hash = _render_hash(config)
            old = await conn.fetchrow(
                "SELECT * FROM sync_configs WHERE id = $1 FOR UPDATE", config.id
            )
            if old is None:
                await conn.execute(
                    "INSERT INTO sync_configs (id, tenant, provider, settings, secrets,"
                    " render_hash) VALUES ($1, $2, $3, $4::jsonb, $5, $6)",
                    config.id, config.tenant, config.provider, settings,
                    encrypted[config.id], render_hash,
                )
                await _backfill_items(conn, config.id, config.tenant)
                outcome[config.id] = "created"
                continue
            same_settings = json.loads(old["settings"]) == json.loads(settings)
            same_secrets = box.decrypt(old["secrets"]) == config.secrets if box.enabled else (
                old["secrets"] is None and not config.secrets
            )
            if same_settings and same_secrets:
                outcome[config.id] = "unchanged"
                continue
            await conn.execute(
                "UPDATE sync_configs SET tenant = $2, provider = $3, settings = $4::jsonb,"
                " secrets = $5, render_hash = $6, revision = revision + 1, updated_at = now()"
                " WHERE id = $1",
                config.id, config.tenant, config.provider, settings,
                encrypted[config.id], render_hash,
            )
            if old["tenant"] != config.tenant:
                # the other tenant's absences are no longer this configuration's business
                # (tenant isolation): drop their items, as deleting the configuration would
                await conn.execute(
                    "DELETE FROM sync_items WHERE config_id = $1 AND tenant <> $2",
                    config.id, config.tenant,
                )
                await _backfill_items(conn, config.id, config.tenant)
            if old["render_hash"] != render_hash or old["provider"] != config.provider:
                await requeue(conn, config.id, only_failed=False)
            else:
                await requeue(conn, config.id, only_failed=True)
            outcome[config.id] = "updated"
    return outcome


async def _backfill_items(conn: asyncpg.Connection, config_id: str, tenant: str) -> None:
    """Give a (new) configuration an item per known absence of its tenant.

    An existing item is already kept current by intake (`_RECORD`), so it is left alone.
    """
    await conn.execute(
        "INSERT INTO sync_items (config_id, tenant, absence_id, event_time)"
        " SELECT $1, a.tenant, a.id, a.event_time FROM absences a WHERE a.tenant = $2"
        " ON CONFLICT (config_id, absence_id) DO NOTHING",
        config_id, tenant,
    )


async def requeue(
    conn: asyncpg.Connection | asyncpg.Pool,
    config_id: str,
    *,
    only_failed: bool,
    force: bool = False,
    absence_ids: Sequence[str] | None = None,
) -> int:
    """Mark items pending again (config change, operator retry, resync)."""
    result: str = await conn.execute(
        "UPDATE sync_items SET change_seq = change_seq + 1, status = 'pending',"
        " attempts = 0, next_attempt_at = now(), first_failure_at = NULL,"
        " force = force OR $3, pending_since = now(), updated_at = now()"
        " WHERE config_id = $1 AND ($2::boolean IS FALSE OR status = 'failed')"
        " AND ($4::text[] IS NULL OR absence_id = ANY($4::text[]))",
        config_id, only_failed, force, list(absence_ids) if absence_ids is not None else None,
    )
    return int(result.split()[-1])


async def list_configs(pool: asyncpg.Pool, box: SecretBox | None = None) -> list[StoredConfig]:
    rows = await pool.fetch("SELECT * FROM sync_configs ORDER BY tenant, id")
    return [_config_from_row(r, box) for r in rows]


async def get_config(
    pool: asyncpg.Pool | asyncpg.Connection, config_id: str, box: SecretBox | None = None
) -> StoredConfig | None:
    row = await pool.fetchrow("SELECT * FROM sync_configs WHERE id = $1", config_id)
    return _config_from_row(row, box) if row else None


async def config_revisions(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT id, revision FROM sync_configs")
    return {r["id"]: r["revision"] for r in rows}


async def set_config_warnings(
    pool: asyncpg.Pool, config_id: str, warnings: Sequence[str]
) -> bool:
    """Replace what providers report about a configuration; True when it changed.

    Not a configuration change: the revision stays, nothing is re-queued."""
    result: str = await pool.execute(
        "UPDATE sync_configs SET warnings = $2::jsonb"
        " WHERE id = $1 AND warnings IS DISTINCT FROM $2::jsonb",
        config_id, json.dumps(list(warnings)),
    )
    return result.split()[-1] != "0"


async def reencrypt(pool: asyncpg.Pool, box: SecretBox) -> int:
    """Re-encrypt every stored secret with the first key (key rotation)."""
    count = 0
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT id, secrets FROM sync_configs WHERE secrets IS NOT NULL FOR UPDATE"
        )
        for row in rows:
            await conn.execute(
                "UPDATE sync_configs SET secrets = $2 WHERE id = $1",
                row["id"], box.rotate(row["secrets"]),
            )
            count += 1
    return count


async def grant_consent(pool: asyncpg.Pool, state: str, tenant_id: str) -> str | None:
    """Record an admin consent; returns the configuration id or None for an unknown state."""
    async with pool.acquire() as conn, conn.transaction():
        config_id: str | None = await conn.fetchval(
            "DELETE FROM consent_states WHERE state = $1"
            " AND created_at > now() - interval '1 day' RETURNING config_id",
            state,
        )
        if config_id is None:
            return None
        await conn.execute(
            "UPDATE sync_configs SET granted_tenant_id = $2, revision = revision + 1,"
            " updated_at = now() WHERE id = $1",
            config_id, tenant_id,
        )
        await requeue(conn, config_id, only_failed=True)
    return config_id


async def new_consent_state(pool: asyncpg.Pool, config_id: str, state: str) -> None:
    await pool.execute(
        "INSERT INTO consent_states (state, config_id) VALUES ($1, $2)", state, config_id
    )


# --- intake -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Incoming:
    absence: Absence
    data: dict[str, Any]
    event_time: dt.datetime | None


_RECORD = """
WITH incoming AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::boolean[], $5::text[],
                         $6::timestamptz[], $7::date[], $8::text[])
        AS t(tenant, id, version, deleted, data, event_time, end_date, establishment_id)
), up AS (
    INSERT INTO absences AS a (tenant, id, version, deleted, data, event_time, end_date,
                               establishment_id)
    SELECT tenant, id, version, deleted, data::jsonb, event_time, end_date, establishment_id
    FROM incoming
    ON CONFLICT (tenant, id) DO UPDATE SET
        version = EXCLUDED.version, deleted = EXCLUDED.deleted, data = EXCLUDED.data,
        event_time = EXCLUDED.event_time, received_at = now(),
        end_date = COALESCE(EXCLUDED.end_date, a.end_date),
        establishment_id = COALESCE(EXCLUDED.establishment_id, a.establishment_id)
    WHERE a.version < EXCLUDED.version
    RETURNING a.tenant, a.id, a.event_time
), marked AS (
    INSERT INTO sync_items AS s (config_id, tenant, absence_id, event_time)
    SELECT c.id, up.tenant, up.id, up.event_time
    FROM up JOIN sync_configs c ON c.tenant = up.tenant
    ON CONFLICT (config_id, absence_id) DO UPDATE SET
        change_seq = s.change_seq + 1, status = 'pending', attempts = 0,
        next_attempt_at = now(), first_failure_at = NULL, event_time = EXCLUDED.event_time,
        pending_since = CASE WHEN s.change_seq > s.done_seq THEN s.pending_since ELSE now() END,
        updated_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM up) AS applied, (SELECT count(*) FROM marked) AS marked
"""


async def record_absences(conn: asyncpg.Connection, batch: Sequence[Incoming]) -> tuple[int, int]:
    """Upsert the latest state of absences where newer, mark affected pairs pending.

    Returns (applied, stale). Must run inside the caller's transaction.
    """
    latest: dict[tuple[str, str], Incoming] = {}
    for item in batch:
        key = (item.absence.tenant, item.absence.id)
        if key not in latest or latest[key].absence.version < item.absence.version:
            latest[key] = item
    rows = list(latest.values())
    if not rows:
        return 0, len(batch)
    record = await conn.fetchrow(
        _RECORD,
        [r.absence.tenant for r in rows],
        [r.absence.id for r in rows],
        [r.absence.version for r in rows],
        [r.absence.deleted for r in rows],
        [json.dumps(r.data) for r in rows],
        [r.event_time for r in rows],
        [r.absence.end.date if r.absence.end else None for r in rows],
        [r.absence.employee.establishment_id if r.absence.employee else None for r in rows],
    )
    assert record is not None
    applied = int(record["applied"])
    return applied, len(batch) - applied


# --- dispatch ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    config_id: str
    tenant: str
    absence_id: str
    change_seq: int
    force: bool
    event_id: str | None
    mailbox: str | None
    applied_hash: str | None
    generation: int
    intent: str | None
    attempts: int
    first_failure_at: dt.datetime | None
    pending_since: dt.datetime
    event_time: dt.datetime | None
    absence: Absence


_DUE = (
    "s.change_seq > s.done_seq AND s.next_attempt_at <= now()"
    " AND (s.lease_until IS NULL OR s.lease_until < now())"
)

_CLAIM = f"""
WITH oldest AS (
    -- bounded scan in due order (index sync_items_due); tenants at their limit
    -- are skipped, so another tenant's backlog never hides this one's work
    SELECT s.config_id, s.absence_id, s.tenant, s.next_attempt_at
    FROM sync_items s
    WHERE {_DUE} AND NOT (s.tenant = ANY($2::text[]))
    ORDER BY s.next_attempt_at
    LIMIT $1 * 8
), candidates AS (
    SELECT config_id, absence_id, next_attempt_at FROM (
        SELECT o.config_id, o.absence_id, o.next_attempt_at,
               row_number() OVER (PARTITION BY o.tenant ORDER BY o.next_attempt_at) AS rn
        FROM oldest o
    ) ranked
    WHERE rn <= $3
    ORDER BY next_attempt_at
    LIMIT $1
), locked AS (
    SELECT s.config_id, s.absence_id FROM sync_items s
    JOIN candidates c USING (config_id, absence_id)
    WHERE {_DUE}
    FOR UPDATE OF s SKIP LOCKED
)
UPDATE sync_items s SET lease_until = now() + make_interval(secs => $4)
FROM locked, absences a
WHERE s.config_id = locked.config_id AND s.absence_id = locked.absence_id
  AND a.tenant = s.tenant AND a.id = s.absence_id
RETURNING s.*, a.deleted AS a_deleted, a.data AS a_data
"""


async def claim(
    pool: asyncpg.Pool,
    *,
    limit: int,
    per_tenant: int,
    busy_tenants: Sequence[str],
    lease_seconds: float,
) -> list[Claimed]:
    """Lease due items; several replicas never lease the same item.

    An item whose recorded absence no longer passes validation (say its time
    zone left the zone database) is marked failed with `invalid_event` here,
    instead of being leased again and again."""
    rows = await pool.fetch(_CLAIM, limit, list(busy_tenants), per_tenant, lease_seconds)
    claimed: list[Claimed] = []
    broken: list[asyncpg.Record] = []
    for r in rows:
        try:
            absence = absence_from_data(r["tenant"], r["a_deleted"], json.loads(r["a_data"]))
        except (InvalidEvent, ValueError, OverflowError, KeyError, TypeError):
            broken.append(r)
            continue
        claimed.append(
            Claimed(
                config_id=r["config_id"],
                tenant=r["tenant"],
                absence_id=r["absence_id"],
                change_seq=r["change_seq"],
                force=r["force"],
                event_id=r["event_id"],
                mailbox=r["mailbox"],
                applied_hash=r["applied_hash"],
                generation=r["generation"],
                intent=r["intent"],
                attempts=r["attempts"],
                first_failure_at=r["first_failure_at"],
                pending_since=r["pending_since"],
                event_time=r["event_time"],
                absence=absence,
            )
        )
    if broken:
        await _fail_unreadable(pool, broken)
    return claimed


async def _fail_unreadable(pool: asyncpg.Pool, rows: Sequence[asyncpg.Record]) -> None:
    await pool.execute(
        "UPDATE sync_items s SET done_seq = GREATEST(s.done_seq, i.seq), status ="
        " CASE WHEN s.change_seq > i.seq THEN 'pending' ELSE 'failed' END,"
        " attempts = s.attempts + 1, lease_until = NULL, last_error_code = 'invalid_event',"
        " last_error_message = 'the recorded absence no longer passes validation',"
        " last_error_hint = 'The HR system must publish this absence again (a newer version).',"
        " first_failure_at = COALESCE(s.first_failure_at, now()), updated_at = now()"
        " FROM unnest($1::text[], $2::text[], $3::bigint[]) AS i(config_id, absence_id, seq)"
        " WHERE s.config_id = i.config_id AND s.absence_id = i.absence_id",
        [r["config_id"] for r in rows], [r["absence_id"] for r in rows],
        [r["change_seq"] for r in rows],
    )


async def begin_creates(pool: asyncpg.Pool, rows: Sequence[tuple[Claimed, str, int]]) -> None:
    """Note, for (item, mailbox, generation) rows, that a create may be in flight,
    so a crash leads to adoption, not a double. One statement for all rows."""
    await pool.execute(
        "UPDATE sync_items s SET intent = 'create', mailbox = i.mailbox, event_id = NULL,"
        " generation = i.generation, updated_at = now()"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])"
        " AS i(config_id, absence_id, mailbox, generation)"
        " WHERE s.config_id = i.config_id AND s.absence_id = i.absence_id",
        [r[0].config_id for r in rows], [r[0].absence_id for r in rows],
        [r[1] for r in rows], [r[2] for r in rows],
    )


async def forget_event(pool: asyncpg.Pool, item: Claimed) -> None:
    await pool.execute(
        "UPDATE sync_items SET event_id = NULL, mailbox = NULL, applied_hash = NULL,"
        " intent = NULL, updated_at = now() WHERE config_id = $1 AND absence_id = $2",
        item.config_id, item.absence_id,
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished item now holds in its calendar."""

    status: str
    wanted: bool
    event_id: str | None = None
    mailbox: str | None = None
    applied_hash: str | None = None


_FINISH = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::boolean[],
                         $6::text[], $7::text[], $8::text[], $9::text[])
        AS t(config_id, absence_id, seq, status, wanted, event_id, mailbox, hash, op)
), done AS (
    UPDATE sync_items s SET done_seq = GREATEST(s.done_seq, i.seq), status =
        CASE WHEN s.change_seq > i.seq THEN 'pending' ELSE i.status END,
        force = s.force AND s.change_seq > i.seq, wanted = i.wanted, event_id = i.event_id,
        mailbox = i.mailbox, applied_hash = i.hash, desired_hash = i.hash, intent = NULL,
        attempts = 0, lease_until = NULL, first_failure_at = NULL, last_error_code = NULL,
        last_error_message = NULL, last_error_hint = NULL, updated_at = now(),
        synced_at = CASE WHEN i.op = 'noop' THEN s.synced_at ELSE now() END
    FROM input i
    WHERE s.config_id = i.config_id AND s.absence_id = i.absence_id
    RETURNING s.config_id, s.absence_id, i.op
)
INSERT INTO sync_log (config_id, absence_id, operation, outcome)
SELECT config_id, absence_id, op, 'ok' FROM done WHERE op <> 'noop'
"""


async def finish_many(pool: asyncpg.Pool, rows: Sequence[tuple[Claimed, Outcome, str]]) -> None:
    """Record completed (item, outcome, operation) rows in one atomic statement;
    an item that changed meanwhile stays pending."""
    await pool.execute(
        _FINISH,
        [r[0].config_id for r in rows], [r[0].absence_id for r in rows],
        [r[0].change_seq for r in rows], [r[1].status for r in rows],
        [r[1].wanted for r in rows], [r[1].event_id for r in rows],
        [r[1].mailbox for r in rows], [r[1].applied_hash for r in rows],
        [r[2] for r in rows],
    )


async def fail(
    pool: asyncpg.Pool,
    item: Claimed,
    *,
    code: str,
    message: str,
    hint: str,
    retry_at: dt.datetime | None,
    operation: str,
) -> None:
    """Record a failure: retry at `retry_at`, or give up (status failed) when None."""
    async with pool.acquire() as conn, conn.transaction():
        if retry_at is None:
            await conn.execute(
                "UPDATE sync_items SET done_seq = GREATEST(done_seq, $3), status ="
                " CASE WHEN change_seq > $3 THEN 'pending' ELSE 'failed' END,"
                " attempts = attempts + 1, lease_until = NULL,"
                " last_error_code = $4, last_error_message = $5, last_error_hint = $6,"
                " first_failure_at = COALESCE(first_failure_at, now()), updated_at = now()"
                " WHERE config_id = $1 AND absence_id = $2",
                item.config_id, item.absence_id, item.change_seq, code, message[:2000], hint,
            )
        else:
            await conn.execute(
                "UPDATE sync_items SET attempts = attempts + 1, lease_until = NULL,"
                " next_attempt_at = $3, last_error_code = $4, last_error_message = $5,"
                " last_error_hint = $6, first_failure_at = COALESCE(first_failure_at, now()),"
                " updated_at = now() WHERE config_id = $1 AND absence_id = $2",
                item.config_id, item.absence_id, retry_at, code, message[:2000], hint,
            )
        await _log(conn, item, operation, "error", code, message)


async def release(pool: asyncpg.Pool, items: Sequence[Claimed]) -> None:
    """Hand leased items back (graceful shutdown)."""
    if not items:
        return
    await pool.execute(
        "UPDATE sync_items SET lease_until = NULL"
        " WHERE (config_id, absence_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        [i.config_id for i in items], [i.absence_id for i in items],
    )


async def _log(
    conn: asyncpg.Connection,
    item: Claimed,
    operation: str,
    outcome: str,
    code: str | None,
    message: str | None,
) -> None:
    await conn.execute(
        "INSERT INTO sync_log (config_id, absence_id, operation, outcome, error_code, message)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        item.config_id, item.absence_id, operation, outcome, code,
        message[:500] if message else None,
    )


# --- bounded storage ------------------------------------------------------------

# consent links are honoured for a day (`grant_consent`); older states only take room
CONSENT_STATE_LIFETIME_DAYS = 1
# a first trim of a long-neglected history may take a while; it holds one connection
TRIM_STATEMENT_TIMEOUT_SECONDS = 900.0
TRIMMED_TABLES = ("sync_log", "consent_states")
MEASURED_TABLES = ("absences", "sync_items", "sync_log", "consent_states")


@dataclass(frozen=True, slots=True)
class Trimmed:
    """Rows deleted by one `trim` run, per table."""

    rows: dict[str, int]


_TRIM_OLD_HISTORY = """
DELETE FROM sync_log WHERE id IN (
    SELECT id FROM sync_log WHERE at < now() - make_interval(days => $1) LIMIT $2
)
"""

_TRIM_ITEM_HISTORY = """
DELETE FROM sync_log WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (
            PARTITION BY config_id, absence_id ORDER BY id DESC
        ) AS newer
        FROM sync_log
    ) ranked
    WHERE newer > $1
    LIMIT $2
)
"""


async def trim(
    pool: asyncpg.Pool,
    *,
    keep_days: int,
    keep_per_item: int,
    min_interval_seconds: float,
    batch: int = 10_000,
) -> Trimmed | None:
    """Delete `sync_log` rows older than `keep_days` or beyond the newest
    `keep_per_item` of their (configuration, absence), and expired consent states.

    Replicas take turns: the run holds an advisory lock, and is skipped (None)
    when another replica holds it or when the fleet trimmed less than
    `min_interval_seconds` ago. Deletes go in batches of `batch` rows, so no
    statement runs long or holds many locks."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", TRIM_LOCK):
            return None
        try:
            recent = await conn.fetchval(
                "SELECT finished_at > now() - make_interval(secs => $1)"
                " FROM maintenance_runs WHERE job = 'trim'",
                min_interval_seconds,
            )
            if recent:
                return None
            deleted = {table: 0 for table in TRIMMED_TABLES}
            for statement, args in (
                (_TRIM_OLD_HISTORY, (keep_days, batch)),
                (_TRIM_ITEM_HISTORY, (keep_per_item, batch)),
            ):
                while True:
                    done = _count(await conn.execute(
                        statement, *args, timeout=TRIM_STATEMENT_TIMEOUT_SECONDS
                    ))
                    deleted["sync_log"] += done
                    if done < batch:
                        break
            deleted["consent_states"] = _count(await conn.execute(
                "DELETE FROM consent_states WHERE created_at < now() - make_interval(days => $1)",
                CONSENT_STATE_LIFETIME_DAYS,
            ))
            # fresh statistics: the row counts `table_stats` reports come from them
            await conn.execute(
                "ANALYZE " + ", ".join(MEASURED_TABLES), timeout=TRIM_STATEMENT_TIMEOUT_SECONDS
            )
            await conn.execute(
                "INSERT INTO maintenance_runs (job, finished_at) VALUES ('trim', now())"
                " ON CONFLICT (job) DO UPDATE SET finished_at = EXCLUDED.finished_at"
            )
            return Trimmed(deleted)
        finally:
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1)", TRIM_LOCK)


def _count(status: str) -> int:
    return int(status.split()[-1])


@dataclass(frozen=True, slots=True)
class TableStats:
    rows: int  # PostgreSQL's estimate (pg_class.reltuples), exact after ANALYZE of a small table
    bytes: int  # with indexes and TOAST


async def table_stats(pool: asyncpg.Pool) -> dict[str, TableStats]:
    """Size of the tables that grow with use; cheap (catalog only, no scan)."""
    rows = await pool.fetch(
        "SELECT c.relname, GREATEST(c.reltuples, 0)::bigint AS estimate,"
        " pg_total_relation_size(c.oid) AS bytes"
        " FROM pg_class c WHERE c.oid = ANY($1::text[]::regclass[])",
        list(MEASURED_TABLES),
    )
    return {r["relname"]: TableStats(int(r["estimate"]), int(r["bytes"])) for r in rows}


@dataclass(frozen=True, slots=True)
class Backlog:
    pending: int
    oldest_seconds: float


async def backlog(pool: asyncpg.Pool) -> Backlog:
    row = await pool.fetchrow(
        "SELECT count(*) AS n, COALESCE(EXTRACT(EPOCH FROM now() - min(pending_since)), 0)"
        " AS age FROM sync_items WHERE change_seq > done_seq"
    )
    assert row is not None
    return Backlog(int(row["n"]), float(row["age"]))


async def status_counts(pool: asyncpg.Pool, config_id: str | None = None) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT status, count(*) AS n FROM sync_items"
        " WHERE $1::text IS NULL OR config_id = $1 GROUP BY status",
        config_id,
    )
    return {r["status"]: int(r["n"]) for r in rows}
