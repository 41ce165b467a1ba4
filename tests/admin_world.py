"""A small world for the administration tests: two tenants, their configurations,
absences, and write outcomes produced by the real dispatcher.

Microsoft 365 configurations use the real provider (without a directory id
it fails with `consent_missing` before any network call); the others write
to the in-memory calendar, which answers `mailbox_not_found` for the
mailboxes a test names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from consumer import store, tokens
from consumer.dispatch import Dispatcher
from consumer.events import parse_event
from consumer.metrics import Metrics
from consumer.providers import build_provider
from consumer.providers.base import MAILBOX_NOT_FOUND, Provider, ProviderContext, ProviderError
from consumer.providers.memory import MemoryCalendar, MemoryProvider
from consumer.render import DesiredEvent
from consumer.settings import Settings
from consumer.store import admin as admin_store
from tests.conftest import Publisher, event, wait_until


class PickyMemory(MemoryProvider):
    """The in-memory calendar, where some mailboxes do not exist."""

    def __init__(self, calendar: MemoryCalendar, unknown: set[str]) -> None:
        super().__init__(calendar)
        self.unknown = unknown

    async def create(self, event: DesiredEvent, *, transaction_id: str) -> str:
        if event.mailbox in self.unknown:
            raise ProviderError(
                MAILBOX_NOT_FOUND, f"{event.mailbox}: no such mailbox", retriable=False,
                hint=f"No mailbox at {event.mailbox}: check the employee's e-mail address.",
            )
        return await super().create(event, transaction_id=transaction_id)


@dataclass
class Calendars:
    settings: Settings
    memory: MemoryCalendar = field(default_factory=MemoryCalendar)
    unknown: set[str] = field(default_factory=set)

    def provider(self, stored: store.StoredConfig) -> Provider:
        if stored.config.provider == "microsoft365":
            return build_provider(stored.config, ProviderContext(self.settings))
        return PickyMemory(self.memory, self.unknown)


def admin_settings(dsn: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": dsn,
        "kafka_bootstrap_servers": "127.0.0.1:1",
        "dispatch_poll_seconds": 0.05,
        "lease_seconds": 30,
        "request_timeout_seconds": 10,
        "ms_client_id": "11111111-2222-3333-4444-555555555555",
        "public_url": "https://sync.vendor.example",
        **extra,
    }
    return Settings(**values)


async def record(
    pool: asyncpg.Pool, docs: Iterable[dict[str, Any]], publisher: Publisher | None = None
) -> None:
    """Absence events recorded exactly as intake records them, and published to
    the topic when a publisher is given (a resync re-reads the topic)."""
    docs = list(docs)
    incoming = []
    for doc in docs:
        parsed = parse_event(json.dumps(doc).encode())
        incoming.append(store.Incoming(parsed.absence, parsed.data, None))
    async with pool.acquire() as conn, conn.transaction():
        await store.record_absences(conn, incoming)
    if publisher is not None:
        for doc in docs:
            await publisher.send(doc)
        await publisher.flush()


async def idle(pool: asyncpg.Pool) -> bool:
    busy = await pool.fetchval(
        "SELECT count(*) FROM sync_items WHERE change_seq > done_seq OR lease_until IS NOT NULL"
    )
    return bool(busy == 0)


@contextlib.asynccontextmanager
async def dispatching(
    pool: asyncpg.Pool, settings: Settings, calendars: Calendars
) -> AsyncIterator[Dispatcher]:
    """The real dispatcher, running until the block ends."""
    dispatcher = Dispatcher(settings, pool, Metrics(), provider_factory=calendars.provider)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        yield dispatcher
    finally:
        stop.set()
        await task
        await dispatcher.drain(5)


async def settle(pool: asyncpg.Pool, settings: Settings, calendars: Calendars) -> None:
    async with dispatching(pool, settings, calendars):
        await wait_until(lambda: idle(pool), timeout=30)


async def new_token(pool: asyncpg.Pool, tenant: str, role: str, name: str | None = None) -> str:
    token_id, text = tokens.new_token()
    await admin_store.create_token(
        pool, token_id=token_id, tenant=tenant, role=role, name=name,
        digest=tokens.token_hash(text),
    )
    return text


def absence(absence_id: str, email: str, *, tenant: str = "acme", version: int = 1,
            end: str = "2026-12-03", **extra: Any) -> dict[str, Any]:
    return event(absence_id, version, tenant=tenant, email=email, end=(end, "pm"), **extra)
