"""In-process worker harness: the real intake, store and dispatcher, with a
provider factory the test chooses (the in-memory calendar by default)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg

from consumer import store
from consumer.config import SyncConfig
from consumer.dispatch import ProviderFactory
from consumer.metrics import Metrics
from consumer.providers.memory import MemoryCalendar, MemoryProvider
from consumer.secrets import SecretBox
from consumer.settings import Settings
from consumer.worker import Endpoints, run_worker


@dataclass
class Running:
    metrics: Metrics
    stop: asyncio.Event
    task: asyncio.Task[None]
    ports: list[int] = field(default_factory=list)  # the HTTP port, once started

    @property
    def url(self) -> str:
        assert self.ports, "the worker has not started yet"
        return f"http://127.0.0.1:{self.ports[0]}"


@contextlib.asynccontextmanager
async def worker(
    settings: Settings,
    *,
    calendar: MemoryCalendar | None = None,
    factory: ProviderFactory | None = None,
) -> AsyncIterator[Running]:
    assert settings.kafka_bootstrap_servers and settings.database_url
    if factory is None:
        cal = calendar if calendar is not None else MemoryCalendar()

        def factory(_: store.StoredConfig) -> MemoryProvider:
            return MemoryProvider(cal)

    stop = asyncio.Event()
    metrics = Metrics()
    ports: list[int] = []
    task = asyncio.create_task(
        run_worker(
            settings,
            Endpoints(settings.kafka_bootstrap_servers, settings.database_url),
            stop=stop,
            metrics=metrics,
            provider_factory=factory,
            on_started=ports.append,
        )
    )
    running = Running(metrics, stop, task, ports)
    try:
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def sync_config(config_id: str = "acme-cal", tenant: str = "acme", **fields: object) -> SyncConfig:
    fields.setdefault("provider_settings", {"url": "https://dav.example.com/{email}/calendar/"})
    return SyncConfig(id=config_id, tenant=tenant, provider="caldav", **fields)  # type: ignore[arg-type]


async def apply(pool: asyncpg.Pool, *configs: SyncConfig) -> None:
    await store.apply_configs(pool, configs, SecretBox(None))


async def backlog(pool: asyncpg.Pool) -> int:
    return (await store.backlog(pool)).pending


async def settled(pool: asyncpg.Pool, items: int = 1) -> bool:
    """At least `items` items exist, none pending and nothing leased."""
    row = await pool.fetchrow(
        "SELECT count(*) AS n, count(*) FILTER (WHERE change_seq > done_seq"
        " OR lease_until IS NOT NULL) AS busy FROM sync_items"
    )
    return bool(row["n"] >= items and row["busy"] == 0)
