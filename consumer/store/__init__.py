"""PostgreSQL: the only module that knows SQL (README, 'Architecture': data flows one way).

Tables are created by versioned plain-SQL migrations (`migrations/NNNN_*.sql`)
applied under an advisory lock, so several replicas may start at once.
`is_unavailable` tells callers which errors are an outage to wait out
(connection lost, server restarting, timeout) rather than a refusal.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg
import orjson

from consumer.config import SyncConfig
from consumer.errors import Unreachable, dsn_address
from consumer.events import Absence, InvalidEvent, absence_from_data
from consumer.secrets import SecretBox, SecretsError
from consumer.targets import CALENDAR, KNOWN, targets_of

MIGRATION_LOCK = 0x616273656E6365  # "absence"
BINDING_LOCK = 0x62696E64  # "bind": configuration ids and directories change one at a time
TRIM_LOCK = MIGRATION_LOCK + 1
#: how long an admin-consent link stays usable
CONSENT_LIFETIME = dt.timedelta(days=1)
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


class ConflictError(Exception):
    """A change that would let one tenant reach another's configuration or
    directory; nothing was changed. The message names no other tenant."""


class ConsentMismatch(ConflictError):
    """A file or document names another Microsoft 365 directory than the one an
    administrator's consent recorded; nothing was changed. Consent wins: leave
    `tenant_id` out, or give the consented directory."""


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
    its caller. `Unreachable` (naming the address, never the password) when
    PostgreSQL cannot be reached or refuses the login or the database."""
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout,
            timeout=command_timeout or 60.0,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise Unreachable(
            "PostgreSQL", dsn_address(dsn), "ABSENCE_SYNC_DATABASE_URL", _db_reason(exc)
        ) from exc
    assert pool is not None
    return pool


def _db_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running and listening there?)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and not str(exc).strip():
        return type(exc).__name__
    return " ".join(str(exc).split())[:300] or type(exc).__name__


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


async def pending_migrations(pool: asyncpg.Pool) -> list[str]:
    """The migrations not applied yet (all of them on an empty database), for
    read-only commands that must not change the schema themselves."""
    exists = await pool.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = {r["version"] for r in await pool.fetch("SELECT version FROM schema_migrations")
            } if exists else set()
    return [name for version, name, _ in _migrations() if version not in done]


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
    #: when admin consent recorded `granted_tenant_id` (None: before that was recorded)
    granted_at: dt.datetime | None = None
    #: set by `absence-sync config pause`: nothing is written until `config resume`
    paused_at: dt.datetime | None = None


def _config_from_row(row: asyncpg.Record, box: SecretBox | None) -> StoredConfig:
    settings = json.loads(row["settings"])
    names = settings.pop("secrets", None) or []
    secrets = _decrypt(box, row["id"], row["secrets"]) if box is not None else {}
    if row["granted_tenant_id"] and settings.get("provider") == "microsoft365":
        # consent wins: the directory that consented is the one used (a file naming
        # another one is refused by `apply_configs`, see `_consent_mismatch`)
        settings["provider_settings"]["tenant_id"] = row["granted_tenant_id"]
    config = SyncConfig(**settings, secrets=secrets)
    return StoredConfig(
        config, row["revision"], row["granted_tenant_id"], row["updated_at"],
        tuple(sorted(secrets or names)), tuple(json.loads(row["warnings"])),
        row["granted_at"], row["paused_at"],
    )


#: how an operator gets out of secrets that cannot be read
SECRETS_FIX = (
    "add the key they were encrypted with to ABSENCE_SYNC_SECRET_KEYS, or set them again "
    "from the configuration file with: absence-sync config apply -f FILE --replace-secrets"
)


def _decrypt(box: SecretBox, config_id: str, token: bytes | None) -> dict[str, str]:
    """`box.decrypt`, with an error that names the configuration and the way out."""
    try:
        return box.decrypt(token)
    except SecretsError as exc:
        raise SecretsError(f"configuration {config_id!r}: {exc}; {SECRETS_FIX}") from exc


def _encrypt(box: SecretBox, config: SyncConfig) -> bytes | None:
    try:
        return box.encrypt(config.secrets)
    except SecretsError as exc:
        raise SecretsError(f"configuration {config.id!r}: {exc}") from exc


def _consent_mismatch(config: SyncConfig, old: asyncpg.Record) -> ConsentMismatch | None:
    """The error for a configuration that names another directory than the one
    recorded by admin consent (the same id, in any case, is fine)."""
    granted: str | None = old["granted_tenant_id"]
    given = config.provider_settings.get("tenant_id") if config.provider == "microsoft365" else None
    if not granted or not given or str(given).strip().lower() == granted.lower():
        return None
    when: dt.datetime | None = old["granted_at"]
    at = (f"on {when.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC" if when is not None
          else "before consent times were recorded")
    return ConsentMismatch(
        f"sync {config.id!r}: field 'microsoft365.tenant_id': {str(given)!r} is not the "
        f"directory that granted admin consent ({granted}, {at}); consent wins: leave "
        f"tenant_id out or give {granted}. To link another directory, have its "
        f"administrator grant consent: absence-sync consent-url {config.id}"
    )


