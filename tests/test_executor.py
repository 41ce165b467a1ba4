"""The executor alone (no scheduler, no Kafka): a leased batch against the
in-memory calendar and the real store. What it must do with a batch: one
intents statement and one outcomes statement, adoption only for creates in
doubt, stragglers never holding back the rest, its errors left as they are,
permanent create refusals no longer in doubt; and the limits it relies on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest

from consumer import store
from consumer.dispatch import (
    Executor,
    Job,
    KeyedLimiter,
    LeaseClock,
    MailboxLeases,
    ProviderCache,
    RetryPolicy,
)
from consumer.events import parse_event
from consumer.metrics import Metrics
from consumer.outages import Outages
from consumer.providers.base import MAILBOX_NOT_FOUND, THROTTLED, ProviderError
from consumer.providers.memory import MemoryCalendar, MemoryProvider
from consumer.render import Mark
from consumer.secrets import SecretBox
from tests.conftest import event
from tests.harness import apply, sync_config
from tests.provider_contract import desired


class CountingPool:
    """The pool, counting the statements sent through it (the executor's only
    database access)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.statements: list[str] = []

    async def execute(self, sql: str, *args: Any) -> str:
        self.statements.append(sql.split()[0] + " " + sql.split()[1])
        result: str = await self.pool.execute(sql, *args)
        return result

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        self.statements.append(sql.split()[0] + " " + sql.split()[1])
        return list(await self.pool.fetch(sql, *args))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


async def record(pool: asyncpg.Pool, *docs: dict[str, Any]) -> None:
    incoming = []
    for doc in docs:
        parsed = parse_event(json.dumps(doc).encode())
        incoming.append(store.Incoming(parsed.absence, parsed.data, parsed.time))
    async with pool.acquire() as conn, conn.transaction():
        await store.record_absences(conn, incoming)


async def lease(pool: asyncpg.Pool, owner: str = "test") -> list[store.Claimed]:
    return await store.claim(pool, limit=100, busy_tenants=[], lease_seconds=30, owner=owner)


def executor(pool: Any, metrics: Metrics | None = None, *, linger: float = 0.02,
             leases: MailboxLeases | None = None) -> Executor:
    metrics = metrics or Metrics()
    return Executor(
        pool, metrics, RetryPolicy(base=5.0), mailbox_slots=KeyedLimiter(),
        mailbox_leases=leases, outages=Outages(metrics), outage_retry_max_seconds=1.0,
        linger=linger,
    )


async def jobs(pool: asyncpg.Pool, items: Sequence[store.Claimed],
               provider: MemoryProvider) -> list[Job]:
    cache = ProviderCache(pool, SecretBox(None), lambda _: provider)
    out = []
    for item in items:
        resolved = await cache.get(item.config_id, item.config_revision)
        assert resolved is not None
        out.append(Job(item, resolved))
    return out


async def run(ex: Executor, batch: list[Job]) -> list[store.Claimed]:
    done: list[store.Claimed] = []
    await ex.run(batch, LeaseClock(asyncio.get_running_loop().time() + 30), done.append)
    return done


