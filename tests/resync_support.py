"""Shared pieces of the resync tests: a generated topic with its own oracle of
what is in scope (rule 5.1 and the resync filters, written independently of
the product), the console script as a subprocess, and Kafka group probes."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from consumer.config import SyncConfig
from consumer.settings import Settings
from tests.conftest import Publisher, event, settings_env
from tests.harness import sync_config

SCRIPT = Path(sys.executable).parent / "absence-sync"

ESTABLISHMENTS = {
    "acme": ["paris", "lyon", "nantes"],
    "globex": ["berlin", "munich"],
    "initech": ["austin"],
}


def configs() -> list[SyncConfig]:
    return [
        sync_config("acme-all", "acme"),
        sync_config("acme-paris", "acme", establishments=["paris"], sync_pending=False),
        sync_config("globex-all", "globex"),
        sync_config("initech-all", "initech", establishments=["austin", "remote"]),
    ]


@dataclass
class Topic:
    """What was published, and the latest valid document of every absence."""

    records: int = 0
    invalid: int = 0
    latest: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def in_scope(
        self,
        selected: Sequence[SyncConfig],
        *,
        since: dt.date | None = None,
        establishments: Sequence[str] = (),
    ) -> set[tuple[str, str]]:
        """(configuration id, absence id) pairs a resync must mark."""
        out: set[tuple[str, str]] = set()
        for (tenant, absence_id), doc in self.latest.items():
            if doc["type"] != "absence.upserted":
                continue
            data = doc["data"]
            place = data["employee"]["establishment_id"]
            if since is not None and dt.date.fromisoformat(data["end"]["date"]) < since:
                continue
            if establishments and place not in establishments:
                continue
            for config in selected:
                if config.tenant != tenant:
                    continue
                if data["status"] not in ("approved", "pending"):
                    continue
                if data["status"] == "pending" and not config.sync_pending:
                    continue
                if config.establishments is not None and place not in config.establishments:
                    continue
                out.add((config.id, absence_id))
        return out


def _doc(rng: random.Random, tenant: str, absence_id: str, version: int) -> dict[str, Any]:
    if rng.random() < 0.04:
        return event(absence_id, version, tenant=tenant, deleted=True)
    day = dt.date(2026, 1, 1) + dt.timedelta(days=rng.randrange(360))
    end = day + dt.timedelta(days=rng.randrange(4))
    status = rng.choice(["approved"] * 6 + ["pending"] * 2 + ["cancelled", "denied"])
    return event(
        absence_id, version, tenant=tenant, status=status,
        email=f"user{rng.randrange(40)}@{tenant}.example",
        establishment_id=rng.choice(ESTABLISHMENTS[tenant]),
        start=(day.isoformat(), "am"), end=(end.isoformat(), rng.choice(["am", "pm"])),
    )


async def publish(publisher: Publisher, absences: int, *, seed: int = 5) -> Topic:
    """`absences` absences over three tenants: most with one version, some
    updated, some followed by a stale repeat of an older version, and a few
    invalid records."""
    rng = random.Random(seed)
    topic = Topic()
    tenants = ["acme"] * 5 + ["globex"] * 3 + ["initech"] * 2
    older: list[dict[str, Any]] = []
    for i in range(absences):
        tenant = tenants[i % len(tenants)]
        absence_id = f"{tenant}-abs-{i}"
        versions = 2 if rng.random() < 0.15 else 1
        for version in range(1, versions + 1):
            doc = _doc(rng, tenant, absence_id, version)
            await publisher.send(doc)
            topic.records += 1
            topic.latest[(tenant, absence_id)] = doc
            if version == 1 and versions == 2 and rng.random() < 0.3:
                older.append(doc)
        if i % 97 == 0:
            await publisher.send(b"{not json", key=f"junk-{i}")
            topic.records += 1
            topic.invalid += 1
    for doc in older:  # stale: an older version after the newer one
        await publisher.send(doc)
        topic.records += 1
    await publisher.flush()
    return topic


async def run_cli(settings: Settings, *args: str, **env: str) -> tuple[int, str, str]:
    """The installed console script with these settings, without blocking the loop."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ABSENCE_SYNC_")}
    base.update(settings_env(settings))
    base.update(env)
    proc = await asyncio.create_subprocess_exec(
        str(SCRIPT), *args, env=base,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def last_json(stdout: str) -> dict[str, Any]:
    doc = json.loads(stdout.strip().splitlines()[-1])
    assert isinstance(doc, dict)
    assert set(doc) == {"read", "in_scope", "marked", "written", "unchanged", "failed", "dry_run"}
    return doc


async def groups(settings: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        return {g[0] for g in await admin.list_consumer_groups()}
    finally:
        await admin.close()


async def committed(settings: Settings, group: str) -> dict[int, int | None]:
    """The group's committed offset per partition of the topic."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(settings.topic) or set()
        return {p: await consumer.committed(TopicPartition(settings.topic, p)) for p in parts}
    finally:
        await consumer.stop()


async def fingerprint(pool: asyncpg.Pool) -> tuple[Any, ...]:
    """Everything a resync could change in the database."""
    queries = (
        "SELECT * FROM absences ORDER BY tenant, id",
        "SELECT * FROM sync_items ORDER BY config_id, absence_id",
        "SELECT * FROM resync_jobs ORDER BY id",
        "SELECT * FROM resync_locks ORDER BY config_id",
        "SELECT count(*) FROM sync_log",
    )
    found = []
    for query in queries:
        found.append([tuple(dict(r).items()) for r in await pool.fetch(query)])
    return tuple(found)
