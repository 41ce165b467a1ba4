"""The `reply` target: an item's work on the employee's automatic reply.

A mailbox holds one reply whichever absence it is for, so the item of any
absence of a mailbox brings the whole mailbox right (`consumer.replies`:
the earliest group of adjacent wanted absences not ended yet). For an item,
`ReplyRunner.run`:

1. reads the absences of the mailbox it recorded last (an address that
   changed: that mailbox loses this absence) and of its current address;
2. for each, reads the reply the mailbox holds now (read before write) and
   plans (`plan_reply`): write ours, disable ours, keep, or leave the
   employee's own reply alone. No call at all when nothing of ours can be
   there and none is wanted, or when the item already recorded exactly the
   reply wanted, written by us (a replay, a change that leaves the reply as
   it is); a forced resync reads and rewrites;
3. records the fingerprint of a write before the call (`begin_reply`) and
   the digest read back right after it (`end_reply`), so "ours" survives a
   crash between the two;
4. returns the item's outcome: `synced`, `skipped_user_reply` (the
   employee's reply is in place; shown by monitoring), or `deleted` (the
   absence wants no reply).

Calls go through the executor's `call` (per-mailbox limits, metrics) and
database steps through its `persist` (outages waited out within the
lease); failures are the provider's `ProviderError`s, recorded and retried
by the executor like any target's. Work on one mailbox of one configuration
is serialised in this process; across replicas, the executor's mailbox
leases do it for providers with a per-mailbox limit.

`RecheckLoop` re-queues the reply items of mailboxes whose reply ended
while a later absence waits for its turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import asyncpg

from consumer import logs, store
from consumer.config import SyncConfig
from consumer.outages import traceback_of
from consumer.providers.base import PROVIDER_ERROR, Provider, ProviderError
from consumer.replies import (
    DesiredReply,
    DisableReply,
    KeepReply,
    NoReply,
    ReplyAction,
    ReplyRecord,
    ReplySetting,
    UserReply,
    WriteReply,
    desired_reply,
    plan_reply,
    reply_wanted,
)
from consumer.store import replies as reply_store

log = logs.get("dispatch")
T = TypeVar("T")

#: how far back absences are read for a mailbox (an ended absence adjacent to
#: a current one still opens its reply)
LOOKBACK = dt.timedelta(days=14)

Call = Callable[[str, str, Callable[[], Awaitable[Any]]], Awaitable[Any]]
Persist = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class ReplyWork:
    """The action of a reply item: bring `mailboxes` right (the recorded one first)."""

    mailboxes: tuple[str, ...]


@dataclass(slots=True)
class _MailboxLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


def reply_mailboxes(item: store.Claimed) -> tuple[str, ...]:
    """The mailboxes a reply item's work touches: the one it recorded last, then
    the absence's current address."""
    employee = item.absence.employee
    current = employee.target_address if employee is not None and not item.absence.deleted \
        else None
    return tuple(dict.fromkeys(m for m in (item.mailbox, current) if m))


