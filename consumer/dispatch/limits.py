"""Limits of the dispatcher: one keyed limiter for tenants and mailboxes, and
mailbox leases that make a provider's per-mailbox limit hold across replicas.

`KeyedLimiter` counts holders per key (a tenant, a mailbox) against a limit
given by the caller; waiters are served in arrival order, and a key nobody
holds or waits for takes no memory, so memory follows activity, not the
number of tenants or mailboxes ever seen.

`MailboxLeases` leases mailboxes in PostgreSQL to this dispatcher
(docs/architecture.md, "Mailbox limits across replicas"): while a replica
holds a mailbox, no other replica sends it anything, so the in-process limit
is the limit of the whole fleet.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import asyncpg

from consumer import store

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Key:
    holders: int = 0
    waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)
    limit: int = 0
    full_since: float | None = None  # monotonic time since when all its slots are held


class KeyedLimiter(Generic[K]):
    """At most `limit` holders per key (the limit is the caller's, per call)."""

    def __init__(self) -> None:
        self._keys: dict[K, _Key] = {}

    def load(self, key: K) -> int:
        entry = self._keys.get(key)
        return entry.holders if entry is not None else 0

    def loads(self) -> dict[K, int]:
        """Holders of every key that has some."""
        return {k: e.holders for k, e in self._keys.items() if e.holders}

    def __len__(self) -> int:
        return len(self._keys)

    def saturated(self, for_seconds: float) -> list[K]:
        """Keys whose every slot has been held for at least `for_seconds` (work that
        is slow or stuck, as opposed to slots that turn over quickly)."""
        now = time.monotonic()
        return [
            key for key, entry in self._keys.items()
            if entry.full_since is not None and now - entry.full_since >= for_seconds
        ]

    def try_acquire(self, key: K, limit: int) -> bool:
        """Take a slot of `key` if one is free now (no waiting)."""
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _Key()
        if entry.holders >= limit or entry.waiters:
            self._forget_if_idle(key, entry)
            return False
        entry.holders += 1
        self._note(entry, limit)
        return True

    @staticmethod
    def _note(entry: _Key, limit: int) -> None:
        entry.limit = limit
        if entry.holders >= limit:
            if entry.full_since is None:
                entry.full_since = time.monotonic()
        else:
            entry.full_since = None

    async def acquire(self, key: K, limit: int) -> None:
        """Wait for a slot of `key`, in arrival order."""
        if self.try_acquire(key, limit):
            return
        entry = self._keys.setdefault(key, _Key())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(key)  # handed a slot just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    entry.waiters.remove(waiter)
                self._forget_if_idle(key, entry)
            raise

    def release(self, key: K) -> None:
        entry = self._keys.get(key)
        if entry is None:
            return
        while entry.waiters:
            waiter = entry.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: holders stay the same
                return
        entry.holders = max(0, entry.holders - 1)
        self._note(entry, entry.limit)
        self._forget_if_idle(key, entry)

    @contextlib.asynccontextmanager
    async def hold(self, key: K, limit: int | None) -> AsyncIterator[None]:
        """A slot of `key` for the block (no limit: nothing is counted)."""
        if limit is None:
            yield
            return
        await self.acquire(key, limit)
        try:
            yield
        finally:
            self.release(key)

    def _forget_if_idle(self, key: K, entry: _Key) -> None:
        if entry.holders <= 0 and not entry.waiters:
            self._keys.pop(key, None)


def mailbox_key(kind: str, mailbox: str) -> str:
    """The key under which a provider kind's mailbox is limited and leased."""
    return f"{kind}:{mailbox.casefold()}"


class MailboxLeases:
    """Mailboxes this dispatcher (`holder`) has leased in PostgreSQL.

    `acquire` asks for the keys a batch needs in one statement and counts
    their users (one per item); `release` counts an item's down; `release_idle` gives back, in
    one statement, those nobody here uses any more (the scheduler calls it
    between batches, so a busy mailbox is not leased anew for every batch);
    `renew` extends the ones held (the scheduler's heartbeat)."""

    def __init__(self, pool: asyncpg.Pool, holder: str, lease_seconds: float) -> None:
        self.pool = pool
        self.holder = holder
        self.lease_seconds = lease_seconds
        self._users: collections.Counter[str] = collections.Counter()
        self._held: set[str] = set()
        self._lock = asyncio.Lock()  # one statement at a time: a release never undoes a grant

    @property
    def held(self) -> set[str]:
        return set(self._held)

    async def acquire(self, keys: Iterable[str]) -> set[str]:
        """Lease what is not held yet; returns the keys granted. Each occurrence of a
        granted key in `keys` counts one user (an item), until `release`."""
        uses = collections.Counter(keys)
        async with self._lock:
            missing = sorted(set(uses) - self._held)
            if missing:
                self._held |= await store.lease_mailboxes(
                    self.pool, self.holder, missing, self.lease_seconds
                )
            granted = set(uses) & self._held
            self._users.update({key: uses[key] for key in granted})
        return granted

    def release(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._users[key] -= 1
            if self._users[key] <= 0:
                del self._users[key]

    async def release_idle(self) -> None:
        async with self._lock:
            idle = [k for k in self._held if not self._users.get(k)]
            if idle:
                self._held.difference_update(idle)
                await store.release_mailboxes(self.pool, self.holder, idle)

    async def renew(self) -> None:
        async with self._lock:
            if self._held:
                self._held &= await store.lease_mailboxes(
                    self.pool, self.holder, sorted(self._held), self.lease_seconds
                )

    async def release_all(self) -> None:
        async with self._lock:
            held, self._held = sorted(self._held), set()
            self._users.clear()
            await store.release_mailboxes(self.pool, self.holder, held)
