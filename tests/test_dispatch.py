"""Dispatcher guarantees (docs/guarantees.md) with the real intake, broker and
database, against the in-memory calendar."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import structlog

from consumer.providers.base import PROVIDER_ERROR, THROTTLED, ProviderError
from consumer.providers.memory import MemoryCalendar, MemoryProvider
from consumer.render import Mark
from consumer.settings import Settings
from tests.conftest import Publisher, event, wait_until
from tests.harness import apply, settled, sync_config, worker
from tests.provider_contract import desired


async def test_events_become_calendar_entries(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, sync_config())
    await publisher.send(event("abs-1", 1, email="jane@acme.com"))
    await publisher.send(event("abs-2", 1, email="john@acme.com", status="pending"))
    await publisher.send(event("abs-3", 1, email="john@acme.com", status="denied"))
    await publisher.flush()
    calendar = MemoryCalendar()
    async with worker(settings, calendar=calendar):
        await wait_until(lambda: settled(pool, 3))
    stored = {(e.event.mailbox, e.event.mark.absence_id, e.event.show_as) for e in calendar.all()}
    assert stored == {("jane@acme.com", "abs-1", "busy"), ("john@acme.com", "abs-2", "tentative")}
    row = await pool.fetchrow("SELECT * FROM sync_items WHERE absence_id = 'abs-1'")
    assert row["status"] == "synced" and row["event_id"] and row["mailbox"] == "jane@acme.com"
    assert row["applied_hash"]


async def test_three_quick_changes_give_one_write(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, sync_config())
    for version, status in [(1, "pending"), (2, "approved"), (3, "approved")]:
        doc = event("abs-1", version, status=status)
        doc["data"]["account"]["name"] = f"Leave v{version}"
        await publisher.send(doc)
    await publisher.flush()
    calendar = MemoryCalendar()
    async with worker(settings, calendar=calendar):
        await wait_until(lambda: settled(pool))
    assert [op for op, _ in calendar.calls] == ["create"]
    (only,) = calendar.all()
    assert only.event.show_as == "busy"


async def test_replay_writes_nothing_and_change_updates(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, sync_config())
    doc = event("abs-1", 1)
    await publisher.send(doc)
    await publisher.flush()
    calendar = MemoryCalendar()
    async with worker(settings, calendar=calendar):
        await wait_until(lambda: settled(pool))
    assert len(calendar.calls) == 1
    # replay the same event, then a cancellation
    await publisher.send(doc)
    await publisher.send(event("abs-1", 2, status="cancelled"))
    await publisher.flush()
    async with worker(settings, calendar=calendar):
        await wait_until(lambda: settled(pool))
        await wait_until(lambda: _status(pool, "abs-1", "deleted"))
    assert [op for op, _ in calendar.calls] == ["create", "delete"]
    assert calendar.all() == []


async def _status(pool: asyncpg.Pool, absence_id: str, status: str) -> bool:
    got = await pool.fetchval("SELECT status FROM sync_items WHERE absence_id = $1", absence_id)
    return bool(got == status)


async def test_retry_after_is_honoured_then_succeeds(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, sync_config())
    calendar = MemoryCalendar()
    calendar.fail_next(
        ProviderError(THROTTLED, "429", retriable=True, retry_after=1.5),
        ProviderError(PROVIDER_ERROR, "503", retriable=True, retry_after=1.0),
    )
    await publisher.send(event("abs-1", 1))
    await publisher.flush()
    fast = settings.model_copy(update={"retry_base_seconds": 0.01})
    async with worker(fast, calendar=calendar):
        await wait_until(lambda: _status(pool, "abs-1", "synced"))
    ops = [op for op, _ in calendar.calls]
    # after an attempt whose outcome is unknown, look for the event before creating again
    # (the scripted faults hit whichever call comes next: create, then find)
    assert ops == ["create", "find", "find", "create"]
    stamps = calendar.call_times
    assert stamps[1] - stamps[0] >= 1.5  # nothing before Retry-After elapsed
    assert stamps[2] - stamps[1] >= 1.0
    assert len(calendar.all()) == 1
    row = await pool.fetchrow("SELECT attempts, last_error_code FROM sync_items")
    assert row["attempts"] == 0 and row["last_error_code"] is None


async def test_permanent_failure_recorded_with_code_and_hint(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, sync_config())
    calendar = MemoryCalendar()
    calendar.fail_next(ProviderError("mailbox_not_found", "ErrorInvalidUser", retriable=False))
    await publisher.send(event("abs-1", 1))
    await publisher.flush()
    async with worker(settings, calendar=calendar):
        await wait_until(lambda: _status(pool, "abs-1", "failed"))
    row = await pool.fetchrow("SELECT * FROM sync_items")
    assert row["last_error_code"] == "mailbox_not_found"
    assert "address" in row["last_error_hint"]
    assert row["done_seq"] == row["change_seq"]  # not retried until asked
    assert calendar.all() == []


async def test_hanging_tenant_does_not_delay_another(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, sync_config("slow-cal", "slow"), sync_config("fast-cal", "fast"))
    calendar = MemoryCalendar()
    calendar.hanging.add("stuck@slow.com")
    for i in range(30):
        await publisher.send(event(f"slow-{i}", 1, tenant="slow", email="stuck@slow.com"))
    for i in range(60):
        await publisher.send(event(f"fast-{i}", 1, tenant="fast", email=f"u{i % 7}@fast.com"))
    await publisher.flush()
    limited = settings.model_copy(
        update={"tenant_concurrency": 4, "dispatch_concurrency": 8, "request_timeout_seconds": 30}
    )
    async with worker(limited, calendar=calendar):
        async def fast_done() -> bool:
            n = await pool.fetchval(
                "SELECT count(*) FROM sync_items WHERE tenant = 'fast' AND status = 'synced'"
            )
            return bool(n == 60)

        await wait_until(fast_done, timeout=30)
        assert max(calendar.in_flight.values()) <= 4  # the stuck tenant holds 4 slots only
        assert calendar.in_flight["stuck@slow.com"] == 4
        calendar.hanging.clear()
        calendar.released.set()
        await wait_until(lambda: settled(pool, 90), timeout=30)
    assert len(calendar.all()) == 90
    assert calendar.max_in_flight["stuck@slow.com"] <= 4


async def test_two_replicas_share_work_without_doubles(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, sync_config())
    for i in range(200):
        await publisher.send(event(f"abs-{i}", 1, email=f"u{i % 10}@acme.com"))
    await publisher.flush()
    calendar = MemoryCalendar()
    calendar.latency = 0.005
    async with worker(settings, calendar=calendar), worker(settings, calendar=calendar):
        await wait_until(lambda: settled(pool, 200), timeout=60)
    creates = [c for c in calendar.calls if c[0] == "create"]
    assert len(creates) == 200
    assert len(calendar.all()) == 200


async def test_crash_after_create_adopts_instead_of_doubling(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """A create that landed before the mapping was recorded is found by its mark."""
    await apply(pool, sync_config())
    await publisher.send(event("abs-1", 1))
    await publisher.flush()
    calendar = MemoryCalendar()
    calendar.hanging.add("jane.doe@acme.com")
    short = settings.model_copy(update={"lease_seconds": 1.0, "shutdown_timeout_seconds": 0.2})
    async with worker(short, calendar=calendar):
        await wait_until(lambda: _intent(pool))
    # the worker stopped with the create in flight: simulate that it landed anyway
    landed = desired("jane.doe@acme.com", "abs-1", mark=Mark("acme-cal", "abs-1"))
    calendar.hanging.clear()
    await MemoryProvider(calendar).create(landed, transaction_id="lost-in-crash")
    calendar.calls.clear()
    async with worker(short, calendar=calendar):
        await wait_until(lambda: _status(pool, "abs-1", "synced"))
    assert len(calendar.all()) == 1
    assert calendar.calls[0][0] == "find"
    assert "create" not in [op for op, _ in calendar.calls]


async def _intent(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM sync_items WHERE intent = 'create'"))


async def test_sigterm_style_stop_hands_back_in_flight_work(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, sync_config())
    await publisher.send(event("abs-1", 1))
    await publisher.flush()
    calendar = MemoryCalendar()
    calendar.hanging.add("jane.doe@acme.com")
    quick = settings.model_copy(update={"shutdown_timeout_seconds": 0.5})
    started = 0.0
    async with worker(quick, calendar=calendar) as running:
        await wait_until(lambda: _intent(pool))
        started = asyncio.get_running_loop().time()
    elapsed = asyncio.get_running_loop().time() - started
    assert running.task.done()
    assert elapsed < 5
    lease = await pool.fetchval("SELECT lease_until FROM sync_items")
    assert lease is None  # handed back, another replica may take it at once


async def test_provider_mailbox_limit_is_respected(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    class TwoPerMailbox(MemoryProvider):
        mailbox_concurrency = 2

    await apply(pool, sync_config())
    for i in range(40):
        await publisher.send(event(f"abs-{i}", 1, email="busy@acme.com"))
    await publisher.flush()
    calendar = MemoryCalendar()
    calendar.latency = 0.02
    async with worker(settings, factory=lambda _: TwoPerMailbox(calendar)):
        await wait_until(lambda: settled(pool, 40), timeout=60)
    assert len(calendar.all()) == 40
    assert calendar.max_in_flight["busy@acme.com"] == 2


async def test_slots_held_by_hung_calls_do_not_starve_the_rest(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """Seven of eight slots hang: the last one still serves the healthy tenant."""
    slow = [sync_config(f"slow-{n}", f"slow{n}") for n in range(7)]
    await apply(pool, *slow, sync_config("fast-cal", "fast"))
    calendar = MemoryCalendar()
    for n in range(7):
        calendar.hanging.add(f"stuck@slow{n}.com")
        await publisher.send(event(f"s-{n}", 1, tenant=f"slow{n}", email=f"stuck@slow{n}.com"))
    await publisher.flush()
    tight = settings.model_copy(
        update={"tenant_concurrency": 1, "dispatch_concurrency": 8, "request_timeout_seconds": 60}
    )
    async with worker(tight, calendar=calendar):
        async def all_hung() -> bool:
            return sum(calendar.in_flight.values()) == 7

        await wait_until(all_hung)
        for i in range(20):
            await publisher.send(event(f"fast-{i}", 1, tenant="fast", email="u@fast.com"))
        await publisher.flush()

        async def fast_done() -> bool:
            n = await pool.fetchval(
                "SELECT count(*) FROM sync_items WHERE tenant = 'fast' AND status = 'synced'"
            )
            return bool(n == 20)

        await wait_until(fast_done, timeout=30)
        calendar.hanging.clear()
        calendar.released.set()


async def test_a_bug_in_an_items_work_is_recorded_with_back_off_not_released_silently(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """An exception other than ProviderError (here from the calendar code) is our
    bug: logged at ERROR with its traceback, recorded on the item as
    provider_error with an attempt counted and a back-off, then retried."""
    await apply(pool, sync_config())
    calendar = MemoryCalendar()
    calendar.fail_next(KeyError("jane.doe@acme.com"))  # type: ignore[arg-type]
    await publisher.send(event("abs-1", 1))
    await publisher.flush()
    slow_retry = settings.model_copy(update={"retry_base_seconds": 3.0})
    with structlog.testing.capture_logs() as logs:
        async with worker(slow_retry, calendar=calendar) as running:
            await wait_until(lambda: _failed_once(pool))
            row = await pool.fetchrow("SELECT * FROM sync_items")
            assert row["last_error_code"] == PROVIDER_ERROR
            assert row["attempts"] == 1 and row["lease_until"] is None
            assert row["status"] == "pending"
            assert "KeyError" in row["last_error_message"]
            assert "jane.doe" not in row["last_error_message"]
            assert "internal error" in row["last_error_hint"]
            delay = await pool.fetchval("SELECT next_attempt_at - now() FROM sync_items")
            assert delay.total_seconds() > 1  # backed off, not leased again at once
            await wait_until(lambda: _status(pool, "abs-1", "synced"), timeout=30)
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1
    assert "KeyError" in errors[0]["traceback"] and "memory.py" in errors[0]["traceback"]
    assert "jane.doe" not in str(errors[0])
    assert not [e for e in logs if e["event"] == "calendar write failed"]  # not a calendar error
    assert running.metrics.internal_errors.labels("dispatch")._value.get() == 1
    assert [op for op, _ in calendar.calls].count("create") == 2
    assert len(calendar.all()) == 1


async def _failed_once(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval("SELECT attempts = 1 FROM sync_items"))


async def test_a_recorded_absence_that_no_longer_validates_fails_its_item_once(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """Say a zone left the zone database after the absence was recorded: its item
    is marked failed (invalid_event) when leased, instead of being leased again and
    again; the other items are written."""
    doc = event("abs-stale-zone", 1)
    doc["data"]["employee"]["time_zone"] = "Mars/Olympus_Mons"
    await pool.execute(
        "INSERT INTO absences (tenant, id, version, deleted, data) VALUES ('acme', $1, 1,"
        " false, $2::jsonb)", "abs-stale-zone", json.dumps(doc["data"]),
    )
    await apply(pool, sync_config())  # backfills an item for the recorded absence
    await publisher.send(event("abs-1", 1))
    await publisher.flush()
    calendar = MemoryCalendar()
    async with worker(settings, calendar=calendar):
        await wait_until(lambda: _status(pool, "abs-stale-zone", "failed"))
        await wait_until(lambda: _status(pool, "abs-1", "synced"))
    row = await pool.fetchrow("SELECT * FROM sync_items WHERE absence_id = 'abs-stale-zone'")
    assert row["last_error_code"] == "invalid_event" and row["attempts"] == 1
    assert row["lease_until"] is None and row["done_seq"] == row["change_seq"]
    assert [e.event.mark.absence_id for e in calendar.all()] == ["abs-1"]


async def test_secrets_the_worker_cannot_decrypt_fail_visibly_then_sync_once_fixed(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """A worker whose ABSENCE_SYNC_SECRET_KEYS cannot decrypt a configuration's
    stored secrets fails its items (permanent, auth_failed, a hint naming the
    configuration and the keys), so health is failing; with the keys `config apply`
    used, a retry writes them."""
    from cryptography.fernet import Fernet

    from consumer import store
    from consumer.admin import Admin
    from consumer.secrets import SecretBox

    applied_with = Fernet.generate_key().decode()
    await store.apply_configs(
        pool, [sync_config(secrets={"password": "dav-secret-1"})], SecretBox(applied_with)
    )
    await publisher.send(event("abs-1", 1, email="jane@acme.com"))
    await publisher.send(event("abs-2", 1, email="john@acme.com"))
    await publisher.flush()
    calendar = MemoryCalendar()
    for wrong in (Fernet.generate_key().decode(), None):
        await pool.execute("UPDATE sync_items SET status = 'pending', attempts = 0,"
                           " change_seq = change_seq + 1")
        async with worker(settings.model_copy(update={"secret_keys": wrong}),
                          calendar=calendar):
            await wait_until(lambda: _count_failed(pool, 2))
        rows = await pool.fetch("SELECT * FROM sync_items ORDER BY absence_id")
        for row in rows:
            assert row["status"] == "failed" and row["attempts"] >= 1
            assert row["last_error_code"] == "auth_failed"
            assert "acme-cal" in row["last_error_hint"]
            assert "ABSENCE_SYNC_SECRET_KEYS" in row["last_error_hint"]
            assert "--replace-secrets" in row["last_error_hint"]
            assert ("is not set" in row["last_error_message"]) is (wrong is None)
            assert "dav-secret-1" not in json.dumps(dict(row), default=str)
        assert calendar.calls == []
    (view,) = await Admin(pool).syncs("acme", "http://localhost")
    assert view.health.status == "failing" and view.health.code == "auth_failed"
    assert view.cause and "cannot be read" in view.cause

    assert await store.requeue(pool, "acme-cal", only_failed=True) == 2
    async with worker(settings.model_copy(update={"secret_keys": applied_with}),
                      calendar=calendar):
        await wait_until(lambda: settled(pool, 2))
    assert {r["status"] for r in await pool.fetch("SELECT status FROM sync_items")} == {
        "synced"}
    assert len(calendar.all()) == 2


async def _count_failed(pool: asyncpg.Pool, count: int) -> bool:
    failed = await pool.fetchval("SELECT count(*) FROM sync_items WHERE status = 'failed'")
    return bool(failed == count)


async def test_a_delete_with_only_type_tenant_and_data_id_version_removes_the_event(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """`absence.deleted` needs only `type`, `tenant`, `data.id` and `data.version`:
    no CloudEvent `id`, `source` or `specversion`; it is applied, not dead-lettered."""
    await apply(pool, sync_config())
    await publisher.send(event("abs-1", 1))
    await publisher.flush()
    calendar = MemoryCalendar()
    async with worker(settings, calendar=calendar) as running:
        await wait_until(lambda: _status(pool, "abs-1", "synced"))
        await publisher.send({"type": "absence.deleted", "tenant": "acme",
                              "data": {"id": "abs-1", "version": 2}})
        await publisher.flush()
        await wait_until(lambda: _status(pool, "abs-1", "deleted"))
        assert running.metrics.dead_letters.collect()[0].samples == []
    assert calendar.all() == []
    row = await pool.fetchrow("SELECT version, deleted FROM absences WHERE id = 'abs-1'")
    assert (row["version"], row["deleted"]) == (2, True)