async def apply_configs(
    pool: asyncpg.Pool,
    configs: Sequence[SyncConfig],
    box: SecretBox,
    *,
    replace_secrets: bool = False,
) -> dict[str, str]:
    """Create or update configurations in one transaction.

    Returns id -> "created" | "updated" | "unchanged". A configuration whose
    rendering fields change re-renders all its absences; any change re-queues
    its failed items (credentials may have been fixed). Raises `ConflictError`,
    applying nothing, when an id belongs to another tenant's configuration or a
    Microsoft 365 directory is linked to one, and `ConsentMismatch` when a
    file names another directory than the one that granted consent.

    Stored secrets are decrypted to tell whether they changed; ones that cannot
    be (a lost key) raise `SecretsError` naming the configuration, unless
    `replace_secrets`, which stores the given secrets over them.
    """
    outcome: dict[str, str] = {}
    encrypted = {c.id: _encrypt(box, c) for c in configs}
    async with pool.acquire() as conn, conn.transaction():
        # wait for intake transactions in flight, and hold new ones until we commit:
        # an absence recorded concurrently is then either backfilled here or
        # sees the new configuration when intake marks its items
        await conn.execute("LOCK TABLE absences IN SHARE MODE")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", BINDING_LOCK)
        for config in configs:
            directory = config.provider_settings.get("tenant_id")
            if config.provider == "microsoft365" and directory and await _directory_taken(
                conn, str(directory), config.tenant
            ):
                raise ConflictError(
                    f"configuration {config.id!r}: Microsoft 365 directory {directory} is "
                    "linked to a configuration of another tenant"
                )
            # every field, and the names (never the values) of the secrets
            settings = json.dumps(config.public_dict(), sort_keys=True)
            render_hash = _render_hash(config)
            old = await conn.fetchrow(
                "SELECT * FROM sync_configs WHERE id = $1 FOR UPDATE", config.id
            )
            if old is not None and old["tenant"] != config.tenant:
                # never a silent move: the other tenant's events and history stay theirs
                raise ConflictError(
                    f"configuration id {config.id!r} is taken by another tenant: ids are "
                    "unique across tenants, choose another id"
                )
            if old is not None and (mismatch := _consent_mismatch(config, old)) is not None:
                raise mismatch
            targets = targets_of(config)
            if old is None:
                await conn.execute(
                    "INSERT INTO sync_configs (id, tenant, provider, settings, secrets,"
                    " render_hash, targets) VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7::text[])",
                    config.id, config.tenant, config.provider, settings,
                    encrypted[config.id], render_hash, targets,
                )
                await _backfill_items(conn, config.id, config.tenant, targets)
                outcome[config.id] = "created"
                continue
            same_settings = json.loads(old["settings"]) == json.loads(settings)
            same_secrets = _same_secrets(box, old, config, replace=replace_secrets)
            if same_settings and same_secrets:
                outcome[config.id] = "unchanged"
                continue
            await conn.execute(
                "UPDATE sync_configs SET tenant = $2, provider = $3, settings = $4::jsonb,"
                " secrets = $5, render_hash = $6, revision = revision + 1, updated_at = now(),"
                " targets = $7::text[] WHERE id = $1",
                config.id, config.tenant, config.provider, settings,
                encrypted[config.id], render_hash, targets,
            )
            # a target the configuration gains (say a team calendar) gets an item per
            # known absence; items of a target it lost are re-queued below and delete
            # their events (nothing renders for them any more)
            added = [t for t in targets if t not in old["targets"]]
            if added:
                await _backfill_items(conn, config.id, config.tenant, added)
            if old["render_hash"] != render_hash or old["provider"] != config.provider:
                await requeue(conn, config.id, only_failed=False)
            else:
                await requeue(conn, config.id, only_failed=True)
            outcome[config.id] = "updated"
    return outcome


def _same_secrets(box: SecretBox, old: asyncpg.Record, config: SyncConfig, *,
                  replace: bool) -> bool:
    """Whether the stored secrets equal the given ones; with `replace`, secrets
    that cannot be decrypted count as different (they are then overwritten)."""
    if not box.enabled:
        return old["secrets"] is None and not config.secrets
    try:
        return _decrypt(box, config.id, old["secrets"]) == config.secrets
    except SecretsError:
        if replace:
            return False
        raise


async def _backfill_items(
    conn: asyncpg.Connection, config_id: str, tenant: str, targets: Sequence[str]
) -> None:
    """Give a configuration an item per known absence of its tenant and per target
    in `targets` (a new configuration, or targets it gained).

    An existing item is already kept current by intake (`_RECORD`), so it is left alone.
    """
    await conn.execute(
        "INSERT INTO sync_items (config_id, tenant, absence_id, event_time, target)"
        " SELECT $1, a.tenant, a.id, a.event_time, t.target FROM absences a"
        " CROSS JOIN unnest($3::text[]) AS t(target) WHERE a.tenant = $2"
        " ON CONFLICT (config_id, absence_id, target) DO NOTHING",
        config_id, tenant, list(targets),
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


async def sample_mailbox(pool: asyncpg.Pool, config_id: str) -> str | None:
    """A calendar address this configuration writes to (the latest one it used,
    else the latest employee of its tenant), for `config test`."""
    mailbox: str | None = await pool.fetchval(
        "SELECT mailbox FROM sync_items WHERE config_id = $1 AND mailbox IS NOT NULL"
        " AND target = $2 ORDER BY updated_at DESC LIMIT 1",
        config_id, CALENDAR,
    )
    if mailbox:
        return mailbox
    address: str | None = await pool.fetchval(
        "SELECT lower(COALESCE(NULLIF(a.data->'employee'->>'calendar_address', ''),"
        " a.data->'employee'->>'email')) FROM absences a"
        " JOIN sync_configs c ON c.tenant = a.tenant"
        " WHERE c.id = $1 AND NOT a.deleted ORDER BY a.received_at DESC LIMIT 1",
        config_id,
    )
    return address


# --- operator commands: pause, status ------------------------------------------


async def set_paused(pool: asyncpg.Pool, config_id: str, paused: bool) -> StoredConfig | None:
    """Pause or resume a configuration (see `CONFIG_FILTERS`); None when there is no
    such configuration. Not a configuration change: the revision stays and
    nothing is re-queued, so resuming writes exactly the backlog."""
    row = await pool.fetchrow(
        "UPDATE sync_configs SET paused_at ="
        " CASE WHEN $2 THEN COALESCE(paused_at, now()) ELSE NULL END"
        " WHERE id = $1 RETURNING *",
        config_id, paused,
    )
    return _config_from_row(row, None) if row is not None else None


async def pending_by_config(pool: asyncpg.Pool) -> dict[str, Backlog]:
    """Per configuration with work waiting: how many items, and the age of the
    oldest (paused configurations included)."""
    rows = await pool.fetch(
        "SELECT config_id, count(*) AS n,"
        " EXTRACT(EPOCH FROM now() - min(pending_since)) AS age"
        " FROM sync_items WHERE change_seq > done_seq GROUP BY config_id"
    )
    return {r["config_id"]: Backlog(int(r["n"]), float(r["age"])) for r in rows}


async def reencrypt(pool: asyncpg.Pool, box: SecretBox) -> int:
    """Re-encrypt every stored secret with the first key (key rotation)."""
    count = 0
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT id, secrets FROM sync_configs WHERE secrets IS NOT NULL FOR UPDATE"
        )
        for row in rows:
            try:
                rotated = box.rotate(row["secrets"])
            except SecretsError as exc:
                raise SecretsError(f"configuration {row['id']!r}: {exc}; {SECRETS_FIX}") from exc
            await conn.execute(
                "UPDATE sync_configs SET secrets = $2 WHERE id = $1", row["id"], rotated,
            )
            count += 1
    return count


