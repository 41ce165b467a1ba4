"""Outages are waited out, not fatal (docs/runbook.md, 'Outages of PostgreSQL and Kafka').

A worker runs against a PostgreSQL server of the test's own, which is
stopped for a few seconds (or frozen: connections open, no answer) while
events stream in, then started again on the same port. The worker must not
exit, must say on /readyz (503, fixed words) and in the metrics what it is
waiting for, must resume by itself, and every absence must be written to
the calendar exactly once. The broker (tansu, in-memory) is killed and
restarted on its port as well.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from consumer import store
from consumer.embedded import EmbeddedKafka
from consumer.intake import ensure_topics
from consumer.providers.memory import MemoryCalendar
from consumer.settings import Settings
from tests.conftest import event, wait_until
from tests.harness import Running, apply, sync_config, worker
from tests.pgctl import StoppablePostgres

# what /readyz may say: fixed words and names from the settings, never an exception's text
READY_PROBLEM = re.compile(
    r"(postgresql: (unreachable|query failed))"
    r"|(kafka: (brokers unreachable|joining the consumer group|no partition assigned yet"
    r"|topic [\w.-]+ does not exist))"
    r"|((intake|dispatch): ((postgresql|kafka) unavailable|internal error), retrying for \d+ s)"
)


@pytest.fixture
def own_postgres() -> Iterator[StoppablePostgres]:
    with StoppablePostgres.create() as server:
        yield server


@pytest.fixture
async def own_settings(settings: Settings, own_postgres: StoppablePostgres) -> Settings:
    pool = await store.connect(own_postgres.dsn)
    try:
        await store.migrate(pool)
        await apply(pool, sync_config())
    finally:
        await pool.close()
    return settings.model_copy(update={
        "database_url": own_postgres.dsn,
        "outage_retry_max_seconds": 1.0,
        "database_command_timeout_seconds": 2.0,
        "batch_size": 50,
    })


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    assert settings.kafka_bootstrap_servers
    await ensure_topics(settings, settings.kafka_bootstrap_servers)
    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await p.start()
    yield p
    await p.stop()


async def publish(producer: AIOKafkaProducer, topic: str, ids: range) -> None:
    for i in ids:
        doc = event(f"abs-{i}", 1, email=f"u{i % 20}@acme.com")
        await producer.send(topic, value=_encode(doc), key=f"abs-{i}".encode())
    await producer.flush()


def _encode(doc: dict[str, Any]) -> bytes:
    import json

    return json.dumps(doc).encode()


async def readiness(running: Running) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(running.url + "/readyz") as resp:
        return resp.status, await resp.json()


def dependency_up(running: Running, dependency: str) -> float:
    value: float = running.metrics.dependency_up.labels(dependency)._value.get()
    return value


async def synced(dsn: str, count: int) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        n = await conn.fetchval("SELECT count(*) FROM sync_items WHERE status = 'synced'")
        return bool(n == count)
    finally:
        await conn.close()


def assert_written_once(calendar: MemoryCalendar, count: int) -> None:
    per_absence = Counter(e.event.mark.absence_id for e in calendar.all())
    assert set(per_absence) == {f"abs-{i}" for i in range(count)}
    assert set(per_absence.values()) == {1}
    creates = [op for op, _ in calendar.calls if op == "create"]
    assert len(creates) == count, "an absence was written more than once"


async def assert_waiting(running: Running, *components: str) -> None:
    """/readyz is 503 and names PostgreSQL for each component, in fixed words."""
    async def reported() -> bool:
        status, body = await readiness(running)
        text = " ".join(body.get("problems", []))
        return status == 503 and all(f"{c}: postgresql unavailable" in text for c in components)

    await wait_until(reported, timeout=30)
    status, body = await readiness(running)
    assert status == 503 and body["status"] == "not ready"
    for problem in body["problems"]:
        assert READY_PROBLEM.fullmatch(problem), f"/readyz says {problem!r}"
    assert dependency_up(running, "postgresql") == 0


async def test_postgresql_restart_is_waited_out_and_nothing_is_written_twice(
    own_settings: Settings, own_postgres: StoppablePostgres, producer: AIOKafkaProducer
) -> None:
    calendar = MemoryCalendar()
    topic = own_settings.topic
    async with worker(own_settings, calendar=calendar) as running:
        await publish(producer, topic, range(0, 100))
        await wait_until(lambda: synced(own_postgres.dsn, 100), timeout=60)
        assert (await readiness(running))[0] == 200

        own_postgres.stop()
        await publish(producer, topic, range(100, 200))  # intake meets the outage too
        await assert_waiting(running, "intake", "dispatch")
        await asyncio.sleep(3)  # the outage lasts a few seconds
        assert not running.task.done(), "the worker exited during the outage"
        own_postgres.start()

        await publish(producer, topic, range(200, 300))
        await wait_until(lambda: synced(own_postgres.dsn, 300), timeout=90)

        async def ready() -> bool:
            return (await readiness(running))[0] == 200

        await wait_until(ready, timeout=30)
        assert dependency_up(running, "postgresql") == 1
        assert running.metrics.dependency_errors.labels("postgresql")._value.get() > 0
        assert not running.task.done()
    assert_written_once(calendar, 300)
    assert running.metrics.internal_errors.labels("intake")._value.get() == 0
    assert running.metrics.internal_errors.labels("dispatch")._value.get() == 0


async def test_frozen_postgresql_is_timed_out_and_waited_out(
    own_settings: Settings, own_postgres: StoppablePostgres, producer: AIOKafkaProducer
) -> None:
    """Connections stay open but nothing answers: without a command timeout intake
    and dispatch would hang in their statements instead of reporting the outage."""
    calendar = MemoryCalendar()
    topic = own_settings.topic
    async with worker(own_settings, calendar=calendar) as running:
        await publish(producer, topic, range(0, 50))
        await wait_until(lambda: synced(own_postgres.dsn, 50), timeout=60)

        own_postgres.freeze()
        try:
            await publish(producer, topic, range(50, 100))
            await assert_waiting(running, "intake", "dispatch")
            assert not running.task.done()
        finally:
            own_postgres.thaw()

        await wait_until(lambda: synced(own_postgres.dsn, 100), timeout=90)
        assert not running.task.done()
    assert_written_once(calendar, 100)


@pytest.fixture
def own_kafka() -> Iterator[EmbeddedKafka]:
    with EmbeddedKafka.start() as broker:
        yield broker


async def test_broker_restart_is_waited_out(
    settings: Settings, pool: asyncpg.Pool, own_kafka: EmbeddedKafka
) -> None:
    """tansu keeps everything in memory: a restart loses the topics, the group and
    its committed offsets (what was published before is gone from Kafka, and a
    consumer that fetched with its old positions before rejoining could skip
    records of the new log). What can be asserted: the worker keeps running and
    says on /readyz what is wrong, in fixed words; what was recorded before stays
    recorded and written once; once the topic exists again and the group has
    rejoined, events published anew are all consumed and written once."""
    bootstrap = own_kafka.bootstrap_servers
    own = settings.model_copy(update={
        "kafka_bootstrap_servers": bootstrap, "outage_retry_max_seconds": 1.0,
    })
    await apply(pool, sync_config())
    calendar = MemoryCalendar()

    async def send(ids: range) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            await publish(producer, own.topic, ids)
        finally:
            await producer.stop()

    async with worker(own, calendar=calendar) as running:
        await wait_until(lambda: _ready(running), timeout=60)
        await send(range(0, 50))
        await wait_until(lambda: _synced_in(pool, 50), timeout=60)

        own_kafka.stop()
        seen: set[str] = set()

        async def reported(*wanted: str) -> bool:
            status, body = await readiness(running)
            for problem in body.get("problems", []):
                assert READY_PROBLEM.fullmatch(problem), f"/readyz says {problem!r}"
                seen.add(problem)
            return status == 503 and all(w in seen for w in wanted)

        await wait_until(lambda: reported("kafka: brokers unreachable"), timeout=30)
        assert not running.task.done(), "the worker exited when the broker went away"
        assert dependency_up(running, "kafka") == 0

        restarted = EmbeddedKafka.start(own_kafka.port)
        own_kafka.proc = restarted.proc
        await wait_until(lambda: reported(f"kafka: topic {own.topic} does not exist"), timeout=30)
        await ensure_topics(own, bootstrap)  # the operator (or the HR system) recreates it
        # the new broker does not know the member: the group rebalances, then is ready
        await wait_until(lambda: reported("kafka: no partition assigned yet"), timeout=60)
        await wait_until(lambda: _ready(running), timeout=60)
        await send(range(50, 100))
        await wait_until(lambda: _synced_in(pool, 100), timeout=60)
        assert not running.task.done()
        assert dependency_up(running, "kafka") == 1
    assert_written_once(calendar, 100)


async def _ready(running: Running) -> bool:
    if not running.ports:
        return False
    return (await readiness(running))[0] == 200


async def _synced_in(pool: asyncpg.Pool, count: int) -> bool:
    n = await pool.fetchval("SELECT count(*) FROM sync_items WHERE status = 'synced'")
    return bool(n == count)