class ReplyRunner:
    def __init__(self, pool: asyncpg.Pool,
                 clock: Callable[[], dt.datetime] | None = None) -> None:
        self.pool = pool
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._locks: dict[tuple[str, str], _MailboxLock] = {}

    async def run(
        self, item: store.Claimed, config: SyncConfig, provider: Provider, *,
        call: Call, persist: Persist,
    ) -> tuple[store.Outcome, str]:
        """Bring the item's mailboxes right; (the item's outcome, the operation the
        history names: reply_write, reply_disable, reply_skipped or noop)."""
        if not provider.supports_replies:
            raise ProviderError(
                PROVIDER_ERROR, f"the {provider.kind} provider cannot set automatic replies",
                retriable=False,
                hint="Remove auto_reply from this configuration, or use a provider that "
                "sets mailbox replies (microsoft365, exchange, google).",
            )
        now = self.clock()
        employee = item.absence.employee
        current = employee.target_address if employee is not None and not item.absence.deleted \
            else None
        operations: list[str] = []
        action_here: ReplyAction | None = None
        desired_here: DesiredReply | None = None
        for mailbox in reply_mailboxes(item):
            key = (config.id, mailbox)
            entry = self._locks.setdefault(key, _MailboxLock())
            entry.users += 1
            try:
                async with entry.lock:
                    desired, action = await self._mailbox(
                        item, config, provider, mailbox, now, call, persist)
            finally:
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[key]
            if isinstance(action, WriteReply):
                operations.append("reply_write")
            elif isinstance(action, DisableReply):
                operations.append("reply_disable")
            if mailbox == current:
                action_here, desired_here = action, desired
        wanted = current is not None and reply_wanted(item.absence, config)
        if not wanted:
            return store.Outcome("deleted", False, None, current), _operation(operations)
        if isinstance(action_here, UserReply):
            log.info("automatic reply left alone: the employee set their own",
                     tenant=item.tenant, config=item.config_id, absence=item.absence_id)
            return (store.Outcome("skipped_user_reply", True, None, current),
                    _operation(operations) if operations else "reply_skipped")
        mine = desired_here is not None and item.absence_id in desired_here.absence_ids
        return (
            store.Outcome("synced", True, None, current,
                          desired_here.content_hash() if mine and desired_here else None),
            _operation(operations),
        )

    async def _mailbox(
        self, item: store.Claimed, config: SyncConfig, provider: Provider, mailbox: str,
        now: dt.datetime, call: Call, persist: Persist,
    ) -> tuple[DesiredReply | None, ReplyAction]:
        pool = self.pool
        since = (now - LOOKBACK).date()
        absences = await persist(
            lambda: reply_store.mailbox_absences(pool, item.tenant, mailbox, since))
        desired = desired_reply(
            absences, config, mailbox, now,
            html_values=provider.reply_html, with_subject=provider.reply_subject,
        )
        if desired is not None:
            desired = replace(desired, setting=provider.reply_form(desired.setting))
        record = await persist(lambda: reply_store.reply_record(pool, config.id, mailbox))
        if desired is None and (record is None or (
            record.applied_hash is None and record.intent is None
        )):
            return None, NoReply()  # nothing of ours can be there: no call
        if desired is not None and _settled(item, mailbox, desired, record):
            # what this item recorded is what we want, and we wrote it: a replay or
            # a change that does not touch the reply makes no call
            recheck = desired.next_group_at
            await persist(lambda: reply_store.set_recheck(pool, config.id, mailbox, recheck))
            return desired, KeepReply()
        held: ReplySetting = await call(mailbox, "read_reply",
                                        lambda: provider.read_reply(mailbox))
        action = plan_reply(held, desired, record, now, force=item.force)
        if isinstance(action, WriteReply):
            wish = action.desired
            await persist(lambda: reply_store.begin_reply(
                pool, config.id, mailbox, wish.setting.fingerprint()))
            stored: ReplySetting = await call(
                mailbox, "write_reply", lambda: provider.write_reply(mailbox, wish.setting))
            await persist(lambda: reply_store.end_reply(
                pool, config.id, mailbox, readback=stored.digest(),
                applied_hash=wish.content_hash(), absence_ids=wish.absence_ids,
                recheck_at=wish.next_group_at))
        elif isinstance(action, DisableReply):
            off: ReplySetting = await call(
                mailbox, "write_reply",
                lambda: provider.write_reply(mailbox, ReplySetting("disabled")))
            await persist(lambda: reply_store.end_reply(
                pool, config.id, mailbox, readback=off.digest(), applied_hash=None,
                absence_ids=(), recheck_at=None))
        elif isinstance(action, KeepReply) and desired is not None:
            recheck = desired.next_group_at
            await persist(lambda: reply_store.set_recheck(pool, config.id, mailbox, recheck))
        return desired, action


def _settled(item: store.Claimed, mailbox: str, desired: DesiredReply,
             record: ReplyRecord | None) -> bool:
    """Whether the item last recorded this very reply at this mailbox, written by us
    and not in doubt (a forced resync reads and rewrites anyway)."""
    wanted = desired.content_hash()
    return (
        not item.force and record is not None and record.intent is None
        and record.readback is not None and record.applied_hash == wanted
        and item.mailbox == mailbox and item.applied_hash == wanted
    )


def _operation(operations: list[str]) -> str:
    if not operations:
        return "noop"
    return "+".join(dict.fromkeys(operations))


class RecheckLoop:
    """Every `interval` seconds: queue the reply items of mailboxes whose reply
    ended while a later absence waits (`store.replies.queue_due_rechecks`), then
    `notify` the dispatcher. A failed round waits for the next one."""

    def __init__(self, pool: asyncpg.Pool, notify: Callable[[], None],
                 interval: float = 30.0) -> None:
        self.pool = pool
        self.notify = notify
        self.interval = interval

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if await reply_store.queue_due_rechecks(self.pool):
                    self.notify()
            except Exception as exc:  # noqa: BLE001 - housekeeping never stops the worker
                if store.is_unavailable(exc):
                    log.warning("reply recheck skipped: PostgreSQL unavailable",
                                error_type=type(exc).__name__)
                else:
                    log.error("reply recheck failed", error_type=type(exc).__name__,
                              traceback=traceback_of(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await stop.wait()
