"""PostgreSQL for administration: API tokens, monitoring reads, purge, resync scope.

Every read that answers a tenant's request takes the tenant as a parameter
and filters on it in SQL, so isolation never depends on a caller's check.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import asyncpg

from consumer.events import Absence, absence_from_data
from consumer.secrets import SecretBox
from consumer.store import StoredConfig, _config_from_row, _render_hash, requeue

# --- tokens -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenRow:
    id: str
    tenant: str
    role: str
    name: str | None
    hash: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked: bool


def _token(row: asyncpg.Record) -> TokenRow:
    return TokenRow(
        row["id"], row["tenant"], row["role"], row["name"], row["hash"], row["created_at"],
        row["last_used_at"], row["revoked"],
    )


async def create_token(
    pool: asyncpg.Pool, *, token_id: str, tenant: str, role: str, name: str | None, digest: str
) -> None:
    await pool.execute(
        "INSERT INTO api_tokens (id, tenant, role, name, hash) VALUES ($1, $2, $3, $4, $5)",
        token_id, tenant, role, name, digest,
    )


async def list_tokens(pool: asyncpg.Pool, tenant: str | None = None) -> list[TokenRow]:
    rows = await pool.fetch(
        "SELECT * FROM api_tokens WHERE $1::text IS NULL OR tenant = $1"
        " ORDER BY tenant, created_at, id",
        tenant,
    )
    return [_token(r) for r in rows]


async def revoke_token(pool: asyncpg.Pool, token_id: str) -> bool:
    """True when a token with that id exists (revoking twice is not an error)."""
    result: str = await pool.execute(
        "UPDATE api_tokens SET revoked = true WHERE id = $1", token_id
    )
    return result.split()[-1] != "0"


async def use_token(pool: asyncpg.Pool, digest: str) -> TokenRow | None:
    """The live token with this hash, noting its use (at most once a minute)."""
    row = await pool.fetchrow(
        "WITH t AS (SELECT * FROM api_tokens WHERE hash = $1 AND NOT revoked),"
        " touched AS (UPDATE api_tokens SET last_used_at = now()"
        "  WHERE id = (SELECT id FROM t)"
        "  AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute'))"
        " SELECT * FROM t",
        digest,
    )
    return _token(row) if row is not None else None


# --- configurations of a tenant ---------------------------------------------


async def tenant_configs(
    pool: asyncpg.Pool, tenant: str, box: SecretBox | None = None
) -> list[StoredConfig]:
    rows = await pool.fetch("SELECT * FROM sync_configs WHERE tenant = $1 ORDER BY id", tenant)
    return [_config_from_row(r, box) for r in rows]


async def tenant_config(
    pool: asyncpg.Pool, tenant: str, config_id: str, box: SecretBox | None = None
) -> StoredConfig | None:
    """The configuration when it exists AND belongs to `tenant`; None otherwise."""
    row = await pool.fetchrow(
        "SELECT * FROM sync_configs WHERE id = $1 AND tenant = $2", config_id, tenant
    )
    return _config_from_row(row, box) if row is not None else None


async def config_tenant(pool: asyncpg.Pool, config_id: str) -> str | None:
    tenant: str | None = await pool.fetchval(
        "SELECT tenant FROM sync_configs WHERE id = $1", config_id
    )
    return tenant


@contextlib.asynccontextmanager
async def config_id_lock(pool: asyncpg.Pool, config_id: str) -> AsyncIterator[None]:
    """Serialises API writers of one configuration id (check-then-apply stays atomic,
    so two tenants racing to create the same id cannot take over each other's)."""
    key = zlib.crc32(f"sync_configs:{config_id}".encode())
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1::bigint)", key)
        try:
            yield
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1::bigint)", key)


@dataclass(frozen=True, slots=True)
class Summary:
    """What monitoring shows of a configuration besides its settings."""

    counts: dict[str, int]
    last_success_at: dt.datetime | None
    last_failure_at: dt.datetime | None
    deleting: bool
    #: the same counts per target (`calendar`, `team`...), for the targets holding items
    by_target: dict[str, dict[str, int]] = field(default_factory=dict)


_STATES = ("synced", "pending", "failed", "deleted", "skipped_user_reply")