@dataclass(frozen=True, slots=True)
class ConsentRequest:
    config_id: str
    tenant: str


_CONSENT_REQUEST = (
    "SELECT c.id, c.tenant FROM consent_states s JOIN sync_configs c ON c.id = s.config_id"
    " WHERE s.state = $1 AND s.created_at > now() - $2::interval"
)


async def consent_request(pool: asyncpg.Pool, state: str) -> ConsentRequest | None:
    """The configuration a pending (unexpired) consent `state` was made for."""
    row = await pool.fetchrow(_CONSENT_REQUEST, state, CONSENT_LIFETIME)
    return ConsentRequest(row["id"], row["tenant"]) if row else None


async def _directory_taken(
    conn: asyncpg.Connection | asyncpg.Pool, directory: str, tenant: str
) -> bool:
    taken: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM sync_configs WHERE tenant <> $2"
        " AND provider = 'microsoft365' AND lower($1) IN"
        " (lower(granted_tenant_id), lower(settings->'provider_settings'->>'tenant_id')))",
        directory, tenant,
    )
    return taken


async def directory_taken(pool: asyncpg.Pool, directory: str, tenant: str) -> bool:
    """Whether a configuration of a tenant other than `tenant` uses Microsoft 365
    directory `directory` (granted by consent or given in its file)."""
    return await _directory_taken(pool, directory, tenant)


async def grant_consent(pool: asyncpg.Pool, state: str, tenant_id: str) -> str | None:
    """Record an admin consent; returns the configuration id or None for an unknown
    state. Raises `ConflictError` (changing nothing, the state kept) when another
    tenant's configuration uses that directory."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", BINDING_LOCK)
        request = await conn.fetchrow(_CONSENT_REQUEST + " FOR UPDATE OF s", state,
                                      CONSENT_LIFETIME)
        if request is None:
            return None
        if await _directory_taken(conn, tenant_id, request["tenant"]):
            raise ConflictError(
                f"directory {tenant_id} is linked to a configuration of another tenant"
            )
        config_id: str = request["id"]
        await conn.execute("DELETE FROM consent_states WHERE state = $1", state)
        await conn.execute(
            "UPDATE sync_configs SET granted_tenant_id = $2, granted_at = now(),"
            " revision = revision + 1, updated_at = now() WHERE id = $1",
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
    SELECT * FROM jsonb_to_recordset($1::jsonb)
        AS t(tenant text, id text, version bigint, deleted boolean, data jsonb,
             event_time timestamptz, end_date date, establishment_id text)
), up AS (
    INSERT INTO absences AS a (tenant, id, version, deleted, data, event_time, end_date,
                               establishment_id)
    SELECT tenant, id, version, deleted, data, event_time, end_date, establishment_id
    FROM incoming
    ON CONFLICT (tenant, id) DO UPDATE SET
        version = EXCLUDED.version, deleted = EXCLUDED.deleted, data = EXCLUDED.data,
        event_time = EXCLUDED.event_time, received_at = now(),
        end_date = COALESCE(EXCLUDED.end_date, a.end_date),
        establishment_id = COALESCE(EXCLUDED.establishment_id, a.establishment_id)
    WHERE a.version < EXCLUDED.version
    RETURNING a.tenant, a.id, a.event_time
), marked AS (
    -- one item per target of each configuration of the tenant
    INSERT INTO sync_items AS s (config_id, tenant, absence_id, event_time, target)
    SELECT c.id, up.tenant, up.id, up.event_time, t.target
    FROM up JOIN sync_configs c ON c.tenant = up.tenant
    CROSS JOIN LATERAL unnest(c.targets) AS t(target)
    ON CONFLICT (config_id, absence_id, target) DO UPDATE SET
        change_seq = s.change_seq + 1, status = 'pending', attempts = 0,
        next_attempt_at = now(), first_failure_at = NULL, event_time = EXCLUDED.event_time,
        pending_since = CASE WHEN s.change_seq > s.done_seq THEN s.pending_since ELSE now() END,
        updated_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM up) AS applied, (SELECT count(*) FROM marked) AS marked
"""


def _json_default(value: Any) -> str:
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _json_text(value: Any) -> str:
    """`value` as JSON text, for a `jsonb` parameter (one parameter for a batch of
    rows costs far less to send than an array per column): orjson's, or the
    standard library's for what orjson refuses (an integer beyond 64 bits)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, default=_json_default)


class RecentAbsences:
    """The absences one process recorded last in one database, by (tenant, id,
    version, deleted): a version never changes once recorded, so the dispatcher
    leasing their items need not read, parse and check the stored JSON again.
    Bounded (least recent out). Fill it only after the recording committed."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: collections.OrderedDict[tuple[str, str, int, bool], Absence] = (
            collections.OrderedDict()
        )

    def add_all(self, batch: Sequence[Incoming]) -> None:
        for item in batch:
            absence = item.absence
            key = (absence.tenant, absence.id, absence.version, absence.deleted)
            self._entries[key] = absence
            self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, key: tuple[str, str, int, bool]) -> Absence | None:
        return self._entries.get(key)


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
    record = await conn.fetchrow(_RECORD, _json_text([
        {
            "tenant": r.absence.tenant, "id": r.absence.id, "version": r.absence.version,
            "deleted": r.absence.deleted, "data": r.data, "event_time": r.event_time,
            "end_date": r.absence.end.date if r.absence.end else None,
            "establishment_id": (
                r.absence.employee.establishment_id if r.absence.employee else None
            ),
        }
        for r in rows
    ]))
    assert record is not None
    applied = int(record["applied"])
    return applied, len(batch) - applied


