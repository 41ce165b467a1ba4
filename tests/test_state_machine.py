"""Hypothesis state machine over the sync core (docs/guarantees.md).

Random sequences of new versions, redeliveries, reorderings, dispatcher
runs and crashes (a worker dying right after a calendar write, before its
mapping update) against the real store (PostgreSQL) and the in-memory
calendar must end, once the work is drained, with exactly the events the
rendering rules say: one per wanted absence, with the latest content, and
none for the others.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from consumer import store
from consumer.dispatch import Dispatcher
from consumer.embedded import EmbeddedPostgres
from consumer.events import parse_event
from consumer.metrics import Metrics
from consumer.providers.memory import MemoryCalendar, MemoryProvider
from consumer.render import DesiredEvent, Mark, render
from consumer.secrets import SecretBox
from consumer.settings import Settings
from tests.conftest import dsn_for, event
from tests.harness import sync_config

ABSENCES = [f"abs-{i}" for i in range(4)]
MAILBOXES = ["a@acme.com", "b@acme.com"]
CONFIG = sync_config(sync_pending=False)


_writes = itertools.count()


class Crash(BaseException):
    """The worker process dies (not an error any code may catch)."""


class CrashingProvider(MemoryProvider):
    """Writes, then dies before the dispatcher can record the outcome.

    Its creates are not idempotent (like EWS): only the ownership mark can
    prevent a second event after a crash."""

    def __init__(self, calendar: MemoryCalendar, crash: list[bool]) -> None:
        super().__init__(calendar)
        self.crash = crash

    async def create(self, event: DesiredEvent, *, transaction_id: str) -> str:
        unique = f"{transaction_id}#{next(_writes)}"
        result = await super().create(event, transaction_id=unique)
        if self.crash and self.crash.pop():
            raise Crash
        return result

    async def update(self, mailbox: str, event_id: str, event: DesiredEvent) -> str:
        result = await super().update(mailbox, event_id, event)
        if self.crash and self.crash.pop():
            raise Crash
        return result


_db: dict[str, str] = {}


@pytest.fixture(scope="module")
def machine_dsn(postgres: EmbeddedPostgres) -> str:
    async def create() -> None:
        conn = await asyncpg.connect(postgres.dsn)
        try:
            await conn.execute("DROP DATABASE IF EXISTS state_machine")
            await conn.execute("CREATE DATABASE state_machine")
        finally:
            await conn.close()

    runner = asyncio.Runner()
    runner.run(create())
    runner.close()
    _db["dsn"] = dsn_for(postgres.dsn, "state_machine")
    return _db["dsn"]


class SyncMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.pool: asyncpg.Pool = self.runner.run(self._setup())
        self.calendar = MemoryCalendar()
        self.crashes: list[bool] = []
        self.sent: dict[str, list[dict[str, Any]]] = {a: [] for a in ABSENCES}
        self.latest: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.settings = Settings(
            database_url=_db["dsn"], kafka_bootstrap_servers="unused", lease_seconds=60,
            request_timeout_seconds=5, retry_base_seconds=0.001,
        )
        self.dispatcher = self._new_dispatcher()

    async def _setup(self) -> asyncpg.Pool:
        pool = await store.connect(_db["dsn"])
        await store.migrate(pool)
        await pool.execute("TRUNCATE sync_items, absences, sync_log, sync_configs CASCADE")
        await store.apply_configs(pool, [CONFIG], SecretBox(None))
        return pool

    def _new_dispatcher(self) -> Dispatcher:
        calendar, crashes = self.calendar, self.crashes
        return Dispatcher(
            self.settings, self.pool, Metrics(),
            provider_factory=lambda _: CrashingProvider(calendar, crashes),
        )

    def teardown(self) -> None:
        self.runner.run(self._drain_all())
        self.runner.run(self.pool.close())
        self.runner.close()

    async def _record(self, doc: dict[str, Any]) -> None:
        parsed = parse_event(json.dumps(doc).encode())
        async with self.pool.acquire() as conn, conn.transaction():
            await store.record_absences(
                conn, [store.Incoming(parsed.absence, parsed.data, parsed.time)]
            )

    @initialize()
    def start(self) -> None:
        pass

    @rule(
        absence=st.sampled_from(ABSENCES),
        status=st.sampled_from(["approved", "pending", "cancelled", "denied", "deleted"]),
        mailbox=st.sampled_from(MAILBOXES),
        day=st.integers(1, 5),
        half=st.booleans(),
    )
    def new_version(self, absence: str, status: str, mailbox: str, day: int, half: bool) -> None:
        self.version += 1
        if status == "deleted":
            doc = event(absence, self.version, deleted=True)
        else:
            doc = event(
                absence, self.version, status=status, email=mailbox,
                start=(f"2026-12-0{day}", "pm" if half else "am"),
                end=(f"2026-12-0{day}", "pm"),
            )
        self.sent[absence].append(doc)
        self.latest[absence] = doc
        self.runner.run(self._record(doc))

    @rule(absence=st.sampled_from(ABSENCES), data=st.data())
    def redeliver_or_reorder(self, absence: str, data: st.DataObject) -> None:
        """An old event arrives again (redelivery, replay, out of order)."""
        if not self.sent[absence]:
            return
        doc = data.draw(st.sampled_from(self.sent[absence]))
        self.runner.run(self._record(doc))

    @rule()
    def dispatch(self) -> None:
        self.runner.run(self._tick())

    @rule()
    def crash_during_next_write(self) -> None:
        self.crashes[:] = [True]
        self.runner.run(self._tick())
        self.crashes.clear()
        # the dead worker's leases expire; a new process takes over
        self.runner.run(self.pool.execute("UPDATE sync_items SET lease_until = NULL"))
        self.dispatcher = self._new_dispatcher()

    async def _tick(self) -> None:
        await self.dispatcher.tick()
        await self.dispatcher.wait()

    async def _drain_all(self) -> None:
        await self.pool.execute("UPDATE sync_items SET next_attempt_at = now()")
        for _ in range(50):
            await self._tick()
            if await self.pool.fetchval(
                "SELECT count(*) FROM sync_items WHERE change_seq > done_seq"
            ) == 0:
                break
            await self.pool.execute("UPDATE sync_items SET next_attempt_at = now()")
        self._check_calendar()

    def _check_calendar(self) -> None:
        expected: dict[Mark, DesiredEvent] = {}
        for doc in self.latest.values():
            desired = render(parse_event(json.dumps(doc).encode()).absence, CONFIG)
            if desired is not None:
                expected[desired.mark] = desired
        stored = self.calendar.all()
        marks = [s.event.mark for s in stored]
        assert len(marks) == len(set(marks)), "a duplicate event"
        assert {s.event.mark: s.event for s in stored} == expected

    @invariant()
    def never_duplicates(self) -> None:
        marks = [s.event.mark for s in self.calendar.all()]
        assert len(marks) == len(set(marks))


def test_sync_state_machine(machine_dsn: str) -> None:
    SyncMachine.TestCase.settings = settings(
        max_examples=40, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    SyncMachine.TestCase().runTest()
