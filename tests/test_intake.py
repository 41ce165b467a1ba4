"""Intake against the real broker and database (docs/events.md, docs/guarantees.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from consumer.events import parse_event
from consumer.metrics import Metrics
from consumer.settings import Settings
from tests.conftest import Publisher, event, wait_until
from tests.harness import worker as harness_worker


@contextlib.asynccontextmanager
async def worker(settings: Settings) -> AsyncIterator[Metrics]:
    async with harness_worker(settings) as running:
        yield running.metrics


async def versions(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT id, version FROM absences")
    return {r["id"]: r["version"] for r in rows}


async def read_dlq(settings: Settings, expected: int) -> list[tuple[bytes, dict[str, bytes]]]:
    consumer = AIOKafkaConsumer(
        settings.dlq_topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[tuple[bytes, dict[str, bytes]]] = []
    try:
        async with asyncio.timeout(30):
            while len(out) < expected:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    out.extend((r.value, dict(r.headers)) for r in records)
        extra = await consumer.getmany(timeout_ms=500)
        for records in extra.values():
            out.extend((r.value, dict(r.headers)) for r in records)
    finally:
        await consumer.stop()
    return out


async def test_invalid_events_dead_lettered_and_consumer_goes_on(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await publisher.send(event("abs-1", 1))
    await publisher.send(b"{not json", key="abs-x")
    bad = event("abs-2", 1, start=("2026-12-05", "am"), end=("2026-12-01", "pm"))
    await publisher.send(bad)
    await publisher.send(event("abs-3", 1))
    await publisher.flush()
    async with worker(settings) as metrics:
        await wait_until(lambda: _has(pool, {"abs-1": 1, "abs-3": 1}))
        dead = await read_dlq(settings, 2)
    assert len(dead) == 2
    reasons = sorted(h["absence-sync-reason"].decode() for _, h in dead)
    assert reasons == ["end_before_start", "malformed_json"]
    for _value, headers in dead:
        assert headers["absence-sync-original-topic"].decode() == settings.topic
        assert int(headers["absence-sync-original-offset"]) >= 0
        assert int(headers["absence-sync-original-partition"]) >= 0
    assert {v for v, _ in dead} == {b"{not json", json.dumps(bad).encode()}
    assert "abs-2" not in await versions(pool)
    assert metrics.events.labels("invalid")._value.get() == 2


async def _has(pool: asyncpg.Pool, expected: dict[str, int]) -> bool:
    got = await versions(pool)
    return all(got.get(k) == v for k, v in expected.items())


async def test_stale_versions_change_nothing(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await publisher.send(event("abs-1", 5, status="approved"))
    await publisher.send(event("abs-1", 3, status="cancelled"))
    await publisher.send(event("abs-1", 5, status="denied"))
    await publisher.flush()
    async with worker(settings) as metrics:
        await wait_until(lambda: _consumed(metrics, 3))
    row = await pool.fetchrow("SELECT version, data FROM absences WHERE id = 'abs-1'")
    assert row["version"] == 5
    assert json.loads(row["data"])["status"] == "approved"
    assert metrics.events.labels("stale")._value.get() == 2


async def _consumed(metrics: Metrics, n: int) -> bool:
    total = sum(metrics.events.labels(o)._value.get() for o in ("applied", "stale", "invalid"))
    return bool(total >= n)


async def test_same_event_twice_changes_nothing(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await pool.execute(
        "INSERT INTO sync_configs (id, tenant, provider, settings, render_hash)"
        " VALUES ('c1', 'acme', 'caldav', '{}'::jsonb, 'x')"
    )
    doc = event("abs-1", 2)
    await publisher.send(doc)
    await publisher.send(doc)
    await publisher.flush()
    async with worker(settings.model_copy(update={"dispatch_poll_seconds": 60})) as metrics:
        await wait_until(lambda: _consumed(metrics, 2))
    assert await versions(pool) == {"abs-1": 2}
    seq = await pool.fetchval("SELECT change_seq FROM sync_items WHERE absence_id = 'abs-1'")
    assert seq == 1  # marked pending once, not twice
    assert metrics.events.labels("applied")._value.get() == 1
    assert metrics.events.labels("stale")._value.get() == 1


@pytest.mark.parametrize("count", [10_000])
async def test_many_mixed_events(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool, count: int
) -> None:
    expected: dict[str, int] = {}
    invalid = 0
    for i in range(count):
        absence_id = f"abs-{i % 1500}"
        version = i // 1500 + 1
        if i % 20 == 7:
            invalid += 1
            await publisher.send(
                event(absence_id, version, start=("2026-12-09", "pm"), end=("2026-12-09", "am"))
            )
            continue
        expected[absence_id] = max(expected.get(absence_id, 0), version)
        await publisher.send(event(absence_id, version))
    await publisher.flush()
    async with worker(settings.model_copy(update={"batch_size": 1000})) as metrics:
        await wait_until(lambda: _consumed(metrics, count), timeout=120)
        dead = await read_dlq(settings, invalid)
    assert await versions(pool) == expected
    assert len(dead) == invalid
    assert metrics.events.labels("invalid")._value.get() == invalid


async def test_dead_letter_too_large_for_the_producer_is_sent_truncated(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """A record the broker accepted but our producer cannot re-send as it is
    (over its 1 MiB request limit) is dead-lettered truncated, with the original
    coordinates; the partition goes on behind it."""
    big = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, max_request_size=4_000_000
    )
    await big.start()
    try:
        huge = json.dumps(event("abs-huge", 1)).encode() + b" " * 1_300_000
        meta = await big.send_and_wait(settings.topic, value=huge, key=b"abs-huge", partition=0)
        await big.send_and_wait(
            settings.topic, value=json.dumps(event("abs-after", 1)).encode(), key=b"abs-after",
            partition=0,
        )
    finally:
        await big.stop()
    async with worker(settings) as metrics:
        await wait_until(lambda: _has(pool, {"abs-after": 1}))
        (dead,) = await read_dlq(settings, 1)
    value, headers = dead
    assert headers["absence-sync-reason"] == b"too_large"
    assert int(headers["absence-sync-truncated"]) == len(huge)
    assert headers["absence-sync-original-topic"].decode() == settings.topic
    assert headers["absence-sync-original-partition"] == b"0"
    assert int(headers["absence-sync-original-offset"]) == meta.offset
    assert 0 < len(value) < 100_000 and huge.startswith(value)
    assert "abs-huge" not in await versions(pool)
    assert metrics.dead_letters.labels("too_large")._value.get() == 1


async def test_a_record_postgresql_refuses_is_dead_lettered_alone(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """PostgreSQL refuses one record of a batch (here a trigger raises a data
    error for it): the batch is recorded record by record, that one record is
    dead-lettered, the others before and after it are recorded."""
    await pool.execute("""
        CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.id = 'abs-refused' THEN
                RAISE EXCEPTION 'refused: %', NEW.data USING ERRCODE = 'invalid_parameter_value';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_one BEFORE INSERT OR UPDATE ON absences
            FOR EACH ROW EXECUTE FUNCTION refuse_one();
    """)
    for absence_id in ("abs-1", "abs-2", "abs-refused", "abs-3", "abs-4"):
        doc = event(absence_id, 1)
        doc["data"]["employee"]["display_name"] = "Private Person"
        await publisher.producer.send(
            settings.topic, value=json.dumps(doc).encode(), key=absence_id.encode(), partition=0
        )
    await publisher.flush()
    async with worker(settings) as metrics:
        await wait_until(lambda: _has(pool, {"abs-1": 1, "abs-2": 1, "abs-3": 1, "abs-4": 1}))
        (dead,) = await read_dlq(settings, 1)
    _value, headers = dead
    assert headers["absence-sync-reason"] == b"refused_by_database"
    assert b"22023" in headers["absence-sync-error"]
    assert b"Private Person" not in headers["absence-sync-error"]  # never the server's message
    assert headers["absence-sync-original-offset"] == b"2"
    assert "abs-refused" not in await versions(pool)
    assert metrics.events.labels("applied")._value.get() == 4
    assert metrics.internal_errors.labels("intake")._value.get() == 0


async def test_a_bug_on_one_record_dead_letters_it_as_internal(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The catch-all: an unexpected exception of our own code on one record (a bug
    injected into the validation step) dead-letters that record with reason
    `internal` and the exception's class, and nothing else stops."""
    from consumer import intake

    def buggy(raw: bytes | None) -> Any:
        if raw is not None and b"abs-bug" in raw:
            raise KeyError("Jane Doe's sick leave")
        return parse_event(raw)

    monkeypatch.setattr(intake, "parse_event", buggy)
    for absence_id in ("abs-1", "abs-bug", "abs-2"):
        await publisher.send(event(absence_id, 1))
    await publisher.flush()
    async with worker(settings) as metrics:
        await wait_until(lambda: _has(pool, {"abs-1": 1, "abs-2": 1}))
        (dead,) = await read_dlq(settings, 1)
    _value, headers = dead
    assert headers["absence-sync-reason"] == b"internal"
    assert headers["absence-sync-exception"] == b"KeyError"
    assert b"Jane" not in headers["absence-sync-error"]
    assert metrics.internal_errors.labels("intake")._value.get() == 1