# --- dispatch ---------------------------------------------------------------
#
# The dispatcher (consumer/dispatch) leases due items in batches, and records
# a batch's intents in one statement and its outcomes in one statement.


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
    #: the configuration's revision when the item was leased
    config_revision: int = 0
    #: where the item writes (`consumer.targets`): `calendar`, `team`...
    target: str = CALENDAR

    @property
    def key(self) -> tuple[str, str, str]:
        """The item's key: (configuration, absence, target)."""
        return self.config_id, self.absence_id, self.target

    @property
    def in_doubt(self) -> bool:
        """A create was sent and its outcome was never recorded (a crash, or a
        failure that may have stored it): look for its mark before writing."""
        return self.intent == "create" and self.event_id is None and bool(self.mailbox)


_DUE = (
    "s.change_seq > s.done_seq AND s.next_attempt_at <= now()"
    " AND (s.lease_until IS NULL OR s.lease_until < now())"
)

#: Every rule deciding whether an item may be leased lives here: rules on the
#: item (`s`, sync_items) and rules on its configuration (`c`, sync_configs,
#: e.g. `NOT c.paused`). The scan stays in due order on the index either way.
#: Only items of the targets this version knows are leased (`consumer.targets`:
#: the names are constants of ours, never input).
ITEM_FILTERS: tuple[str, ...] = (
    _DUE, "s.target IN (" + ", ".join(f"'{t}'" for t in KNOWN) + ")",
)
#: THE PAUSE FILTER (`absence-sync config pause`): the items of a paused
#: configuration stay pending (intake keeps marking them) and are not claimed,
#: so nothing is written until `config resume`; a purge still deletes its events.
CONFIG_FILTERS: tuple[str, ...] = ("(c.paused_at IS NULL OR c.purge_requested_at IS NOT NULL)",)


def _claim_filters() -> str:
    rules = list(ITEM_FILTERS)
    if CONFIG_FILTERS:
        rules.append(
            "EXISTS (SELECT 1 FROM sync_configs c WHERE c.id = s.config_id AND "
            + " AND ".join(CONFIG_FILTERS) + ")"
        )
    return " AND ".join(rules)


_CLAIM = f"""
WITH oldest AS (
    -- bounded scan in due order (index sync_items_due); tenants at their limit
    -- are skipped, so another tenant's backlog never hides this one's work
    SELECT s.config_id, s.absence_id, s.target, s.tenant, s.next_attempt_at
    FROM sync_items s
    WHERE {_claim_filters()} AND NOT (s.tenant = ANY($2::text[]))
    ORDER BY s.next_attempt_at
    LIMIT $1 * 4
), candidates AS (
    -- tenants take turns (each one's oldest, then each one's second...), so a
    -- large backlog shares the batch with the small ones and fills it alone
    SELECT r.config_id, r.absence_id, r.target FROM (
        SELECT o.*, row_number() OVER (PARTITION BY o.tenant ORDER BY o.next_attempt_at) AS rn
        FROM oldest o
    ) r
    ORDER BY r.rn, r.next_attempt_at
    LIMIT $1
), locked AS (
    -- each candidate by its key, still due and not leased meanwhile
    SELECT l.config_id, l.absence_id, l.target FROM candidates c, LATERAL (
        SELECT s.config_id, s.absence_id, s.target FROM sync_items s
        WHERE s.config_id = c.config_id AND s.absence_id = c.absence_id
          AND s.target = c.target AND {_DUE}
        FOR UPDATE SKIP LOCKED
    ) l
)
UPDATE sync_items s SET lease_until = now() + make_interval(secs => $3), lease_owner = $4
FROM locked, absences a
WHERE s.config_id = locked.config_id AND s.absence_id = locked.absence_id
  AND s.target = locked.target AND a.tenant = s.tenant AND a.id = s.absence_id
RETURNING s.config_id, s.tenant, s.absence_id, s.target, s.change_seq, s.force, s.event_id,
    s.mailbox, s.applied_hash, s.generation, s.intent, s.attempts,
    s.first_failure_at, s.pending_since,
    s.event_time, a.deleted AS a_deleted, a.version AS a_version,
    (SELECT c.revision FROM sync_configs c WHERE c.id = s.config_id) AS config_revision
"""


async def claim(
    pool: asyncpg.Pool,
    *,
    limit: int,
    busy_tenants: Sequence[str],
    lease_seconds: float,
    owner: str,
    recent: RecentAbsences | None = None,
) -> list[Claimed]:
    """Lease up to `limit` due items for `owner`, tenants taking turns; several
    replicas never lease the same item. Items of `busy_tenants` (at their limit)
    are left alone. The absences found in `recent` are taken from there.

    An item whose recorded absence no longer passes validation (say its time
    zone left the zone database) is marked failed with `invalid_event` here,
    instead of being leased again and again."""
    async with pool.acquire() as conn, conn.transaction():
        # the scan must follow the due index and stop early: a generic plan of
        # this prepared statement, or statistics that lag a burst (a resync, a
        # morning), would read every due row and sort them, for each claim
        await conn.execute(
            "SELECT set_config('plan_cache_mode', 'force_custom_plan', true),"
            " set_config('enable_bitmapscan', 'off', true),"
            " set_config('enable_seqscan', 'off', true)"
        )
        rows = await conn.fetch(_CLAIM, limit, list(busy_tenants), lease_seconds, owner)
        known = {
            (r["tenant"], r["absence_id"]): recent.get(
                (r["tenant"], r["absence_id"], r["a_version"], r["a_deleted"])
            ) if recent is not None else None
            for r in rows
        }
        # the absences this process did not record itself: their stored JSON, read and
        # checked again (the zone database may have changed since)
        unknown = [key for key, absence in known.items() if absence is None]
        data = {
            (d["tenant"], d["id"]): d["data"] for d in await conn.fetch(
                "SELECT a.tenant, a.id, a.data::text AS data FROM absences a"
                " JOIN unnest($1::text[], $2::text[]) AS k(tenant, id)"
                " ON a.tenant = k.tenant AND a.id = k.id",
                [k[0] for k in unknown], [k[1] for k in unknown],
            )
        } if unknown else {}
    claimed: list[Claimed] = []
    broken: list[asyncpg.Record] = []
    for r in rows:
        key = (r["tenant"], r["absence_id"])
        absence = known[key]
        if absence is None:
            try:
                absence = absence_from_data(r["tenant"], r["a_deleted"], orjson.loads(data[key]))
            except (InvalidEvent, ValueError, OverflowError, KeyError, TypeError):
                broken.append(r)
                continue
        claimed.append(Claimed(
            r["config_id"], r["tenant"], r["absence_id"], r["change_seq"], r["force"],
            r["event_id"], r["mailbox"], r["applied_hash"], r["generation"], r["intent"],
            r["attempts"], r["first_failure_at"], r["pending_since"], r["event_time"], absence,
            r["config_revision"], r["target"],
        ))
    if broken:
        await _fail_unreadable(pool, broken)
    return claimed