async def rows(pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    return {r["absence_id"]: r for r in await pool.fetch("SELECT * FROM sync_items")}


async def test_a_batch_is_one_intents_and_one_outcomes_statement(pool: asyncpg.Pool) -> None:
    await apply(pool, sync_config())
    calendar = MemoryCalendar()
    provider = MemoryProvider(calendar)
    await record(pool, *(event(f"abs-{i}", 1, email=f"u{i % 3}@acme.com") for i in range(12)))
    counting = CountingPool(pool)
    items = await lease(pool)
    done = await run(executor(counting), await jobs(pool, items, provider))
    assert sorted(i.absence_id for i in done) == sorted(i.absence_id for i in items)
    assert counting.statements == ["UPDATE sync_items", "WITH done"]
    assert [op for op, _ in calendar.calls] == ["create"] * 12
    assert {r["status"] for r in (await rows(pool)).values()} == {"synced"}

    # the next versions: updates, deletes and unchanged content, again two statements at most
    await record(pool, *(event(f"abs-{i}", 2, email=f"u{i % 3}@acme.com",
                               status="cancelled" if i < 4 else "approved",
                               end=("2026-12-04", "pm") if i < 8 else ("2026-12-03", "pm"))
                         for i in range(12)))
    counting.statements.clear()
    calendar.calls.clear()
    await run(executor(counting), await jobs(pool, await lease(pool), provider))
    assert counting.statements == ["WITH done"]
    ops = sorted(op for op, _ in calendar.calls)
    assert ops == ["delete"] * 4 + ["update"] * 4
    states = await rows(pool)
    assert [states[f"abs-{i}"]["status"] for i in range(12)] == ["deleted"] * 4 + ["synced"] * 8
    history = await pool.fetch("SELECT operation, count(*) AS n FROM sync_log GROUP BY 1")
    assert {r["operation"]: r["n"] for r in history} == {"create": 12, "delete": 4, "update": 4}


async def test_only_creates_in_doubt_are_looked_for(pool: asyncpg.Pool) -> None:
    await apply(pool, sync_config())
    calendar = MemoryCalendar()
    provider = MemoryProvider(calendar)
    await record(pool, event("abs-lost", 1), event("abs-new", 1))
    # abs-lost: a create was sent, landed, and the worker died before recording it
    await pool.execute("UPDATE sync_items SET intent = 'create', mailbox = 'jane.doe@acme.com',"
                       " generation = 1 WHERE absence_id = 'abs-lost'")
    landed = desired("jane.doe@acme.com", mark=Mark("acme-cal", "abs-lost"))
    await provider.create(landed, transaction_id="before-the-crash")
    calendar.calls.clear()
    await run(executor(pool), await jobs(pool, await lease(pool), provider))
    box = "jane.doe@acme.com"
    assert sorted(calendar.calls) == [("create", box), ("find", box), ("update", box)]
    assert len(calendar.all()) == 2
    states = await rows(pool)
    assert states["abs-lost"]["event_id"] == "mem-0"  # adopted, then updated to what is wanted
    assert states["abs-lost"]["intent"] is None and states["abs-new"]["status"] == "synced"


async def test_a_hung_call_does_not_hold_back_its_batch(pool: asyncpg.Pool) -> None:
    await apply(pool, sync_config())
    calendar = MemoryCalendar()
    calendar.hanging.add("stuck@acme.com")
    provider = MemoryProvider(calendar)
    await record(pool, event("abs-stuck", 1, email="stuck@acme.com"),
                 *(event(f"abs-{i}", 1, email=f"u{i}@acme.com") for i in range(5)))
    done: list[store.Claimed] = []
    ex = executor(pool, linger=0.05)
    batch = await jobs(pool, await lease(pool), provider)
    task = asyncio.create_task(
        ex.run(batch, LeaseClock(asyncio.get_running_loop().time() + 30), done.append)
    )
    try:
        async with asyncio.timeout(10):
            while len(done) < 5:
                await asyncio.sleep(0.01)
        states = await rows(pool)
        assert [states[f"abs-{i}"]["status"] for i in range(5)] == ["synced"] * 5
        assert states["abs-stuck"]["lease_until"] is not None  # still ours, still at work
        calendar.hanging.clear()
        calendar.released.set()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert (await rows(pool))["abs-stuck"]["status"] == "synced"


async def test_a_permanent_refusal_of_a_create_is_no_longer_in_doubt(pool: asyncpg.Pool) -> None:
    """A create refused for good (an unknown mailbox) stored nothing: the item is
    not looked for by its mark when retried. A retriable failure stays in doubt."""
    await apply(pool, sync_config())
    calendar = MemoryCalendar()
    provider = MemoryProvider(calendar)
    await record(pool, event("abs-ghost", 1, email="ghost@acme.com"),
                 event("abs-busy", 1, email="busy@acme.com"))
    calendar.fail_next(
        ProviderError(MAILBOX_NOT_FOUND, "no such mailbox", retriable=False),
        ProviderError(THROTTLED, "slow down", retriable=True, retry_after=1),
    )
    await run(executor(pool), await jobs(pool, await lease(pool), provider))
    states = await rows(pool)
    failed = {r["last_error_code"]: r for r in states.values()}
    ghost, busy = failed[MAILBOX_NOT_FOUND], failed[THROTTLED]
    assert ghost["status"] == "failed" and ghost["intent"] is None
    assert busy["status"] == "pending" and busy["intent"] == "create"
    assert ghost["attempts"] == busy["attempts"] == 1
    assert ghost["lease_until"] is None and busy["lease_until"] is None
    history = await pool.fetch("SELECT absence_id, error_code FROM sync_log ORDER BY id")
    assert sorted(r["error_code"] for r in history) == [MAILBOX_NOT_FOUND, THROTTLED]
    # the operator retries the failed one: a create, no look-up of a mailbox that does not exist
    await store.requeue(pool, "acme-cal", only_failed=True)
    calendar.calls.clear()
    await run(executor(pool), await jobs(pool, await lease(pool), provider))
    assert calendar.calls == [("create", ghost["mailbox"])]


async def test_a_bug_is_not_a_retriable_provider_error(pool: asyncpg.Pool) -> None:
    await apply(pool, sync_config())
    calendar = MemoryCalendar()
    calendar.fail_next(OSError("a socket error the provider did not translate"))  # type: ignore[arg-type]
    await record(pool, event("abs-1", 1))
    metrics = Metrics()
    batch = await jobs(pool, await lease(pool), MemoryProvider(calendar))
    await run(executor(pool, metrics), batch)
    row = (await rows(pool))["abs-1"]
    assert row["last_error_code"] == "provider_error"
    assert row["last_error_message"] == "internal error (OSError) during create"
    assert "internal error" in row["last_error_hint"]
    assert metrics.internal_errors.labels("dispatch")._value.get() == 1
    assert metrics.errors.labels("memory", "provider_error")._value.get() == 0


async def test_keyed_limiter_serves_in_order_and_forgets_idle_keys() -> None:
    limiter: KeyedLimiter[str] = KeyedLimiter()
    order: list[int] = []

    async def user(n: int) -> None:
        async with limiter.hold("box", 2):
            order.append(n)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(user(n) for n in range(6)))
    assert order == list(range(6))
    assert len(limiter) == 0
    assert limiter.try_acquire("t", 1) and not limiter.try_acquire("t", 1)
    assert limiter.loads() == {"t": 1}
    limiter.release("t")
    assert len(limiter) == 0


