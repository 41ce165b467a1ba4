"""Calendar doubles for the benchmark, built on the product's `MemoryProvider`.

`StampingProvider` notes the wall-clock time at which every write lands (for
exact end-to-end latencies and throughput windows); `LimitedProvider` adds a
Microsoft-365-like limit of N requests in flight per mailbox (and
`DeclaredLimitProvider` also declares it to the dispatcher); `NullProvider`
keeps nothing, so a memory measurement sees the worker, not the double.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, field

from consumer.providers.base import Provider
from consumer.providers.memory import MemoryCalendar, MemoryProvider
from consumer.render import DesiredEvent, Mark


@dataclass
class Stamps:
    """What the doubles saw, shared by every provider instance of a run."""

    writes: int = 0
    requests: int = 0
    first_start: float | None = None  # time.time() when the first write was sent
    last_end: float = 0.0
    # absence id -> time.time() when its (last) create/update completed
    written_at: dict[str, float] = field(default_factory=dict)
    per_second: dict[int, int] = field(default_factory=dict)  # int(time.time()) -> writes
    done: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 0

    def started(self) -> None:
        self.requests += 1
        if self.first_start is None:
            self.first_start = time.time()

    def wrote(self, mark: Mark | None) -> None:
        now = time.time()
        self.writes += 1
        self.last_end = now
        second = int(now)
        self.per_second[second] = self.per_second.get(second, 0) + 1
        if mark is not None:
            self.written_at[mark.absence_id] = now
        if self.expected and self.writes >= self.expected:
            self.done.set()


class StampingProvider(MemoryProvider):
    """`MemoryProvider` (latency from its calendar) that stamps every write."""

    def __init__(self, calendar: MemoryCalendar, stamps: Stamps) -> None:
        super().__init__(calendar)
        self.stamps = stamps

    async def _call(self, op: str, mailbox: str) -> None:
        self.stamps.started()
        await super()._call(op, mailbox)

    async def create(self, event: DesiredEvent, *, transaction_id: str) -> str:
        event_id = await super().create(event, transaction_id=transaction_id)
        self.stamps.wrote(event.mark)
        return event_id

    async def update(self, mailbox: str, event_id: str, event: DesiredEvent) -> str:
        result = await super().update(mailbox, event_id, event)
        self.stamps.wrote(event.mark)
        return result

    async def delete(self, mailbox: str, event_id: str) -> bool:
        existed = await super().delete(mailbox, event_id)
        self.stamps.wrote(None)
        return existed


class LimitedProvider(StampingProvider):
    """At most `per_mailbox` requests in flight per mailbox; the others wait their turn.

    The calendar's `latency` is the time each request takes once admitted.
    """

    def __init__(
        self,
        calendar: MemoryCalendar,
        stamps: Stamps,
        gates: dict[str, asyncio.Semaphore],
    ) -> None:
        super().__init__(calendar, stamps)
        self.gates = gates

    async def _call(self, op: str, mailbox: str) -> None:
        async with self.gates[mailbox]:
            await super()._call(op, mailbox)


class DeclaredLimitProvider(LimitedProvider):
    """The same double, declaring its limit the way the Microsoft 365 provider does
    (`Provider.mailbox_concurrency`), so the dispatcher gates mailboxes itself."""

    mailbox_concurrency = 4


def mailbox_gates(per_mailbox: int) -> dict[str, asyncio.Semaphore]:
    return defaultdict(lambda: asyncio.Semaphore(per_mailbox))


class NullProvider(Provider):
    """Answers at once and keeps nothing but counters (constant memory)."""

    kind = "null"
    _ids = itertools.count()

    def __init__(self, stamps: Stamps) -> None:
        self.stamps = stamps

    async def create(self, event: DesiredEvent, *, transaction_id: str) -> str:
        self.stamps.started()
        self.stamps.wrote(None)
        return f"null-{next(self._ids)}"

    async def update(self, mailbox: str, event_id: str, event: DesiredEvent) -> str:
        self.stamps.started()
        self.stamps.wrote(None)
        return event_id

    async def delete(self, mailbox: str, event_id: str) -> bool:
        self.stamps.started()
        self.stamps.wrote(None)
        return True

    async def find(self, mailbox: str, mark: Mark) -> list[str]:
        self.stamps.started()
        return []
