"""PostgreSQL for iCalendar feeds: feed links (stored hashed) and the absences a
feed reads.

A personal feed reads one employee's absences through the index on the
e-mail (migration 0010), never the whole tenant; a team feed reads the
tenant's absences that end inside its window. Both reads happen in one
read-only snapshot: the fingerprint (ids and versions, for the ETag) and the
rows describe the same state.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

# --- feed links -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeedRow:
    id: str
    config_id: str
    tenant: str
    employee: str | None  # None: the configuration's team feed
    name: str | None
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (timestamps in ISO 8601); never the token."""
        return {
            "id": self.id,
            "sync_id": self.config_id,
            "kind": "team" if self.employee is None else "employee",
            "employee": self.employee,
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
            "revoked": self.revoked,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


_COLUMNS = "id, config_id, tenant, employee, name, created_at, last_used_at, revoked_at"


def _feed(row: asyncpg.Record) -> FeedRow:
    return FeedRow(
        row["id"], row["config_id"], row["tenant"], row["employee"], row["name"],
        row["created_at"], row["last_used_at"], row["revoked_at"],
    )


async def create_feed(
    pool: asyncpg.Pool,
    *,
    feed_id: str,
    config_id: str,
    tenant: str,
    employee: str | None,
    name: str | None,
    digest: str,
) -> FeedRow | None:
    """Record a feed of `config_id` if that configuration is `tenant`'s (None otherwise)."""
    row = await pool.fetchrow(
        f"INSERT INTO feed_tokens (id, config_id, tenant, employee, name, hash)"
        f" SELECT $1, c.id, c.tenant, $4, $5, $6 FROM sync_configs c"
        f" WHERE c.id = $2 AND c.tenant = $3 RETURNING {_COLUMNS}",
        feed_id, config_id, tenant, employee, name, digest,
    )
    return _feed(row) if row is not None else None


async def list_feeds(
    pool: asyncpg.Pool, config_id: str, tenant: str | None = None
) -> list[FeedRow]:
    """The feeds of a configuration (of `tenant` when given), oldest first, revoked ones too."""
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM feed_tokens WHERE config_id = $1"
        " AND ($2::text IS NULL OR tenant = $2) ORDER BY created_at, id",
        config_id, tenant,
    )
    return [_feed(r) for r in rows]


async def revoke_feed(
    pool: asyncpg.Pool,
    feed_id: str | None = None,
    *,
    digest: str | None = None,
    config_id: str | None = None,
    tenant: str | None = None,
) -> FeedRow | None:
    """Revoke the feed with this id (or token hash), within `config_id` and `tenant`
    when given; the feed, or None when there is no such feed. Revoking twice is not
    an error (the first revocation time stays)."""
    row = await pool.fetchrow(
        "UPDATE feed_tokens SET revoked_at = COALESCE(revoked_at, now())"
        " WHERE ($1::text IS NULL OR id = $1) AND ($2::text IS NULL OR hash = $2)"
        " AND ($3::text IS NULL OR config_id = $3) AND ($4::text IS NULL OR tenant = $4)"
        " AND ($1::text IS NOT NULL OR $2::text IS NOT NULL)"
        f" RETURNING {_COLUMNS}",
        feed_id, digest, config_id, tenant,
    )
    return _feed(row) if row is not None else None


async def use_feed(pool: asyncpg.Pool, digest: str) -> FeedRow | None:
    """The live feed with this token hash, noting its use (at most once a minute)."""
    row = await pool.fetchrow(
        "WITH f AS (SELECT * FROM feed_tokens WHERE hash = $1 AND revoked_at IS NULL),"
        " touched AS (UPDATE feed_tokens SET last_used_at = now()"
        "  WHERE id = (SELECT id FROM f)"
        "  AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute'))"
        f" SELECT {_COLUMNS} FROM f",
        digest,
    )
    return _feed(row) if row is not None else None


# --- the absences of a feed ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeedScope:
    """Which recorded absences a feed reads: the tenant's, ending on or after
    `since`, of the employee (e-mail, lower case) or of everyone, of the
    establishments (None: any)."""

    tenant: str
    employee: str | None
    since: dt.date
    establishments: Sequence[str] | None


_EMPLOYEE_WHERE = (
    "tenant = $1 AND NOT deleted AND lower(btrim(data #>> '{employee,email}')) = $4"
    " AND end_date >= $2 AND ($3::text[] IS NULL OR establishment_id = ANY($3::text[]))"
)
_TEAM_WHERE = (
    "tenant = $1 AND NOT deleted AND end_date >= $2"
    " AND ($3::text[] IS NULL OR establishment_id = ANY($3::text[]))"
)


class FeedSnapshot:
    """The absences of a feed as of one consistent snapshot."""

    def __init__(self, conn: asyncpg.Connection, scope: FeedScope) -> None:
        self._conn = conn
        where = _TEAM_WHERE if scope.employee is None else _EMPLOYEE_WHERE
        self._from = f" FROM absences WHERE {where}"
        args: list[Any] = [
            scope.tenant, scope.since,
            list(scope.establishments) if scope.establishments is not None else None,
        ]
        if scope.employee is not None:
            args.append(scope.employee)
        self._args = args

    async def fingerprint(self) -> str:
        """Count and digest of the (id, version) pairs: changes whenever a row the
        feed reads is added, removed or replaced by a newer version."""
        fingerprint: str = await self._conn.fetchval(
            "SELECT count(*)::text || ':' || COALESCE(md5(string_agg(id || ':' || version,"
            " ',' ORDER BY id)), '')" + self._from,
            *self._args,
        )
        return fingerprint

    async def keys(self) -> list[tuple[str, int, dt.datetime]]:
        """(id, version, received_at) of every row, in id order (no absence data)."""
        rows = await self._conn.fetch(
            "SELECT id, version, received_at" + self._from + " ORDER BY id", *self._args
        )
        return [(r["id"], int(r["version"]), r["received_at"]) for r in rows]

    async def data(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The recorded data of these absences of the tenant, by id."""
        if not ids:
            return {}
        rows = await self._conn.fetch(
            "SELECT id, data FROM absences WHERE tenant = $1 AND id = ANY($2::text[])",
            self._args[0], list(ids),
        )
        return {r["id"]: json.loads(r["data"]) for r in rows}


@contextlib.asynccontextmanager
async def feed_snapshot(pool: asyncpg.Pool, scope: FeedScope) -> AsyncIterator[FeedSnapshot]:
    async with pool.acquire() as conn, conn.transaction(
        isolation="repeatable_read", readonly=True
    ):
        yield FeedSnapshot(conn, scope)