async def _fail_unreadable(pool: asyncpg.Pool, rows: Sequence[asyncpg.Record]) -> None:
    await pool.execute(
        "UPDATE sync_items s SET done_seq = GREATEST(s.done_seq, i.seq), status ="
        " CASE WHEN s.change_seq > i.seq THEN 'pending' ELSE 'failed' END,"
        " attempts = s.attempts + 1, lease_until = NULL, lease_owner = NULL,"
        " last_error_code = 'invalid_event',"
        " last_error_message = 'the recorded absence no longer passes validation',"
        " last_error_hint = 'The HR system must publish this absence again (a newer version).',"
        " first_failure_at = COALESCE(s.first_failure_at, now()), updated_at = now()"
        " FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[])"
        " AS i(config_id, absence_id, seq, target)"
        " WHERE s.config_id = i.config_id AND s.absence_id = i.absence_id"
        " AND s.target = i.target",
        [r["config_id"] for r in rows], [r["absence_id"] for r in rows],
        [r["change_seq"] for r in rows], [r["target"] for r in rows],
    )


async def begin_creates(pool: asyncpg.Pool, rows: Sequence[tuple[Claimed, str, int]]) -> None:
    """Note, for (item, mailbox, generation) rows, that a create may be in flight,
    so a crash leads to adoption, not a double. One statement for all rows.

    The event the row named before (a move's old event, deleted by then) is
    forgotten in the same step."""
    if not rows:
        return
    await pool.execute(
        "UPDATE sync_items s SET intent = 'create', mailbox = i.mailbox, event_id = NULL,"
        " generation = i.generation, updated_at = now()"
        " FROM jsonb_to_recordset($1::jsonb)"
        " AS i(config_id text, absence_id text, target text, mailbox text, generation bigint)"
        " WHERE s.config_id = i.config_id AND s.absence_id = i.absence_id"
        " AND s.target = i.target",
        _json_text([
            {"config_id": r[0].config_id, "absence_id": r[0].absence_id,
             "target": r[0].target, "mailbox": r[1], "generation": r[2]}
            for r in rows
        ]),
    )


async def renew_leases(
    pool: asyncpg.Pool, owner: str, items: Sequence[Claimed], lease_seconds: float
) -> int:
    """Extend the leases `owner` still holds on `items` (a long operation, such
    as a move or an adoption, outlasting one lease); returns how many."""
    if not items:
        return 0
    result: str = await pool.execute(
        "UPDATE sync_items s SET lease_until = now() + make_interval(secs => $4)"
        " FROM unnest($1::text[], $2::text[], $5::text[]) AS k(config_id, absence_id, target)"
        " WHERE s.config_id = k.config_id AND s.absence_id = k.absence_id"
        " AND s.target = k.target AND s.lease_owner = $3",
        [i.config_id for i in items], [i.absence_id for i in items], owner, lease_seconds,
        [i.target for i in items],
    )
    return _count(result)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished item now holds in its calendar."""

    status: str
    wanted: bool
    event_id: str | None = None
    mailbox: str | None = None
    applied_hash: str | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed item: retried at `retry_at`, or given up (status failed) when None.
    `clear_intent`: the server refused the create, nothing can have been stored."""

    code: str
    message: str
    hint: str
    retry_at: dt.datetime | None
    clear_intent: bool = False
    #: the mailbox the failed call was for, when the item has none recorded yet
    mailbox: str | None = None


_OUTCOMES = """
WITH done AS (
    UPDATE sync_items s SET done_seq = GREATEST(s.done_seq, i.seq), status =
        CASE WHEN s.change_seq > i.seq THEN 'pending' ELSE i.status END,
        force = s.force AND s.change_seq > i.seq, wanted = i.wanted, event_id = i.event_id,
        mailbox = i.mailbox, applied_hash = i.hash, desired_hash = i.hash, intent = NULL,
        attempts = 0, lease_until = NULL, lease_owner = NULL, first_failure_at = NULL,
        last_error_code = NULL, last_error_message = NULL, last_error_hint = NULL,
        updated_at = now(), synced_at = CASE WHEN i.op = 'noop' THEN s.synced_at ELSE now() END
    FROM jsonb_to_recordset($1::jsonb)
        AS i(config_id text, absence_id text, target text, seq bigint, status text,
             wanted boolean, event_id text, mailbox text, hash text, op text)
    WHERE s.config_id = i.config_id AND s.absence_id = i.absence_id AND s.target = i.target
    RETURNING s.config_id, s.absence_id, s.target, i.op, i.mailbox
), failed AS (
    UPDATE sync_items s SET
        done_seq = CASE WHEN i.retry_at IS NULL THEN GREATEST(s.done_seq, i.seq)
                   ELSE s.done_seq END,
        status = CASE WHEN i.retry_at IS NOT NULL THEN s.status
                      WHEN s.change_seq > i.seq THEN 'pending' ELSE 'failed' END,
        next_attempt_at = COALESCE(i.retry_at, s.next_attempt_at),
        intent = CASE WHEN i.clear_intent THEN NULL ELSE s.intent END,
        attempts = s.attempts + 1, lease_until = NULL, lease_owner = NULL,
        last_error_code = i.code, last_error_message = i.message, last_error_hint = i.hint,
        first_failure_at = COALESCE(s.first_failure_at, now()), updated_at = now()
    FROM jsonb_to_recordset($2::jsonb)
        AS i(config_id text, absence_id text, target text, seq bigint, code text,
             message text, hint text, retry_at timestamptz, op text, clear_intent boolean,
             address text)
    WHERE s.config_id = i.config_id AND s.absence_id = i.absence_id AND s.target = i.target
    -- the mailbox the failed call was for (set before a create), else the target address
    RETURNING s.config_id, s.absence_id, s.target, i.op, i.code, i.message,
        COALESCE(s.mailbox, i.address) AS mailbox
), deferred AS (
    UPDATE sync_items s SET lease_until = NULL, lease_owner = NULL,
        next_attempt_at = now() + make_interval(secs => $4)
    FROM jsonb_to_recordset($3::jsonb) AS i(config_id text, absence_id text, target text)
    WHERE s.config_id = i.config_id AND s.absence_id = i.absence_id AND s.target = i.target
    RETURNING 1
)
INSERT INTO sync_log (config_id, absence_id, target, operation, outcome, error_code, message,
                      mailbox)
SELECT config_id, absence_id, target, op, 'ok', NULL, NULL, mailbox FROM done WHERE op <> 'noop'
UNION ALL
SELECT config_id, absence_id, target, op, 'error', code, left(message, 500), mailbox FROM failed
"""