def _lag(metrics: Metrics) -> dict[str, dict[str, float]]:
    """partition -> {"records": ..., "seconds": ...} as /metrics shows them."""
    found: dict[str, dict[str, float]] = {}
    for gauge, name in ((metrics.lag_records, "records"), (metrics.lag_seconds, "seconds")):
        for family in gauge.collect():
            for sample in family.samples:
                found.setdefault(sample.labels["partition"], {})[name] = sample.value
    return found


async def test_lag_goes_back_to_zero_once_caught_up(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """Records an hour old give an hour of lag while they are read; once the worker
    is at the end of the partition its gauges say 0 records and 0 seconds, instead
    of the last batch's values forever."""
    hour_ago_ms = int((time.time() - 3600) * 1000)
    for n in range(3):
        doc = event(f"abs-lag-{n}", 1)
        await publisher.producer.send(settings.topic, value=json.dumps(doc).encode(),
                                      key=doc["data"]["id"].encode(), timestamp_ms=hour_ago_ms)
    await publisher.flush()
    async with worker(settings) as metrics:
        await wait_until(lambda: _recorded(pool, 3))

        async def caught_up() -> bool:
            lag = _lag(metrics)
            return bool(lag) and all(
                v.get("records") == 0 and v.get("seconds") == 0 for v in lag.values()
            )

        await wait_until(caught_up, timeout=20)


async def _recorded(pool: asyncpg.Pool, count: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM absences") == count)
