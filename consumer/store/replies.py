"""PostgreSQL for automatic replies (`auto_reply:`, migration 0012).

A mailbox holds one reply whichever absence it is for, so what we last did
to it is kept per configuration and mailbox (`auto_replies`), and the reply
item of any absence of that mailbox reads all its absences
(`mailbox_absences`, through the index on the target address).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import asyncpg
import orjson

from consumer.events import Absence, InvalidEvent, absence_from_data
from consumer.replies import ReplyRecord

REPLY = "reply"

_ADDRESS = (
    "lower(btrim(COALESCE(NULLIF(data #>> '{employee,calendar_address}', ''),"
    " data #>> '{employee,email}')))"
)


async def mailbox_absences(
    pool: asyncpg.Pool, tenant: str, mailbox: str, since: dt.date,
) -> list[Absence]:
    """The latest known state of `tenant`'s absences whose target address
    (rule 5.5) is `mailbox` and that end on or after `since`. Rows that no
    longer pass validation are left out (their own items report them)."""
    rows = await pool.fetch(
        "SELECT id, data::text AS data FROM absences"
        f" WHERE tenant = $1 AND NOT deleted AND {_ADDRESS} = $2"
        " AND (end_date IS NULL OR end_date >= $3)",
        tenant, mailbox.strip().lower(), since,
    )
    found: list[Absence] = []
    for row in rows:
        try:
            found.append(absence_from_data(tenant, False, orjson.loads(row["data"])))
        except (InvalidEvent, ValueError, OverflowError, KeyError, TypeError):
            continue
    return found


async def reply_record(pool: asyncpg.Pool, config_id: str, mailbox: str) -> ReplyRecord | None:
    row = await pool.fetchrow(
        "SELECT readback, applied_hash, intent FROM auto_replies"
        " WHERE config_id = $1 AND mailbox = $2",
        config_id, mailbox,
    )
    if row is None:
        return None
    return ReplyRecord(row["readback"], row["applied_hash"], row["intent"])


async def begin_reply(pool: asyncpg.Pool, config_id: str, mailbox: str, intent: str) -> None:
    """Before a write: its fingerprint, so a crash before `end_reply` leaves the
    written reply recognisably ours."""
    await pool.execute(
        "INSERT INTO auto_replies AS r (config_id, mailbox, intent) VALUES ($1, $2, $3)"
        " ON CONFLICT (config_id, mailbox) DO UPDATE SET intent = EXCLUDED.intent,"
        " updated_at = now()",
        config_id, mailbox, intent,
    )


async def end_reply(
    pool: asyncpg.Pool, config_id: str, mailbox: str, *, readback: str,
    applied_hash: str | None, absence_ids: Sequence[str], recheck_at: dt.datetime | None,
) -> None:
    """After a write: the digest read back, what was wanted, and when a later
    absence's reply takes over."""
    await pool.execute(
        "INSERT INTO auto_replies AS r (config_id, mailbox, readback, applied_hash, intent,"
        " absence_ids, recheck_at) VALUES ($1, $2, $3, $4, NULL, $5::text[], $6)"
        " ON CONFLICT (config_id, mailbox) DO UPDATE SET readback = EXCLUDED.readback,"
        " applied_hash = EXCLUDED.applied_hash, intent = NULL,"
        " absence_ids = EXCLUDED.absence_ids, recheck_at = EXCLUDED.recheck_at,"
        " updated_at = now()",
        config_id, mailbox, readback, applied_hash, list(absence_ids), recheck_at,
    )


async def set_recheck(
    pool: asyncpg.Pool, config_id: str, mailbox: str, recheck_at: dt.datetime | None,
) -> None:
    await pool.execute(
        "UPDATE auto_replies SET recheck_at = $3 WHERE config_id = $1 AND mailbox = $2"
        " AND recheck_at IS DISTINCT FROM $3",
        config_id, mailbox, recheck_at,
    )


async def queue_due_rechecks(pool: asyncpg.Pool) -> int:
    """Mailboxes whose reply ended while a later absence waits: their reply items
    are queued again (once, whichever replica gets there). Returns how many."""
    count: int = await pool.fetchval(
        "WITH due AS ("
        "  UPDATE auto_replies SET recheck_at = NULL"
        "  WHERE recheck_at IS NOT NULL AND recheck_at <= now()"
        "  RETURNING config_id, mailbox"
        "), queued AS ("
        "  UPDATE sync_items s SET change_seq = s.change_seq + 1, status = 'pending',"
        "    attempts = 0, next_attempt_at = now(), first_failure_at = NULL,"
        "    pending_since = CASE WHEN s.change_seq > s.done_seq THEN s.pending_since"
        "                    ELSE now() END, updated_at = now()"
        "  FROM due WHERE s.config_id = due.config_id AND s.target = $1"
        "    AND s.mailbox = due.mailbox"
        "  RETURNING 1"
        ") SELECT count(*) FROM queued",
        REPLY,
    )
    return count
