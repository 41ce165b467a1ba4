"""An in-memory calendar: the reference `Provider` for tests and benchmarks.

Faults can be scripted per call (`fail_next`), calls can be slowed
(`latency`), and `hang` makes every call to a mailbox block until released,
so the dispatcher's isolation and retry logic run against real behaviour.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

from consumer.providers.base import EventGone, Provider, ProviderError
from consumer.render import DesiredEvent, Mark


@dataclass
class StoredEvent:
    id: str
    event: DesiredEvent
    transaction_id: str | None = None


@dataclass
class MemoryCalendar:
    """Shared state, so several provider instances can write one calendar."""

    events: dict[str, dict[str, StoredEvent]] = field(default_factory=lambda: defaultdict(dict))
    calls: list[tuple[str, str]] = field(default_factory=list)
    call_times: list[float] = field(default_factory=list)
    faults: list[ProviderError] = field(default_factory=list)
    hanging: set[str] = field(default_factory=set)
    latency: float = 0.0
    in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def all(self) -> list[StoredEvent]:
        return [e for box in self.events.values() for e in box.values()]

    def fail_next(self, *errors: ProviderError) -> None:
        self.faults.extend(errors)

    def next_id(self) -> str:
        return f"mem-{next(self._ids)}"


class MemoryProvider(Provider):
    kind: ClassVar[str] = "memory"

    def __init__(self, calendar: MemoryCalendar | None = None) -> None:
        self.calendar = calendar or MemoryCalendar()

    async def _call(self, op: str, mailbox: str) -> None:
        cal = self.calendar
        cal.calls.append((op, mailbox))
        cal.call_times.append(time.monotonic())
        cal.in_flight[mailbox] += 1
        cal.max_in_flight[mailbox] = max(cal.max_in_flight[mailbox], cal.in_flight[mailbox])
        try:
            while mailbox in cal.hanging:
                cal.released.clear()
                await cal.released.wait()
            if cal.latency:
                await asyncio.sleep(cal.latency)
            if cal.faults:
                raise cal.faults.pop(0)
        finally:
            cal.in_flight[mailbox] -= 1

    async def create(self, event: DesiredEvent, *, transaction_id: str) -> str:
        await self._call("create", event.mailbox)
        box = self.calendar.events[event.mailbox]
        for stored in box.values():
            if stored.transaction_id == transaction_id:
                return stored.id
        stored = StoredEvent(self.calendar.next_id(), event, transaction_id)
        box[stored.id] = stored
        return stored.id

    async def update(self, mailbox: str, event_id: str, event: DesiredEvent) -> str:
        await self._call("update", mailbox)
        box = self.calendar.events[mailbox]
        if event_id not in box:
            raise EventGone()
        box[event_id].event = event
        return event_id

    async def delete(self, mailbox: str, event_id: str) -> bool:
        await self._call("delete", mailbox)
        return self.calendar.events[mailbox].pop(event_id, None) is not None

    async def find(self, mailbox: str, mark: Mark) -> list[str]:
        await self._call("find", mailbox)
        values = mark.values
        return [s.id for s in self.calendar.events[mailbox].values()
                if s.event.mark.value in values]
