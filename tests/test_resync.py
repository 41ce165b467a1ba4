"""Batch resync (README "Resync and replay") against the real broker and database.

The in-scope figure is checked three ways: a dry run, a real run's marked
pairs, and the test's own oracle computed from what it published.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections import Counter
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from consumer import resync as rs
from consumer import store
from consumer.config import SyncConfig
from consumer.providers.memory import MemoryCalendar, MemoryProvider
from consumer.settings import Settings
from tests.conftest import Publisher, event, wait_until
from tests.harness import apply, settled, worker
from tests.resync_support import (
    committed,
    configs,
    fingerprint,
    groups,
    last_json,
    publish,
    run_cli,
)

ABSENCES = 10_000


def _memory(calendar: MemoryCalendar) -> Any:
    def factory(_: store.StoredConfig) -> MemoryProvider:
        return MemoryProvider(calendar)

    return factory


def _by_id(ids: list[str]) -> list[SyncConfig]:
    return [c for c in configs() if c.id in ids]


def _events(calendar: MemoryCalendar) -> Counter[tuple[str, str]]:
    """(configuration, absence) -> events held in the calendar."""
    return Counter(
        (e.event.mark.config_id, e.event.mark.absence_id) for e in calendar.all()
    )


async def _marked(pool: asyncpg.Pool, job_id: str | None) -> set[tuple[str, str]]:
    rows = await pool.fetch(
        "SELECT config_id, absence_id FROM sync_items WHERE resync_job = $1", job_id
    )
    return {(r["config_id"], r["absence_id"]) for r in rows}


async def test_dry_run_agrees_with_real_run_on_a_large_topic(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """10,000 absences over three tenants: the CLI's dry run, a real run's
    marked pairs and the oracle agree for several filter combinations; the
    dry run changes nothing; real runs leave the live group alone and their
    temporary group is gone; once synced, a real run costs no calendar request."""
    started = time.monotonic()
    await apply(pool, *configs())
    topic = await publish(publisher, ABSENCES)
    published = time.monotonic()
    live_before = await groups(settings)
    before = await fingerprint(pool)

    # nothing consumed yet: the dry run sees what it reads, and changes nothing
    code, out, err = await run_cli(settings, "resync", "--tenant", "acme", "--dry-run", "--json")
    assert code == 0, err
    dry = last_json(out)
    expected = topic.in_scope(_by_id(["acme-all", "acme-paris"]))
    assert dry == {
        "read": topic.records, "in_scope": len(expected), "marked": 0, "written": 0,
        "unchanged": 0, "failed": 0, "dry_run": True,
    }
    assert "read " in err and " of " in err  # plain progress lines on a pipe
    assert await fingerprint(pool) == before
    assert await groups(settings) == live_before
    cli_dry = time.monotonic()

    # a real run records acme's absences and marks exactly the same pairs
    code, out, err = await run_cli(settings, "resync", "--tenant", "acme", "--json")
    assert code == 0, err
    real = last_json(out)
    assert real["marked"] == real["in_scope"] == len(expected)
    assert (real["written"], real["unchanged"], real["failed"]) == (0, 0, 0)
    job = await pool.fetchrow("SELECT * FROM resync_jobs")
    assert job["state"] == "succeeded" and job["tenant"] == "acme"
    assert await _marked(pool, job["id"]) == expected
    assert await groups(settings) == live_before  # the temporary group is gone
    assert not [g for g in live_before if ".resync." in g]
    cli_real = time.monotonic()

    # the live worker consumes everything and writes every wanted pair once
    calendar = MemoryCalendar()
    every = topic.in_scope(configs())
    async with worker(_roomy(settings), calendar=calendar):
        await wait_until(lambda: _synced(pool, len(topic.latest)), timeout=240)
        assert _events(calendar) == Counter(dict.fromkeys(every, 1))
        synced = time.monotonic()
        live_offsets = await committed(settings, settings.group_id)
        calls = len(calendar.calls)

        # a second real run: marked again, written nowhere
        code, out, err = await run_cli(settings, "resync", "--tenant", "acme", "--json")
        assert code == 0, err
        again = last_json(out)
        assert again["marked"] == again["in_scope"] == len(expected)
        job_id = await pool.fetchval(
            "SELECT id FROM resync_jobs ORDER BY created_at DESC LIMIT 1"
        )
        await wait_until(lambda: _outstanding(pool, job_id), timeout=120)
        assert len(calendar.calls) == calls  # unchanged absences: no calendar request
        assert await committed(settings, settings.group_id) == live_offsets
        assert await groups(settings) == live_before | {settings.group_id}
    finished = time.monotonic()
    print(
        f"\n{ABSENCES} absences, {topic.records} records: publish {published - started:.1f} s,"
        f" CLI dry run {cli_dry - published:.1f} s, CLI real run {cli_real - cli_dry:.1f} s,"
        f" live sync {synced - cli_real:.1f} s, second run and its no-op writes"
        f" {finished - synced:.1f} s"
    )


def _roomy(settings: Settings) -> Settings:
    """Enough dispatch slots that thousands of in-memory writes take seconds."""
    return settings.model_copy(update={"tenant_concurrency": 64, "dispatch_concurrency": 256})


async def _outstanding(pool: asyncpg.Pool, job_id: str) -> bool:
    """Every pair the job marked is done (and was counted unchanged)."""
    outcomes = await store.resync_outcomes(pool, job_id)
    return outcomes.outstanding == 0 and outcomes.unchanged > 0


async def test_filter_combinations_dry_run_equals_marked(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """For each combination of filters, beside a running worker: the dry run's
    in_scope, the real run's marked pairs and the oracle agree; writes of
    unchanged events cost no calendar request."""
    await apply(pool, *configs())
    topic = await publish(publisher, 1500, seed=21)
    bootstrap = settings.kafka_bootstrap_servers
    assert bootstrap
    calendar = MemoryCalendar()
    combos: list[tuple[dict[str, Any], set[tuple[str, str]]]] = [
        ({"config_ids": ("acme-paris",), "since": dt.date(2026, 7, 1)},
         topic.in_scope(_by_id(["acme-paris"]), since=dt.date(2026, 7, 1))),
        ({"tenant": "globex", "establishments": ("berlin",)},
         topic.in_scope(_by_id(["globex-all"]), establishments=["berlin"])),
        ({"config_ids": ("acme-all", "initech-all"), "establishments": ("lyon", "austin"),
          "since": dt.date(2026, 3, 15)},
         topic.in_scope(_by_id(["acme-all", "initech-all"]), since=dt.date(2026, 3, 15),
                        establishments=["lyon", "austin"])),
        ({"tenant": "acme", "config_ids": ("acme-all", "acme-paris"),
          "since": dt.date(2026, 12, 1)},
         topic.in_scope(_by_id(["acme-all", "acme-paris"]), since=dt.date(2026, 12, 1))),
        ({"tenant": "initech", "establishments": ("nowhere",)}, set()),
    ]
    async with worker(_roomy(settings), calendar=calendar):
        await wait_until(lambda: _synced(pool, len(topic.latest)), timeout=120)
        calls = len(calendar.calls)
        for filters, oracle in combos:
            dry = await rs.resync(
                pool, settings, bootstrap, rs.ResyncRequest(dry_run=True, **filters)
            )
            real = await rs.resync(pool, settings, bootstrap, rs.ResyncRequest(**filters))
            assert dry.in_scope == real.in_scope == real.marked == len(oracle), filters
            assert await _marked(pool, real.job_id) == oracle, filters
            assert (real.read, real.invalid) == (topic.records, topic.invalid)
        await wait_until(lambda: _synced(pool, len(topic.latest)), timeout=120)
        assert len(calendar.calls) == calls


async def _synced(pool: asyncpg.Pool, absences: int) -> bool:
    count = await pool.fetchval("SELECT count(*) FROM absences")
    return bool(count == absences and await settled(pool))


async def test_force_rewrites_and_brings_back_deleted_events_once(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """--wait with the dispatcher in this process and no worker: the first run
    writes everything, a second one nothing, and --force rewrites every
    selected event, re-creating (once) those deleted behind the product's back,
    and touches nothing outside the filters."""
    await apply(pool, *configs())
    topic = await publish(publisher, 400, seed=9)
    bootstrap = settings.kafka_bootstrap_servers
    assert bootstrap
    calendar = MemoryCalendar()
    factory = _memory(calendar)
    acme = _by_id(["acme-all", "acme-paris"])
    expected = topic.in_scope(acme)

    first = await rs.resync(
        pool, settings, bootstrap, rs.ResyncRequest(tenant="acme", wait=True),
        provider_factory=factory,
    )
    assert first.marked == first.in_scope == len(expected) > 50
    assert (first.written, first.unchanged, first.failed) == (len(expected), 0, 0)
    assert _events(calendar) == Counter(dict.fromkeys(expected, 1))

    calls = len(calendar.calls)
    second = await rs.resync(
        pool, settings, bootstrap, rs.ResyncRequest(tenant="acme", wait=True),
        provider_factory=factory,
    )
    assert (second.written, second.unchanged, second.failed) == (0, len(expected), 0)
    assert len(calendar.calls) == calls

    # an employee deletes events by hand: some inside the filter, some outside
    since = dt.date(2026, 7, 1)
    inside = topic.in_scope(acme, since=since)
    outside = expected - inside
    assert inside and outside
    gone_inside = sorted(inside)[:7]
    gone_outside = sorted(outside)[:5]
    for box in calendar.events.values():
        for event_id, stored in list(box.items()):
            key = (stored.event.mark.config_id, stored.event.mark.absence_id)
            if key in gone_inside or key in gone_outside:
                del box[event_id]
    calls = len(calendar.calls)
    forced = await rs.resync(
        pool, settings, bootstrap,
        rs.ResyncRequest(tenant="acme", since=since, force=True, wait=True),
        provider_factory=factory,
    )
    assert forced.marked == len(inside)
    assert (forced.written, forced.unchanged, forced.failed) == (len(inside), 0, 0)
    ops = Counter(op for op, _ in calendar.calls[calls:])
    assert ops == {"update": len(inside), "create": len(gone_inside)}
    held = _events(calendar)
    assert all(held[k] == 1 for k in inside)  # back, exactly once; nothing doubled
    assert all(held[k] == 0 for k in gone_outside)  # outside the filter: left alone
    assert sum(held.values()) == len(expected) - len(gone_outside)


async def test_stale_events_in_the_topic_change_nothing(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, *configs()[:2])
    # version 2 cancels; the stale version 1 that follows would bring it back
    await publisher.send(event("abs-1", 2, status="cancelled"))
    await publisher.send(event("abs-1", 1, status="approved"))
    await publisher.send(event("abs-2", 3, status="approved", end=("2026-12-04", "pm")))
    await publisher.send(event("abs-2", 2, status="approved", end=("2026-12-09", "pm")))
    await publisher.flush()
    bootstrap = settings.kafka_bootstrap_servers
    assert bootstrap
    request = rs.ResyncRequest(tenant="acme", since=dt.date(2026, 12, 5))

    # database empty: the dry run weighs the versions it read against each other
    dry = await rs.resync(pool, settings, bootstrap, rs.ResyncRequest(
        tenant="acme", since=dt.date(2026, 12, 5), dry_run=True))
    assert (dry.in_scope, dry.applied, dry.stale) == (0, 2, 2)
    assert await pool.fetchval("SELECT count(*) FROM absences") == 0

    real = await rs.resync(pool, settings, bootstrap, request)
    assert (real.in_scope, real.marked, real.applied, real.stale) == (0, 0, 2, 2)
    rows = {r["id"]: r for r in await pool.fetch("SELECT * FROM absences")}
    assert rows["abs-1"]["version"] == 2 and rows["abs-1"]["deleted"] is False
    assert rows["abs-2"]["version"] == 3 and rows["abs-2"]["end_date"] == dt.date(2026, 12, 4)
    before = await fingerprint(pool)

    again = await rs.resync(pool, settings, bootstrap, request)
    assert (again.applied, again.stale, again.marked) == (0, 4, 0)
    after = await fingerprint(pool)
    assert after[0] == before[0] and after[1] == before[1]  # absences, items


async def test_from_time_reads_from_that_time(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """Records older than --from-time are not read, and only the absences read
    are in scope (dry run or not), even when older ones are recorded; the
    filters then decide among those."""
    await apply(pool, *configs()[:2])
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    now_ms = int(time.time() * 1000)
    try:
        for i in range(30):  # an hour ago
            doc = event(f"old-{i}", 1, establishment_id="lyon")
            await producer.send(settings.topic, value=_json(doc), key=doc["data"]["id"].encode(),
                                timestamp_ms=now_ms - 3_600_000 + i)
        await producer.flush()
        for i in range(20):  # now
            doc = event(f"new-{i}", 1, establishment_id="lyon")
            await producer.send(settings.topic, value=_json(doc), key=doc["data"]["id"].encode(),
                                timestamp_ms=now_ms + i)
        await producer.flush()
    finally:
        await producer.stop()
    cut = dt.datetime.fromtimestamp((now_ms - 1_800_000) / 1000, dt.UTC)

    code, out, err = await run_cli(
        settings, "resync", "--tenant", "acme", "--dry-run", "--json",
        "--from-time", cut.isoformat().replace("+00:00", "Z"),
    )
    assert code == 0, err
    assert last_json(out)["read"] == 20
    assert last_json(out)["in_scope"] == 20  # acme-all only: lyon is not in acme-paris

    bootstrap = settings.kafka_bootstrap_servers
    assert bootstrap
    real = await rs.resync(pool, settings, bootstrap, rs.ResyncRequest(tenant="acme",
                                                                        from_time=cut))
    assert (real.read, real.applied, real.marked) == (20, 20, 20)
    ids = {r["id"] for r in await pool.fetch("SELECT id FROM absences")}
    assert ids == {f"new-{i}" for i in range(20)}

    full = await rs.resync(pool, settings, bootstrap, rs.ResyncRequest(tenant="acme"))
    assert (full.read, full.in_scope, full.marked) == (50, 50, 50)  # the old ones recorded too

    code, out, err = await run_cli(
        settings, "resync", "--tenant", "acme", "--dry-run", "--json",
        "--from-time", cut.isoformat().replace("+00:00", "Z"),
    )
    assert code == 0, err
    assert (last_json(out)["read"], last_json(out)["in_scope"]) == (20, 20)
    again = await rs.resync(pool, settings, bootstrap, rs.ResyncRequest(tenant="acme",
                                                                         from_time=cut))
    assert (again.read, again.in_scope, again.marked) == (20, 20, 20)
    marked = {r["absence_id"] for r in await pool.fetch(
        "SELECT absence_id FROM sync_items WHERE resync_job = (SELECT resync_job FROM"
        " sync_items WHERE config_id = 'acme-all' AND absence_id = 'new-0')")}
    assert marked == {f"new-{i}" for i in range(20)}

    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    for dry_run in (True, False):
        future = await rs.resync(pool, settings, bootstrap, rs.ResyncRequest(
            tenant="acme", from_time=later, dry_run=dry_run))
        assert (future.read, future.in_scope, future.marked) == (0, 0, 0)  # nothing read


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


async def test_cli_refuses_bad_requests(settings: Settings, pool: asyncpg.Pool) -> None:
    await apply(pool, *configs())
    cases = [
        ((), "--tenant or --config is required"),
        (("--tenant", "acme", "--since", "2026-13-01"), "--since"),
        (("--tenant", "acme", "--from-time", "2026-01-01T00:00:00"), "UTC offset"),
        (("--config", "nope"), "no configuration with id 'nope'"),
        (("--tenant", "globex", "--config", "acme-all"), "no configuration with id 'acme-all'"),
        (("--tenant", "hooli"), "tenant 'hooli' has no sync configuration"),
    ]
    done = await asyncio.gather(*(run_cli(settings, "resync", *args) for args, _ in cases))
    for (args, message), (code, _, err) in zip(cases, done, strict=True):
        assert code == 2, (args, err)
        assert err.startswith("absence-sync: error: ") and message in err, (args, err)
        assert "Traceback" not in err
    assert await pool.fetchval("SELECT count(*) FROM resync_jobs") == 0


@pytest.mark.parametrize("dry_run", [True, False])
async def test_missing_topic_is_a_clear_error(
    settings: Settings, pool: asyncpg.Pool, dry_run: bool
) -> None:
    await apply(pool, *configs()[:1])
    bootstrap = settings.kafka_bootstrap_servers
    assert bootstrap
    with pytest.raises(rs.ResyncError, match="does not exist"):
        await rs.resync(pool, settings, bootstrap,
                        rs.ResyncRequest(tenant="acme", dry_run=dry_run))
    jobs = await pool.fetch("SELECT state, error FROM resync_jobs")
    assert [(j["state"], "does not exist" in j["error"]) for j in jobs] == (
        [] if dry_run else [("failed", True)]
    )
    assert await pool.fetchval("SELECT count(*) FROM resync_locks") == 0


async def test_progress_is_reported_in_order(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, *configs())
    topic = await publish(publisher, 300, seed=3)
    seen: list[rs.Progress] = []
    bootstrap = settings.kafka_bootstrap_servers
    assert bootstrap
    summary = await rs.resync(
        pool, settings, bootstrap, rs.ResyncRequest(tenant="globex", wait=True),
        on_progress=seen.append, provider_factory=_memory(MemoryCalendar()),
    )
    phases = [p.phase for p in seen]
    order = ["reading", "selecting", "writing", "done"]
    assert [p for p in order if p in phases] == order
    assert phases == sorted(phases, key=order.index)
    reads = [p.read for p in seen if p.phase == "reading"]
    assert reads == sorted(reads) and reads[-1] == topic.records
    assert all(p.read <= p.total for p in seen)
    done = [p.written + p.unchanged + p.failed for p in seen if p.phase == "writing"]
    assert done == sorted(done) and done[-1] == summary.marked
    assert seen[-1].marked == summary.marked == summary.written


async def test_temporary_group_commits_then_disappears(
    settings: Settings, publisher: Publisher
) -> None:
    """The reader commits what it recorded in its own group (progress for the
    Kafka tools) and deletes the group when it closes."""
    from consumer.replay import TopicReader

    for i in range(40):
        await publisher.send(event(f"abs-{i}", 1))
    await publisher.flush()
    bootstrap = settings.kafka_bootstrap_servers
    assert bootstrap
    group = f"{settings.group_id}.resync.test"
    read = 0
    async with TopicReader(settings, bootstrap, group_id=group) as reader:
        async for batch in reader.batches():
            read += len(batch.records)
            await reader.commit(batch.offsets)
        assert group in await groups(settings)
        offsets = await committed(settings, group)
        assert sum(o or 0 for o in offsets.values()) == 40
    assert read == 40
    assert group not in await groups(settings)
    assert set((await committed(settings, group)).values()) == {None}