async def summaries(pool: asyncpg.Pool, tenant: str, ids: Sequence[str]) -> dict[str, Summary]:
    rows = await pool.fetch(
        """
        SELECT c.id, c.purge_requested_at IS NOT NULL AS deleting,
               COALESCE(i.synced, 0) AS synced, COALESCE(i.pending, 0) AS pending,
               COALESCE(i.failed, 0) AS failed, COALESCE(i.deleted, 0) AS deleted,
               COALESCE(i.skipped_user_reply, 0) AS skipped_user_reply,
               i.last_success_at,
               GREATEST(f.at, i.last_failed_item_at) AS last_failure_at
        FROM sync_configs c
        LEFT JOIN LATERAL (
            SELECT count(*) FILTER (WHERE status = 'synced') AS synced,
                   count(*) FILTER (WHERE status = 'pending') AS pending,
                   count(*) FILTER (WHERE status = 'failed') AS failed,
                   count(*) FILTER (WHERE status = 'deleted') AS deleted,
                   count(*) FILTER (WHERE status = 'skipped_user_reply') AS skipped_user_reply,
                   max(synced_at) AS last_success_at,
                   max(updated_at) FILTER (WHERE status = 'failed') AS last_failed_item_at
            FROM sync_items WHERE config_id = c.id
        ) i ON true
        LEFT JOIN LATERAL (
            SELECT at FROM sync_log l
            WHERE l.config_id = c.id AND l.outcome = 'error'
              AND l.error_code IS DISTINCT FROM 'throttled'
            ORDER BY at DESC LIMIT 1
        ) f ON true
        WHERE c.tenant = $1 AND c.id = ANY($2::text[])
        """,
        tenant, list(ids),
    )
    per_target = await pool.fetch(
        "SELECT config_id, target, status, count(*) AS n FROM sync_items"
        " WHERE tenant = $1 AND config_id = ANY($2::text[]) GROUP BY 1, 2, 3",
        tenant, list(ids),
    )
    by_target: dict[str, dict[str, dict[str, int]]] = {}
    for t in per_target:
        counts = by_target.setdefault(t["config_id"], {}).setdefault(
            t["target"], dict.fromkeys(_STATES, 0)
        )
        counts[t["status"]] = int(t["n"])
    return {
        r["id"]: Summary(
            {k: int(r[k]) for k in _STATES},
            r["last_success_at"], r["last_failure_at"], r["deleting"],
            by_target.get(r["id"], {}),
        )
        for r in rows
    }


@dataclass(frozen=True, slots=True)
class LoggedOutcome:
    config_id: str
    mailbox: str | None
    ok: bool
    code: str | None


async def recent_outcomes(
    pool: asyncpg.Pool, ids: Sequence[str], *, window_seconds: float, limit: int
) -> dict[str, list[LoggedOutcome]]:
    """Per configuration, its latest write outcomes (newest first) within the window,
    at most `limit` each; throttling is left out (it is not a failure)."""
    rows = await pool.fetch(
        """
        SELECT c.id AS config_id, w.mailbox, w.outcome, w.error_code
        FROM unnest($1::text[]) AS c(id)
        CROSS JOIN LATERAL (
            SELECT mailbox, outcome, error_code FROM sync_log l
            WHERE l.config_id = c.id AND l.at > now() - make_interval(secs => $2)
              AND l.error_code IS DISTINCT FROM 'throttled'
            ORDER BY l.at DESC, l.id DESC LIMIT $3
        ) w
        """,
        list(ids), window_seconds, limit,
    )
    found: dict[str, list[LoggedOutcome]] = {i: [] for i in ids}
    for r in rows:
        found[r["config_id"]].append(
            LoggedOutcome(r["config_id"], r["mailbox"], r["outcome"] == "ok", r["error_code"])
        )
    return found


@dataclass(frozen=True, slots=True)
class ItemRow:
    absence_id: str
    #: where the item writes (`consumer.targets`): calendar, team...
    target: str
    employee_email: str | None
    mailbox: str | None
    state: str
    code: str | None
    message: str | None
    hint: str | None
    attempts: int
    event_id: str | None
    updated_at: dt.datetime