async def test_a_mailbox_is_leased_to_one_dispatcher_at_a_time(pool: asyncpg.Pool) -> None:
    first, second = MailboxLeases(pool, "one", 30), MailboxLeases(pool, "two", 30)
    assert await first.acquire(["m:a", "m:b"]) == {"m:a", "m:b"}
    assert await second.acquire(["m:b", "m:c"]) == {"m:c"}
    first.release(["m:b"])
    await first.release_idle()  # m:b is not used any more here: handed to whoever asks
    assert first.held == {"m:a"}
    assert await second.acquire(["m:b"]) == {"m:b"}
    # an expired lease goes to whoever asks
    await pool.execute("UPDATE mailbox_leases SET lease_until = now() - interval '1 s'"
                       " WHERE mailbox_key = 'm:a'")
    assert await second.acquire(["m:a"]) == {"m:a"}
    await first.renew()
    assert first.held == set()


@pytest.mark.parametrize("limited", [True, False])
async def test_items_of_a_mailbox_another_dispatcher_holds_are_deferred(
    pool: asyncpg.Pool, limited: bool
) -> None:
    class Limited(MemoryProvider):
        mailbox_concurrency = 4

    await apply(pool, sync_config())
    calendar = MemoryCalendar()
    provider = Limited(calendar) if limited else MemoryProvider(calendar)
    await record(pool, event("abs-held", 1, email="held@acme.com"),
                 event("abs-free", 1, email="free@acme.com"))
    other = MailboxLeases(pool, "another-replica", 30)
    await other.acquire(["memory:held@acme.com"])
    mine = MailboxLeases(pool, "me", 30)
    await run(executor(pool, leases=mine), await jobs(pool, await lease(pool), provider))
    states = await rows(pool)
    assert states["abs-free"]["status"] == "synced"
    held = states["abs-held"]
    if limited:
        assert held["status"] == "pending" and held["attempts"] == 0 and held["lease_until"] is None
        assert calendar.calls == [("create", "free@acme.com")]
    else:  # no per-mailbox limit: nothing to lease
        assert held["status"] == "synced"


async def test_a_create_in_doubt_at_a_mailbox_that_does_not_exist_goes_on_elsewhere(
    pool: asyncpg.Pool,
) -> None:
    """The worker died with a create to a mailbox that does not exist in flight, and
    the absence has moved to another mailbox since: the mailbox held nothing, so
    the event is created where the absence is now (the item is not failed for the
    mailbox it left)."""
    await apply(pool, sync_config())
    calendar = MemoryCalendar()
    provider = MemoryProvider(calendar)
    await record(pool, event("abs-moved", 1, email="jane.doe@acme.com"))
    await pool.execute("UPDATE sync_items SET intent = 'create', mailbox = 'gone@acme.com',"
                       " generation = 1")
    calendar.fail_next(ProviderError(MAILBOX_NOT_FOUND, "no such mailbox", retriable=False))
    await run(executor(pool), await jobs(pool, await lease(pool), provider))
    assert calendar.calls == [("find", "gone@acme.com"), ("create", "jane.doe@acme.com")]
    state = (await rows(pool))["abs-moved"]
    assert (state["status"], state["mailbox"], state["intent"]) == (
        "synced", "jane.doe@acme.com", None)
    assert [e.event.mailbox for e in calendar.all()] == ["jane.doe@acme.com"]