async def record_outcomes(
    pool: asyncpg.Pool,
    done: Sequence[tuple[Claimed, Outcome, str]],
    failed: Sequence[tuple[Claimed, Failure, str]] = (),
    deferred: Sequence[Claimed] = (),
    *,
    defer_seconds: float = 1.0,
) -> None:
    """Record in one atomic statement what became of leased items, and free them:
    `done` (item, outcome, operation) rows, `failed` (item, failure, operation)
    rows, and `deferred` items (not attempted: leased again after
    `defer_seconds`, no attempt counted). An item that changed meanwhile stays
    pending; every operation but a no-op goes to the history."""
    def address(item: Claimed, failure: Failure) -> str | None:
        if item.mailbox or failure.mailbox:
            return item.mailbox or failure.mailbox
        employee = item.absence.employee
        return employee.target_address if employee and item.target == CALENDAR else None

    await pool.execute(
        _OUTCOMES,
        _json_text([
            {"config_id": i.config_id, "absence_id": i.absence_id, "target": i.target,
             "seq": i.change_seq, "status": o.status, "wanted": o.wanted,
             "event_id": o.event_id, "mailbox": o.mailbox, "hash": o.applied_hash, "op": op}
            for i, o, op in done
        ]),
        _json_text([
            {"config_id": i.config_id, "absence_id": i.absence_id, "target": i.target,
             "seq": i.change_seq, "code": str(f.code), "message": f.message[:2000],
             "hint": f.hint, "retry_at": f.retry_at, "op": op, "clear_intent": f.clear_intent,
             "address": address(i, f)}
            for i, f, op in failed
        ]),
        _json_text([
            {"config_id": i.config_id, "absence_id": i.absence_id, "target": i.target}
            for i in deferred
        ]),
        defer_seconds,
    )


async def release(pool: asyncpg.Pool, items: Sequence[Claimed]) -> None:
    """Hand leased items back (graceful shutdown)."""
    if not items:
        return
    await pool.execute(
        "UPDATE sync_items SET lease_until = NULL, lease_owner = NULL"
        " WHERE (config_id, absence_id, target) IN"
        " (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))",
        [i.config_id for i in items], [i.absence_id for i in items], [i.target for i in items],
    )


# Mailbox leases: a provider's per-mailbox limit across replicas
# (docs/architecture.md, "Mailbox limits across replicas").


async def lease_mailboxes(
    pool: asyncpg.Pool, holder: str, keys: Sequence[str], lease_seconds: float
) -> set[str]:
    """Lease (or renew) mailboxes for `holder`; returns the keys it now holds.
    A key another holder has leased and not let expire is not granted."""
    if not keys:
        return set()
    rows = await pool.fetch(
        "INSERT INTO mailbox_leases AS m (mailbox_key, holder, lease_until)"
        " SELECT k, $2, now() + make_interval(secs => $3)"
        " FROM unnest($1::text[]) AS k ORDER BY k"
        " ON CONFLICT (mailbox_key) DO UPDATE SET holder = EXCLUDED.holder,"
        " lease_until = EXCLUDED.lease_until"
        " WHERE m.holder = EXCLUDED.holder OR m.lease_until < now()"
        " RETURNING mailbox_key",
        sorted(set(keys)), holder, lease_seconds,
    )
    return {r["mailbox_key"] for r in rows}


async def release_mailboxes(pool: asyncpg.Pool, holder: str, keys: Sequence[str]) -> None:
    """Give up `holder`'s leases on `keys` (no work left for them)."""
    if keys:
        await pool.execute(
            "DELETE FROM mailbox_leases WHERE holder = $1 AND mailbox_key = ANY($2::text[])",
            holder, list(keys),
        )


# --- bounded storage ------------------------------------------------------------

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
            PARTITION BY config_id, absence_id, target ORDER BY id DESC
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
                # consent links are honoured for CONSENT_LIFETIME; older states only take room
                "DELETE FROM consent_states WHERE created_at < now() - $1::interval",
                CONSENT_LIFETIME,
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


async def status_counts_by_target(
    pool: asyncpg.Pool, config_id: str
) -> dict[str, dict[str, int]]:
    """Items of a configuration per target (`calendar`, `team`...) and status."""
    rows = await pool.fetch(
        "SELECT target, status, count(*) AS n FROM sync_items WHERE config_id = $1"
        " GROUP BY target, status ORDER BY target, status",
        config_id,
    )
    found: dict[str, dict[str, int]] = {}
    for r in rows:
        found.setdefault(r["target"], {})[r["status"]] = int(r["n"])
    return found


async def status_counts(pool: asyncpg.Pool, config_id: str | None = None) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT status, count(*) AS n FROM sync_items"
        " WHERE $1::text IS NULL OR config_id = $1 GROUP BY status",
        config_id,
    )
    return {r["status"]: int(r["n"]) for r in rows}


# --- resync -----------------------------------------------------------------
#
# A resync (consumer/resync.py) re-applies the topic beside the live intake,
# then marks the pairs its filters select, remembering on each pair which job
# marked it and at which change_seq, so it can tell exactly what became of
# that write (migration 0005's trigger fills `resync_outcome`).