async def items_page(
    pool: asyncpg.Pool,
    tenant: str,
    config_id: str,
    *,
    state: str | None,
    after: tuple[str, str | None] | None,
    limit: int,
    team_address: str | None = None,
) -> tuple[list[ItemRow], bool]:
    """One page of items in (absence id, target) order, after the item `after`
    (absence id, target; a target of None: after every item of that absence);
    returns (rows, more). `team_address` is shown as the mailbox of team items
    not written yet."""
    after_id, after_target = after if after is not None else (None, None)
    rows = await pool.fetch(
        """
        SELECT s.absence_id, s.target, s.status, s.attempts, s.event_id, s.updated_at,
               s.last_error_code, s.last_error_message, s.last_error_hint,
               a.data #>> '{employee,email}' AS employee_email,
               CASE WHEN s.status NOT IN ('failed', 'pending') THEN s.mailbox
                    WHEN s.target = 'calendar' THEN COALESCE(s.mailbox,
                        lower(a.data #>> '{employee,calendar_address}'),
                        lower(a.data #>> '{employee,email}'))
                    WHEN s.target = 'team' THEN COALESCE(s.mailbox, $7)
                    ELSE s.mailbox END AS mailbox
        FROM sync_items s
        LEFT JOIN absences a ON a.tenant = s.tenant AND a.id = s.absence_id
        WHERE s.config_id = $1 AND s.tenant = $2
          AND ($3::text IS NULL OR s.status = $3)
          AND ($4::text IS NULL OR s.absence_id > $4
               OR (s.absence_id = $4 AND $6::text IS NOT NULL AND s.target > $6))
        ORDER BY s.absence_id, s.target
        LIMIT $5
        """,
        config_id, tenant, state, after_id, limit + 1, after_target, team_address,
    )
    items = [
        ItemRow(
            r["absence_id"], r["target"], r["employee_email"], r["mailbox"], r["status"],
            r["last_error_code"], r["last_error_message"], r["last_error_hint"],
            int(r["attempts"]), r["event_id"], r["updated_at"],
        )
        for r in rows[:limit]
    ]
    return items, len(rows) > limit


async def consent_state(pool: asyncpg.Pool, config_id: str, fresh: str) -> str:
    """A consent state for the configuration: one issued in the last 12 hours when
    there is one (viewing the page must not pile up states), else `fresh`."""
    async with pool.acquire() as conn, conn.transaction():
        existing: str | None = await conn.fetchval(
            "SELECT state FROM consent_states WHERE config_id = $1"
            " AND created_at > now() - interval '12 hours' ORDER BY created_at DESC LIMIT 1",
            config_id,
        )
        if existing is not None:
            return existing
        await conn.execute(
            "INSERT INTO consent_states (state, config_id) VALUES ($1, $2)", fresh, config_id
        )
        return fresh


# --- delete, purge ------------------------------------------------------------


async def delete_config(pool: asyncpg.Pool, tenant: str, config_id: str) -> bool:
    """Remove a configuration now, with its items and history; its events stay."""
    async with pool.acquire() as conn, conn.transaction():
        result: str = await conn.execute(
            "DELETE FROM sync_configs WHERE id = $1 AND tenant = $2", config_id, tenant
        )
        if result.split()[-1] == "0":
            return False
        await conn.execute("DELETE FROM sync_log WHERE config_id = $1", config_id)
    return True


async def start_purge(pool: asyncpg.Pool, stored: StoredConfig) -> int:
    """Make the configuration want no event any more (its scope becomes no
    establishment at all, so rule 5.1 says "not wanted" for every absence) and
    re-queue all its items: the dispatcher then deletes every event it wrote,
    through the same path as any other deletion. `finish_purges` removes the
    configuration once nothing of it is left in a calendar.

    Returns how many events are still to delete, at most (creates whose outcome
    is in doubt count: they are looked for by their ownership mark)."""
    emptied = stored.config.model_copy(update={"establishments": []})
    public = emptied.public_dict()
    public["secrets"] = list(stored.secret_names)  # read without a key: keep the names
    settings = json.dumps(public, sort_keys=True)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE sync_configs SET settings = $2::jsonb, render_hash = $3,"
            " revision = revision + 1, updated_at = now(),"
            " purge_requested_at = COALESCE(purge_requested_at, now())"
            " WHERE id = $1 AND tenant = $4",
            stored.config.id, settings, _render_hash(emptied), stored.config.tenant,
        )
        await requeue(conn, stored.config.id, only_failed=False)
        left: int = await conn.fetchval(
            "SELECT count(*) FROM sync_items WHERE config_id = $1"
            " AND (event_id IS NOT NULL OR intent = 'create' OR lease_until > now())",
            stored.config.id,
        )
    return left


async def cancel_purge(pool: asyncpg.Pool, config_id: str) -> None:
    await pool.execute(
        "UPDATE sync_configs SET purge_requested_at = NULL WHERE id = $1", config_id
    )


