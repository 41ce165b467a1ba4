"""Provider warnings reach the configuration: the dispatcher stores what a provider
reports (e.g. an Exchange server out of support, learnt on its first call)
whenever it changes, without a new revision."""

from __future__ import annotations

import asyncpg

from consumer import store
from consumer.providers.memory import MemoryCalendar, MemoryProvider
from consumer.settings import Settings
from tests.conftest import Publisher, event, wait_until
from tests.harness import apply, settled, sync_config, worker


class ReportingProvider(MemoryProvider):
    """The in-memory calendar, reporting whatever the test puts in `reports`."""

    def __init__(self, calendar: MemoryCalendar, reports: list[str]) -> None:
        super().__init__(calendar)
        self.reports = reports

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(self.reports)


async def test_warnings_are_stored_when_they_change(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, sync_config())
    calendar = MemoryCalendar()
    reports = ["the server is old"]

    async def stored_as(expected: tuple[str, ...]) -> bool:
        stored = await store.get_config(pool, "acme-cal")
        assert stored is not None and stored.revision == 1
        return stored.warnings == expected

    async with worker(settings, factory=lambda _: ReportingProvider(calendar, reports)):
        await publisher.send(event("abs-1", 1))
        await publisher.flush()
        await wait_until(lambda: settled(pool, 1))
        await wait_until(lambda: stored_as(("the server is old",)))
        reports.clear()  # e.g. the server was upgraded
        await publisher.send(event("abs-2", 1))
        await publisher.flush()
        await wait_until(lambda: settled(pool, 2))
        await wait_until(lambda: stored_as(()))
    assert len(calendar.all()) == 2