async def record_replayed(conn: asyncpg.Connection, batch: Sequence[Incoming]) -> tuple[int, int]:
    """`record_absences` for a replay running beside the live intake.

    Both upsert the same absences in their own order; the table lock taken
    first (it waits for intake transactions in flight and holds new ones for
    the few milliseconds of this batch) means the two never deadlock. Must run
    inside the caller's transaction."""
    await conn.execute("LOCK TABLE absences IN SHARE ROW EXCLUSIVE MODE")
    return await record_absences(conn, batch)


async def absence_versions(
    pool: asyncpg.Pool | asyncpg.Connection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """The recorded version of each (tenant, absence id) that is known."""
    if not keys:
        return {}
    rows = await pool.fetch(
        "SELECT a.tenant, a.id, a.version FROM absences a"
        " JOIN unnest($1::text[], $2::text[]) AS k(tenant, id)"
        " ON a.tenant = k.tenant AND a.id = k.id",
        [k[0] for k in keys], [k[1] for k in keys],
    )
    return {(r["tenant"], r["id"]): int(r["version"]) for r in rows}


@dataclass(frozen=True, slots=True)
class StoredAbsence:
    tenant: str
    id: str
    version: int
    deleted: bool
    data: dict[str, Any]


async def resync_scope(
    pool: asyncpg.Pool,
    *,
    tenants: Sequence[str],
    since: dt.date | None,
    establishments: Sequence[str] | None,
    chunk: int = 1000,
) -> AsyncGenerator[list[StoredAbsence], None]:
    """The recorded absences a resync's filters select, in chunks, from one
    consistent snapshot: of `tenants`, ending on or after `since`, of one of
    `establishments` (None: any). Close the iterator when stopping early."""
    async with pool.acquire() as conn, conn.transaction(
        isolation="repeatable_read", readonly=True
    ):
        cursor = conn.cursor(
            "SELECT tenant, id, version, deleted, data FROM absences"
            " WHERE tenant = ANY($1::text[]) AND ($2::date IS NULL OR end_date >= $2)"
            " AND ($3::text[] IS NULL OR establishment_id = ANY($3::text[]))",
            list(tenants), since, list(establishments) if establishments is not None else None,
            prefetch=chunk,
        )
        batch: list[StoredAbsence] = []
        async for row in cursor:
            batch.append(StoredAbsence(
                row["tenant"], row["id"], int(row["version"]), row["deleted"],
                json.loads(row["data"]),
            ))
            if len(batch) >= chunk:
                yield batch
                batch = []
        if batch:
            yield batch


_MARK = """
INSERT INTO sync_items AS s (config_id, tenant, absence_id, target, force, resync_job,
                             resync_seq)
SELECT i.config_id, i.tenant, i.absence_id, t.target, $4, $5, 1
FROM unnest($1::text[], $2::text[], $3::text[]) AS i(config_id, tenant, absence_id)
-- every target of the configuration (its employee calendar, its team calendar...)
JOIN sync_configs c ON c.id = i.config_id
CROSS JOIN LATERAL unnest(c.targets) AS t(target)
ORDER BY i.config_id, i.absence_id, t.target
ON CONFLICT (config_id, absence_id, target) DO UPDATE SET
    change_seq = s.change_seq + 1, status = 'pending', attempts = 0,
    next_attempt_at = now(), first_failure_at = NULL, force = s.force OR EXCLUDED.force,
    pending_since = CASE WHEN s.change_seq > s.done_seq THEN s.pending_since ELSE now() END,
    -- a resync write is not an event's end-to-end latency
    event_time = NULL, updated_at = now(),
    resync_job = EXCLUDED.resync_job, resync_seq = s.change_seq + 1, resync_outcome = NULL
RETURNING s.target
"""


async def mark_for_resync(
    pool: asyncpg.Pool,
    job_id: str,
    pairs: Sequence[tuple[str, str, str]],
    *,
    force: bool,
) -> int:
    """Mark (config id, tenant, absence id) pairs for a write on behalf of job
    `job_id` (created when missing), the item of each target of the
    configuration; returns how many pairs were marked.

    Locks like `record_replayed`, so marking beside the live intake never
    deadlocks, and holds the configurations so none disappears meanwhile."""
    if not pairs:
        return 0
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE absences IN SHARE ROW EXCLUSIVE MODE")
        configs = sorted({p[0] for p in pairs})
        alive = {
            r["id"] for r in await conn.fetch(
                "SELECT id FROM sync_configs WHERE id = ANY($1::text[]) FOR SHARE", configs
            )
        }
        kept = [p for p in pairs if p[0] in alive]
        rows = await conn.fetch(
            _MARK, [p[0] for p in kept], [p[1] for p in kept], [p[2] for p in kept],
            force, job_id,
        )
    return sum(1 for r in rows if r["target"] == CALENDAR)


@dataclass(frozen=True, slots=True)
class ResyncOutcomes:
    written: int
    unchanged: int
    failed: int
    outstanding: int


async def resync_outcomes(pool: asyncpg.Pool, job_id: str) -> ResyncOutcomes:
    """What became of the writes job `job_id` marked, per (configuration,
    absence) pair across its targets: failed when one target failed, else
    written when one was written, else unchanged; outstanding while one is not
    done (a pair re-marked by a later job counts for that one)."""
    row = await pool.fetchrow(
        "SELECT count(*) FILTER (WHERE p.outstanding) AS outstanding,"
        " count(*) FILTER (WHERE NOT p.outstanding AND p.failed) AS failed,"
        " count(*) FILTER (WHERE NOT p.outstanding AND NOT p.failed AND p.written) AS written,"
        " count(*) FILTER (WHERE NOT p.outstanding AND NOT p.failed AND NOT p.written)"
        " AS unchanged FROM ("
        "  SELECT bool_or(resync_outcome IS NULL) AS outstanding,"
        "   bool_or(resync_outcome = 'failed') AS failed,"
        "   bool_or(resync_outcome = 'written') AS written"
        "  FROM sync_items WHERE resync_job = $1 GROUP BY config_id, absence_id) p",
        job_id,
    )
    assert row is not None
    return ResyncOutcomes(
        int(row["written"]), int(row["unchanged"]), int(row["failed"]), int(row["outstanding"])
    )


@dataclass(frozen=True, slots=True)
class ResyncJob:
    """One resync job as recorded. `state` is `failed` (error "abandoned ...")
    for a job whose process stopped renewing its lease."""

    id: str
    tenant: str | None
    config_ids: tuple[str, ...]
    request: dict[str, Any]
    state: str
    phase: str
    records_read: int
    records_total: int
    in_scope: int
    marked: int
    written: int
    unchanged: int
    failed: int
    summary: dict[str, Any] | None
    error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (timestamps in ISO 8601)."""
        doc: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, dt.datetime):
                value = value.isoformat()
            elif isinstance(value, tuple):
                value = list(value)
            doc[name] = value
        return doc


_ABANDONED = (
    "abandoned: the process running it stopped before it finished (no heartbeat since "
)


def _job_from_row(row: asyncpg.Record) -> ResyncJob:
    state, error, finished = row["state"], row["error"], row["finished_at"]
    if state == "running" and row["expired"]:
        state = "failed"
        error = _ABANDONED + row["updated_at"].isoformat() + ")"
    return ResyncJob(
        id=row["id"], tenant=row["tenant"], config_ids=tuple(row["config_ids"]),
        request=json.loads(row["request"]), state=state, phase=row["phase"],
        records_read=int(row["records_read"]), records_total=int(row["records_total"]),
        in_scope=int(row["in_scope"]), marked=int(row["marked"]), written=int(row["written"]),
        unchanged=int(row["unchanged"]), failed=int(row["failed"]),
        summary=json.loads(row["summary"]) if row["summary"] is not None else None,
        error=error, created_at=row["created_at"], updated_at=row["updated_at"],
        finished_at=finished,
    )


async def begin_resync_job(
    pool: asyncpg.Pool,
    *,
    job_id: str,
    tenant: str | None,
    config_ids: Sequence[str],
    request: dict[str, Any],
    lease_seconds: float,
) -> tuple[str, str] | None:
    """Record a running job holding `config_ids`, all or nothing.

    Returns None when started, or (config id, job id) of a running job that
    already holds one of them (and then records nothing). Jobs whose lease ran
    out are closed as abandoned first, so a dead process blocks nobody for
    longer than its lease."""
    wanted = sorted(set(config_ids))
    async with pool.acquire() as conn:
        async with conn.transaction():
            abandoned = await conn.fetch(
                "UPDATE resync_jobs SET state = 'failed', finished_at = now(),"
                " error = $1 || updated_at::text || ')'"
                " WHERE state = 'running' AND lease_until < now() RETURNING id",
                _ABANDONED,
            )
            await conn.execute(
                "DELETE FROM resync_locks WHERE job_id = ANY($1::text[])",
                [r["id"] for r in abandoned],
            )
        while True:
            transaction = conn.transaction()
            await transaction.start()
            try:
                await conn.execute(
                    "INSERT INTO resync_jobs (id, tenant, config_ids, request, lease_until)"
                    " VALUES ($1, $2, $3::text[], $4::jsonb,"
                    " now() + make_interval(secs => $5))",
                    job_id, tenant, list(config_ids), json.dumps(request), lease_seconds,
                )
                # a concurrent start of the same configuration waits here on the
                # key until the other one commits, then finds it taken
                taken = await conn.fetch(
                    "INSERT INTO resync_locks (config_id, job_id)"
                    " SELECT c, $2 FROM unnest($1::text[]) AS c ORDER BY c"
                    " ON CONFLICT (config_id) DO NOTHING RETURNING config_id",
                    wanted, job_id,
                )
                holder = None
                if len(taken) < len(wanted):
                    holder = await conn.fetchrow(
                        "SELECT config_id, job_id FROM resync_locks"
                        " WHERE config_id = ANY($1::text[]) AND job_id <> $2"
                        " ORDER BY config_id LIMIT 1",
                        wanted, job_id,
                    )
            except BaseException:
                await transaction.rollback()
                raise
            if len(taken) == len(wanted):
                await transaction.commit()
                return None
            await transaction.rollback()
            if holder is not None:
                return str(holder["config_id"]), str(holder["job_id"])
            # the holder finished between the two statements: try again


_JOB_COUNTERS = (
    "records_read", "records_total", "in_scope", "marked", "written", "unchanged", "failed"
)


async def renew_resync_job(
    pool: asyncpg.Pool,
    job_id: str,
    *,
    phase: str,
    counters: dict[str, int],
    lease_seconds: float,
) -> bool:
    """Store progress and extend the lease; False when the job is no longer
    this process's (it was closed as abandoned meanwhile)."""
    result: str = await pool.execute(
        "UPDATE resync_jobs SET phase = $2, records_read = $3, records_total = $4,"
        " in_scope = $5, marked = $6, written = $7, unchanged = $8, failed = $9,"
        " lease_until = now() + make_interval(secs => $10), updated_at = now()"
        " WHERE id = $1 AND state = 'running'",
        job_id, phase, *(counters.get(k, 0) for k in _JOB_COUNTERS), lease_seconds,
    )
    return result.split()[-1] != "0"


async def finish_resync_job(
    pool: asyncpg.Pool,
    job_id: str,
    *,
    succeeded: bool,
    counters: dict[str, int],
    summary: dict[str, Any] | None,
    error: str | None,
) -> None:
    """Close a job (unless already closed as abandoned) and free its configurations."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE resync_jobs SET state = $2, phase = 'done', records_read = $3,"
            " records_total = $4, in_scope = $5, marked = $6, written = $7, unchanged = $8,"
            " failed = $9, summary = $10::jsonb, error = $11, finished_at = now(),"
            " updated_at = now() WHERE id = $1 AND state = 'running'",
            job_id, "succeeded" if succeeded else "failed",
            *(counters.get(k, 0) for k in _JOB_COUNTERS),
            json.dumps(summary) if summary is not None else None, error,
        )
        await conn.execute("DELETE FROM resync_locks WHERE job_id = $1", job_id)


async def get_resync_job(pool: asyncpg.Pool, job_id: str, tenant: str) -> ResyncJob | None:
    """Job `job_id` if it is `tenant`'s (None for another tenant's, as for an unknown id)."""
    row = await pool.fetchrow(
        "SELECT *, (state = 'running' AND lease_until < now()) AS expired"
        " FROM resync_jobs WHERE id = $1 AND tenant = $2",
        job_id, tenant,
    )
    return _job_from_row(row) if row is not None else None
