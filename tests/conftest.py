"""Session-scoped real servers: a tansu Kafka broker and PostgreSQL (pgserver).

Each test gets its own database (cloned from a migrated template) and its
own topic names, so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from consumer import store
from consumer.embedded import EmbeddedKafka, EmbeddedPostgres
from consumer.settings import Settings

_dbs = itertools.count()


@pytest.fixture(scope="session")
def kafka() -> Iterator[EmbeddedKafka]:
    with EmbeddedKafka.start() as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres.start() as pg:
        yield pg


def dsn_for(base: str, database: str) -> str:
    head, _, query = base.partition("?")
    root = head.rsplit("/", 1)[0]
    return f"{root}/{database}?{query}" if query else f"{root}/{database}"


@pytest.fixture(scope="session")
async def template_db(postgres: EmbeddedPostgres) -> str:
    conn = await asyncpg.connect(postgres.dsn)
    try:
        await conn.execute("DROP DATABASE IF EXISTS absence_template")
        await conn.execute("CREATE DATABASE absence_template")
    finally:
        await conn.close()
    pool = await store.connect(dsn_for(postgres.dsn, "absence_template"))
    try:
        await store.migrate(pool)
    finally:
        await pool.close()
    return "absence_template"


@pytest.fixture
async def dsn(postgres: EmbeddedPostgres, template_db: str) -> str:
    name = f"t_{os.getpid()}_{next(_dbs)}"
    conn = await asyncpg.connect(postgres.dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE {template_db}')
    finally:
        await conn.close()
    return dsn_for(postgres.dsn, name)


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await store.connect(dsn, max_size=20)
    yield p
    await p.close()


@pytest.fixture
def settings(kafka: EmbeddedKafka, dsn: str) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    return Settings(
        kafka_bootstrap_servers=kafka.bootstrap_servers,
        database_url=dsn,
        topic=f"absences-{suffix}",
        dlq_topic=f"absences-{suffix}.dlq",
        group_id=f"group-{suffix}",
        http_port=0,
        http_host="127.0.0.1",
        dispatch_poll_seconds=0.05,
        shutdown_timeout_seconds=5,
        lease_seconds=30,
        request_timeout_seconds=10,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as ABSENCE_SYNC_* variables, for a worker subprocess."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"ABSENCE_SYNC_{name.upper()}"] = str(value)
    return env


def event(
    absence_id: str,
    version: int,
    *,
    tenant: str = "acme",
    status: str = "approved",
    email: str = "jane.doe@acme.com",
    start: tuple[str, str] = ("2026-12-01", "am"),
    end: tuple[str, str] = ("2026-12-03", "pm"),
    deleted: bool = False,
    **employee: Any,
) -> dict[str, Any]:
    if deleted:
        return {
            "specversion": "1.0", "id": str(uuid.uuid4()), "source": "https://hr.example.com",
            "type": "absence.deleted", "tenant": tenant,
            "data": {"id": absence_id, "version": version},
        }
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "https://hr.example.com",
        "type": "absence.upserted",
        "time": "2026-11-23T10:00:00Z",
        "tenant": tenant,
        "datacontenttype": "application/json",
        "data": {
            "id": absence_id,
            "version": version,
            "status": status,
            "employee": {
                "id": "emp-" + email.split("@")[0],
                "email": email,
                "establishment_id": employee.pop("establishment_id", "paris"),
                "time_zone": employee.pop("time_zone", "Europe/Paris"),
                **employee,
            },
            "account": {
                "id": "paid-leave", "name": "Paid leave",
                "counted_as_absence": True, "public_reason": False,
            },
            "start": {"date": start[0], "half": start[1]},
            "end": {"date": end[0], "half": end[1]},
        },
    }


@dataclass
class Publisher:
    producer: AIOKafkaProducer
    topic: str

    async def send(self, doc: dict[str, Any] | bytes, key: str | None = None) -> None:
        value = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        if key is None and isinstance(doc, dict) and isinstance(doc.get("data"), dict):
            key = str(doc["data"].get("id", ""))
        await self.producer.send(self.topic, value=value, key=(key or "").encode())

    async def flush(self) -> None:
        await self.producer.flush()


@pytest.fixture
async def publisher(settings: Settings) -> AsyncIterator[Publisher]:
    from consumer.intake import ensure_topics

    assert settings.kafka_bootstrap_servers
    await ensure_topics(settings, settings.kafka_bootstrap_servers)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    yield Publisher(producer, settings.topic)
    await producer.stop()


async def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll an async predicate until it is truthy, or fail after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await predicate():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