async def finish_purges(pool: asyncpg.Pool) -> list[str]:
    """Remove the configurations being purged whose calendars hold nothing of
    theirs any more (no event, no create in doubt, no work pending)."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """
            DELETE FROM sync_configs c
            WHERE c.purge_requested_at IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM sync_items s WHERE s.config_id = c.id
                  AND (s.event_id IS NOT NULL OR s.change_seq > s.done_seq
                       OR s.lease_until > now()
                       -- a create in doubt that adoption could not settle (e.g. the
                       -- mailbox does not exist) has failed: nothing to wait for
                       OR (s.intent = 'create' AND s.status <> 'failed')))
            RETURNING c.id
            """
        )
        ids = [r["id"] for r in rows]
        if ids:
            await conn.execute("DELETE FROM sync_log WHERE config_id = ANY($1::text[])", ids)
    return ids


@dataclass(frozen=True, slots=True)
class PurgeLeft:
    """What keeps a configuration being purged from being removed."""

    left: int  # items whose calendar may still hold an event, or with work pending
    stuck: int  # of those, failed for good (a delete the calendar refused)


async def purge_left(pool: asyncpg.Pool, config_id: str) -> PurgeLeft | None:
    """For `config delete --purge --wait`: None once the configuration is gone.
    Counts what `finish_purges` waits for."""
    row = await pool.fetchrow(
        """
        SELECT EXISTS (SELECT 1 FROM sync_configs WHERE id = $1) AS present,
               count(*) FILTER (WHERE s.event_id IS NOT NULL OR s.change_seq > s.done_seq
                                OR s.lease_until > now()
                                OR (s.intent = 'create' AND s.status <> 'failed')) AS left,
               count(*) FILTER (WHERE s.status = 'failed' AND s.change_seq <= s.done_seq
                                AND s.event_id IS NOT NULL) AS stuck
        FROM sync_items s WHERE s.config_id = $1
        """,
        config_id,
    )
    assert row is not None
    if not row["present"]:
        return None
    return PurgeLeft(int(row["left"]), int(row["stuck"]))


# --- resync scope (used by the interim resync adapter) ------------------------


async def absences_in_scope(
    pool: asyncpg.Pool,
    tenant: str,
    *,
    since: dt.date | None,
    establishments: Sequence[str] | None,
) -> list[Absence]:
    """The tenant's absences ending on or after `since`, of those establishments."""
    rows = await pool.fetch(
        "SELECT tenant, deleted, data FROM absences WHERE tenant = $1"
        " AND ($2::date IS NULL OR end_date >= $2)"
        " AND ($3::text[] IS NULL OR establishment_id = ANY($3::text[]))"
        " ORDER BY id",
        tenant, since, list(establishments) if establishments is not None else None,
    )
    return [absence_from_data(r["tenant"], r["deleted"], json.loads(r["data"])) for r in rows]


async def item_seqs(pool: asyncpg.Pool, config_id: str, ids: Sequence[str]) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT absence_id, change_seq FROM sync_items"
        " WHERE config_id = $1 AND absence_id = ANY($2::text[]) AND target = 'calendar'",
        config_id, list(ids),
    )
    return {r["absence_id"]: int(r["change_seq"]) for r in rows}


@dataclass(frozen=True, slots=True)
class Progress:
    done: int
    written: int
    failed: int
    gone: int  # marked items that no longer exist (their configuration was deleted)


async def progress(
    pool: asyncpg.Pool, config_id: str, seqs: dict[str, int], since: dt.datetime
) -> Progress:
    """How many of the marked items have been processed up to their marked change,
    how many of those wrote to a calendar after `since`, how many failed."""
    row = await pool.fetchrow(
        """
        SELECT count(*) FILTER (WHERE s.done_seq >= m.seq) AS done,
               count(*) FILTER (WHERE s.done_seq >= m.seq AND s.status <> 'failed'
                                AND s.synced_at >= $4) AS written,
               count(*) FILTER (WHERE s.done_seq >= m.seq AND s.status = 'failed') AS failed,
               count(*) FILTER (WHERE s.absence_id IS NULL) AS gone
        FROM unnest($2::text[], $3::bigint[]) AS m(absence_id, seq)
        LEFT JOIN sync_items s ON s.config_id = $1 AND s.absence_id = m.absence_id
            AND s.target = 'calendar'
        """,
        config_id, list(seqs), list(seqs.values()), since,
    )
    assert row is not None
    return Progress(int(row["done"]), int(row["written"]), int(row["failed"]), int(row["gone"]))

