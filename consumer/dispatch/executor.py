"""The executor: a batch of leased items -> actions -> provider calls -> outcomes.

`Executor.run` takes a batch the scheduler leased and:

1. renders and plans every item in one pass (`plan_batch`, pure code); an
   item whose last create has an unknown outcome (`Claimed.in_doubt`) is
   first looked for by its ownership mark (adoption), and only those items;
2. leases, in one statement, the mailboxes a mailbox-limited provider needs
   (`MailboxLeases`); an item whose mailbox another replica holds is deferred;
3. records the intents of the batch's creates in one statement, then starts
   every call at once, so each provider gets the batch together (Graph
   coalesces them into `$batch` requests, Exchange into bulk calls, CalDAV
   sends them concurrently), under the provider's per-mailbox limit;
4. records the outcomes in one statement per batch: when every call is
   over, or `linger` seconds after the first result while slower calls are
   still running (a hung call never holds back the rest of its batch).

Errors are the provider's: a `ProviderError` is recorded with its code,
hint and back-off; any other exception is a bug of ours, logged at ERROR
with its traceback and recorded as `provider_error` with back-off (never
mistaken for a retriable provider answer). The executor imposes no timeout
of its own: providers bound their requests. A database outage is waited out
while the batch's lease lasts; past that, the items are left to their
leases and tried again.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg

from consumer import logs, store
from consumer.coalesce import Coalescer
from consumer.dispatch.limits import KeyedLimiter, MailboxLeases, mailbox_key
from consumer.dispatch.providers import Resolved
from consumer.metrics import Metrics
from consumer.outages import Backoff, Outages, traceback_of
from consumer.plan import Action, Create, Delete, Move, Noop, Recorded, Update, plan_batch
from consumer.providers.base import (
    MAILBOX_NOT_FOUND,
    PROVIDER_ERROR,
    EventGone,
    Provider,
    ProviderError,
)
from consumer.render import DesiredEvent
from consumer.targets import CALENDAR
from consumer.targets import spec as target_spec
from consumer.targets import transaction_id as _transaction_id

log = logs.get("dispatch")
T = TypeVar("T")

INTERNAL_ERROR_HINT = (
    "An internal error of absence-sync, not a problem of the calendar: retried with "
    "back-off; the worker's log has the traceback (report it if it persists)."
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential back-off with jitter that never undercuts a server's hint."""

    base: float = 1.0
    cap: float = 900.0
    give_up_after: float = 86_400.0

    def delay(self, attempts: int, retry_after: float | None) -> float:
        backoff = min(self.cap, self.base * (2 ** min(attempts, 30)))
        jittered: float = backoff * random.uniform(0.5, 1.0)
        return max(jittered, retry_after or 0.0)

    def next_attempt(
        self, attempts: int, retry_after: float | None, first_failure: dt.datetime | None
    ) -> dt.datetime | None:
        """When to try again, or None to give up."""
        now = dt.datetime.now(dt.UTC)
        if first_failure is not None and (now - first_failure).total_seconds() > self.give_up_after:
            return None
        return now + dt.timedelta(seconds=self.delay(attempts, retry_after))


def transaction_id(
    config_id: str, absence_id: str, generation: int, target: str = CALENDAR
) -> str:
    """The create transaction id of an item's generation (`consumer.targets`)."""
    return _transaction_id(config_id, absence_id, generation, target)


class LeaseExpired(Exception):
    """PostgreSQL stayed unavailable for longer than the lease: the item is left
    to its lease (another attempt follows when it expires)."""


@dataclass(slots=True)
class LeaseClock:
    """Loop time until which the batch's leases are surely ours (the scheduler's
    heartbeat moves it); database steps stop waiting out an outage past it."""

    deadline: float


@dataclass(slots=True)
class Job:
    """A leased item and the configuration it was leased under."""

    item: store.Claimed
    resolved: Resolved


@dataclass
class _Stats:
    """What a batch did, for one log line and one metrics update."""

    operations: collections.Counter[str] = field(default_factory=collections.Counter)
    calls: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)
    durations: list[tuple[str, str, float]] = field(default_factory=list)
    errors: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    written_at: list[dt.datetime] = field(default_factory=list)
    deferred: int = 0
    internal: int = 0


@dataclass(slots=True)
class _Step:
    """One item's way through the batch."""

    job: Job
    provider: Provider
    stats: _Stats
    desired: DesiredEvent | None = None
    action: Action | None = None
    operation: str = "resolve"  # what the history calls it: create, update, move...
    call: str = ""  # the provider call under way
    intent_recorded: bool = False
    mailboxes: tuple[str, ...] = ()  # leased mailbox keys it uses

    @property
    def item(self) -> store.Claimed:
        return self.job.item

    @property
    def generation(self) -> int:
        """The generation the next create uses: a create retried after an unknown
        outcome keeps its transaction id."""
        item = self.item
        return item.generation if item.intent == "create" else item.generation + 1


class _Batch:
    """Results waiting to be recorded, and how many items are still at work."""

    def __init__(
        self,
        clock: LeaseClock,
        on_done: Callable[[store.Claimed], None],
        on_free: Callable[[store.Claimed], None],
    ) -> None:
        self.clock = clock
        self.on_done = on_done
        self.on_free = on_free
        self.pending = 0
        self.done: list[tuple[store.Claimed, store.Outcome, str]] = []
        self.failed: list[tuple[store.Claimed, store.Failure, str]] = []
        self.deferred: list[store.Claimed] = []
        self.wake = asyncio.Event()
        self.all_done = asyncio.Event()
        self.fatal: BaseException | None = None
        self.stats = _Stats()

    def buffered(self) -> bool:
        return bool(self.done or self.failed or self.deferred)

    def finished(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.all_done.set()
        self.wake.set()

    def abort(self, exc: BaseException) -> None:
        self.fatal = exc
        self.all_done.set()
        self.wake.set()


Handler = Callable[["_Step", "_Batch"], Awaitable[store.Outcome]]


class Executor:
    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: Metrics,
        policy: RetryPolicy,
        *,
        mailbox_slots: KeyedLimiter[str],
        mailbox_leases: MailboxLeases | None,
        tenant_slots: KeyedLimiter[str] | None = None,
        tenant_limit: int = 8,
        tenant_wait: float = 1.0,
        outages: Outages,
        outage_retry_max_seconds: float,
        linger: float = 0.02,
        defer_seconds: float = 1.0,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.policy = policy
        self.mailbox_slots = mailbox_slots
        self.mailbox_leases = mailbox_leases
        #: items of a tenant at work at once (their calls); one waiting longer than
        #: `tenant_wait` for a turn is deferred, so a hung tenant holds few slots
        self.tenant_slots: KeyedLimiter[str] = tenant_slots or KeyedLimiter()
        self.tenant_limit = tenant_limit
        self.tenant_wait = tenant_wait
        self.outages = outages
        self.outage_retry_max_seconds = outage_retry_max_seconds
        self.linger = linger
        self.defer_seconds = defer_seconds
        # intents of creates reached mid-way (a move, a re-create): one statement
        # for all those that get there at once
        self._intents: Coalescer[tuple[store.Claimed, str, int]] = Coalescer(
            lambda rows: store.begin_creates(pool, rows)
        )
        self._handlers: dict[type[Action], Handler] = {
            Create: self._create,
            Update: self._update,
            Move: self._move,
            Delete: self._delete,
        }
        self._children: dict[tuple[str, str], Any] = {}

    # ------------------------------------------------------------------ a batch

    async def run(
        self,
        jobs: Sequence[Job],
        clock: LeaseClock,
        on_done: Callable[[store.Claimed], None],
        on_free: Callable[[store.Claimed], None] | None = None,
    ) -> None:
        """Execute and record `jobs`; `on_free(item)` once an item's calls are over,
        `on_done(item)` once it is recorded (or left to its lease). Cancelling it
        cancels the calls in flight."""
        started = time.monotonic()
        batch = _Batch(clock, on_done, on_free or (lambda _: None))
        steps: list[_Step] = []
        for job in jobs:
            resolved = job.resolved
            if resolved.provider is None:
                assert resolved.problem is not None
                self._failed(batch, job.item, resolved.problem, "resolve", None)
            else:
                steps.append(_Step(job, resolved.provider, batch.stats))
        sure = [s for s in steps if not s.item.in_doubt]
        for step, (desired, action) in zip(sure, plan_batch(
            (_render(s),
             Recorded(s.item.event_id, s.item.mailbox, s.item.applied_hash), s.item.force)
            for s in sure
        ), strict=True):
            step.desired, step.action = desired, action
        steps = await self._lease_mailboxes(batch, steps)
        tasks: list[asyncio.Task[None]] = []
        creates: list[_Step] = []
        for step in steps:
            if isinstance(step.action, Noop):
                batch.done.append((step.item, _outcome(step.desired, step.item.event_id,
                                                       step.item.mailbox), "noop"))
                self._release_mailboxes(step)
                batch.on_free(step.item)
                continue
            if isinstance(step.action, Create):
                creates.append(step)
        try:
            if creates and not await self._begin(batch, creates):
                creates_ids = {id(s) for s in creates}
                steps = [s for s in steps if id(s) not in creates_ids]
            for step in steps:
                if isinstance(step.action, Noop):
                    continue
                batch.pending += 1
                tasks.append(asyncio.create_task(self._work(step, batch)))
            await self._record_until_done(batch)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._report(batch.stats, started)

    async def _begin(self, batch: _Batch, creates: list[_Step]) -> bool:
        """The intents of the batch's creates, in one statement. False when it cannot
        be written: those items are recorded as failed or left to their leases."""
        rows = [(s.item, s.desired.mailbox, s.generation) for s in creates if s.desired]
        try:
            await self._persist(batch.clock, lambda: store.begin_creates(self.pool, rows))
        except Exception as exc:  # noqa: BLE001 - an outage past the lease, or a bug
            for step in creates:
                self._release_mailboxes(step)
                self._crashed(batch, step, exc)
            return False
        for step in creates:
            step.intent_recorded = True
        return True

    async def _work(self, step: _Step, batch: _Batch) -> None:
        """One item: a turn of its tenant, its action's calls, then its outcome into
        the batch (or the item deferred when its tenant's turn does not come)."""
        tenant = step.item.tenant
        if not await self._tenant_turn(tenant):
            self._release_mailboxes(step)
            batch.deferred.append(step.item)
            batch.stats.deferred += 1
            batch.on_free(step.item)
            batch.finished()
            return
        try:
            if step.action is None:  # in doubt: adopt, then plan
                await self._adopt(step)
            assert step.action is not None
            handler = self._handlers.get(type(step.action))
            if handler is None:
                outcome = _outcome(step.desired, step.item.event_id, step.item.mailbox)
                step.operation = "noop"
            else:
                outcome = await handler(step, batch)
            batch.done.append((step.item, outcome, step.operation))
            if step.operation != "noop" and step.item.event_time is not None and outcome.wanted:
                batch.stats.written_at.append(step.item.event_time)
            batch.stats.operations[step.operation] += 1
        except ProviderError as exc:
            self._failed(batch, step.item, exc, step.operation, step)
        except Exception as exc:  # noqa: BLE001 - recorded on the item, never silent
            self._crashed(batch, step, exc)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            batch.abort(exc)  # the process is going down: record nothing more
            raise
        finally:
            self.tenant_slots.release(tenant)
            self._release_mailboxes(step)
            batch.on_free(step.item)
            batch.finished()

    async def _tenant_turn(self, tenant: str) -> bool:
        if self.tenant_slots.try_acquire(tenant, self.tenant_limit):
            return True
        try:
            async with asyncio.timeout(self.tenant_wait):
                await self.tenant_slots.acquire(tenant, self.tenant_limit)
        except TimeoutError:
            return False
        return True

    async def _record_until_done(self, batch: _Batch) -> None:
        while True:
            if batch.fatal is not None:
                raise batch.fatal
            if batch.buffered():
                if batch.pending > 0 and self.linger > 0:
                    # stragglers: give them a moment to join this statement
                    try:
                        async with asyncio.timeout(self.linger):
                            await batch.all_done.wait()
                    except TimeoutError:
                        pass
                    if batch.fatal is not None:
                        raise batch.fatal
                await self._record(batch)
                continue
            if batch.pending <= 0:
                return
            batch.wake.clear()
            await batch.wake.wait()

    async def _record(self, batch: _Batch) -> None:
        done, failed, deferred = batch.done, batch.failed, batch.deferred
        batch.done, batch.failed, batch.deferred = [], [], []
        items = [r[0] for r in done] + [r[0] for r in failed] + deferred
        try:
            await self._persist(batch.clock, lambda: store.record_outcomes(
                self.pool, done, failed, deferred, defer_seconds=self.defer_seconds,
            ))
        except Exception as exc:  # noqa: BLE001 - the leases hand the items back
            if isinstance(exc, LeaseExpired):
                log.warning("PostgreSQL unavailable for longer than the lease; the items "
                            "are retried when their leases expire",
                            error_type=str(exc), items=len(items))
            else:
                self.metrics.internal_errors.labels("dispatch").inc()
                log.error("could not record a batch's outcomes; the items are retried when "
                          "their leases expire", error_type=type(exc).__name__,
                          traceback=traceback_of(exc), items=len(items))
        for item in items:
            batch.on_done(item)

    # ------------------------------------------------------------------ actions

    async def _create(self, step: _Step, batch: _Batch) -> store.Outcome:
        assert isinstance(step.action, Create)
        step.operation = "create"
        event_id = await self._create_event(step, batch, step.action.desired)
        return _outcome(step.desired, event_id, step.action.desired.mailbox)

    async def _update(self, step: _Step, batch: _Batch) -> store.Outcome:
        action = step.action
        assert isinstance(action, Update)
        step.operation = "update"
        target = action.desired
        try:
            event_id = await self._call(
                step, target.mailbox, "update",
                lambda: step.provider.update(target.mailbox, action.event_id, target),
            )
        except EventGone:
            step.operation = "recreate"
            event_id = await self._create_event(step, batch, target)
        return _outcome(step.desired, event_id, target.mailbox)

    async def _move(self, step: _Step, batch: _Batch) -> store.Outcome:
        action = step.action
        assert isinstance(action, Move)
        step.operation = "move"
        await self._call(
            step, action.old_mailbox, "delete",
            lambda: step.provider.delete(action.old_mailbox, action.old_event_id),
        )
        event_id = await self._create_event(step, batch, action.desired)
        return _outcome(step.desired, event_id, action.desired.mailbox)

    async def _delete(self, step: _Step, batch: _Batch) -> store.Outcome:
        action = step.action
        assert isinstance(action, Delete)
        step.operation = "delete"
        existed = await self._call(
            step, action.mailbox, "delete",
            lambda: step.provider.delete(action.mailbox, action.event_id),
        )
        if not existed:
            step.operation = "delete_gone"
        return _outcome(None, None, None)

    async def _create_event(self, step: _Step, batch: _Batch, target: DesiredEvent) -> str:
        item = step.item
        generation = step.generation
        if not step.intent_recorded:
            await self._persist(
                batch.clock, lambda: self._intents.submit((item, target.mailbox, generation))
            )
            step.intent_recorded = True
        tx = transaction_id(item.config_id, item.absence_id, generation, item.target)
        event_id = await self._call(
            step, target.mailbox, "create",
            lambda: step.provider.create(target, transaction_id=tx),
        )
        return str(event_id)

    async def _adopt(self, step: _Step) -> None:
        """A create may have landed before a crash: find it by its mark (the item's
        target's), keep one, then plan against what was found.

        A mailbox that does not exist holds nothing: the plan then goes on from
        there (the absence may want another mailbox by now; if it still wants
        that one, its create fails for itself)."""
        item = step.item
        mailbox = item.mailbox
        assert mailbox is not None
        step.operation = "adopt"
        mark = target_spec(item.target).mark(item.config_id, item.absence_id)
        try:
            found = await self._call(
                step, mailbox, "find", lambda: step.provider.find(mailbox, mark)
            )
        except ProviderError as exc:
            if exc.code != MAILBOX_NOT_FOUND:
                raise
            found = []
        recorded = Recorded()
        ids = list(found)
        if ids:
            for extra in ids[1:]:
                await self._call(step, mailbox, "delete",
                                 _bind(step.provider.delete, mailbox, extra))
            log.info("adopted event written before a crash", config=item.config_id,
                     absence=item.absence_id, target=item.target)
            recorded = Recorded(ids[0], mailbox, None)
        step.desired = _render(step)
        (step.desired, step.action), = plan_batch([(step.desired, recorded, item.force)])
        step.operation = "resolve"

    # ------------------------------------------------------------------ calls

    async def _call(
        self, step: _Step, mailbox: str, operation: str, call: Callable[[], Awaitable[T]]
    ) -> T:
        """One provider call under the provider's per-mailbox limit, timed and counted.
        Whatever the provider raises goes through unchanged."""
        provider = step.provider
        step.call = operation
        started = time.monotonic()
        outcome = "error"
        try:
            async with self.mailbox_slots.hold(
                mailbox_key(provider.kind, mailbox), provider.mailbox_concurrency
            ):
                result = await call()
            outcome = "ok"
            return result
        finally:
            step.stats.calls[(provider.kind, operation, outcome)] += 1
            step.stats.durations.append((provider.kind, operation, time.monotonic() - started))

    # ------------------------------------------------------------------ mailboxes

    async def _lease_mailboxes(self, batch: _Batch, steps: list[_Step]) -> list[_Step]:
        """Lease, in one statement, the mailboxes of mailbox-limited providers the
        batch writes to; defer the items whose mailbox another replica holds."""
        leases = self.mailbox_leases
        if leases is None:
            return steps
        for step in steps:
            if step.provider.mailbox_concurrency is not None:
                step.mailboxes = tuple(
                    mailbox_key(step.provider.kind, m) for m in _mailboxes(step)
                )
        wanted = [key for step in steps for key in step.mailboxes]  # one use per item
        if not wanted:
            return steps
        try:
            granted = await self._persist(batch.clock, lambda: leases.acquire(wanted))
        except Exception as exc:  # noqa: BLE001 - no lease, no call: the items wait
            log.warning("cannot lease mailboxes; the items are tried again",
                        error_type=type(exc).__name__)
            granted = set()
        kept: list[_Step] = []
        for step in steps:
            if all(key in granted for key in step.mailboxes):
                kept.append(step)
                continue
            leases.release(k for k in step.mailboxes if k in granted)
            step.mailboxes = ()
            batch.deferred.append(step.item)
            batch.stats.deferred += 1
        return kept

    def _release_mailboxes(self, step: _Step) -> None:
        if step.mailboxes and self.mailbox_leases is not None:
            self.mailbox_leases.release(step.mailboxes)
            step.mailboxes = ()

    # ------------------------------------------------------------------ failures

    def _failed(
        self, batch: _Batch, item: store.Claimed, exc: ProviderError, operation: str,
        step: _Step | None,
    ) -> None:
        retry_at = (
            self.policy.next_attempt(item.attempts, exc.retry_after, item.first_failure_at)
            if exc.retriable else None
        )
        call = step.call if step is not None else ""
        # a permanent refusal of the create (or of the mailbox it was for) means
        # nothing was stored: the next attempt need not look for it first
        clear = not exc.retriable and (call == "create" or (
            exc.code == MAILBOX_NOT_FOUND and item.in_doubt
        ))
        kind = step.provider.kind if step is not None else "unknown"
        batch.stats.errors[(kind, str(exc.code))] += 1
        log.warning(
            "calendar write failed", code=str(exc.code), retriable=exc.retriable,
            retry_after=exc.retry_after, error=exc.message[:300], operation=operation,
            tenant=item.tenant, config=item.config_id, absence=item.absence_id,
            target=item.target,
        )
        batch.failed.append((item, store.Failure(
            str(exc.code), exc.message, exc.hint, retry_at, clear,
            _address(step),
        ), operation))

    def _crashed(self, batch: _Batch, step: _Step, exc: Exception) -> None:
        item = step.item
        if isinstance(exc, LeaseExpired):
            log.warning("PostgreSQL unavailable for longer than the lease; the item is "
                        "retried when its lease expires", error_type=str(exc),
                        tenant=item.tenant, config=item.config_id, absence=item.absence_id)
            batch.on_done(item)
            return
        batch.stats.internal += 1
        log.error(
            "internal error while syncing an item; recorded as provider_error, retried "
            "with back-off", error_type=type(exc).__name__, operation=step.operation,
            traceback=traceback_of(exc), tenant=item.tenant, config=item.config_id,
            absence=item.absence_id, target=item.target,
        )
        batch.failed.append((item, store.Failure(
            PROVIDER_ERROR, f"internal error ({type(exc).__name__}) during {step.operation}",
            INTERNAL_ERROR_HINT, self.policy.next_attempt(item.attempts, None,
                                                          item.first_failure_at),
            mailbox=_address(step),
        ), step.operation))

    # ------------------------------------------------------------------ plumbing

    async def _persist(self, clock: LeaseClock, step: Callable[[], Awaitable[T]]) -> T:
        """A database step, repeated while PostgreSQL is unavailable and the lease
        lasts (`clock`). The steps are idempotent."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(self.outage_retry_max_seconds)
        while True:
            try:
                result = await step()
            except Exception as exc:
                if not store.is_unavailable(exc):
                    raise
                delay = backoff.next_delay()
                if loop.time() + delay > clock.deadline:
                    raise LeaseExpired(type(exc).__name__) from exc
                self.outages.failing("dispatch", "postgresql")
                await asyncio.sleep(delay)
                continue
            if backoff.attempts:
                self.outages.recovered("dispatch", "postgresql")
            return result

    def _report(self, stats: _Stats, started: float) -> None:
        """One metrics update and one log line for the batch."""
        metrics = self.metrics
        for (kind, operation, outcome), n in stats.calls.items():
            metrics.requests.labels(kind, operation, outcome).inc(n)
        for kind, operation, seconds in stats.durations:
            self._histogram(kind, operation).observe(seconds)
        for (kind, code), n in stats.errors.items():
            metrics.errors.labels(kind, code).inc(n)
        if stats.internal:
            metrics.internal_errors.labels("dispatch").inc(stats.internal)
        if stats.written_at:
            now = dt.datetime.now(dt.UTC)
            for when in stats.written_at:
                metrics.end_to_end.observe(max(0.0, (now - when).total_seconds()))
        written = sum(n for op, n in stats.operations.items() if op != "noop")
        if written or stats.errors or stats.deferred:
            log.info(
                "dispatched", seconds=round(time.monotonic() - started, 4),
                operations=dict(stats.operations), failed=sum(stats.errors.values()),
                deferred=stats.deferred,
            )

    def _histogram(self, kind: str, operation: str) -> Any:
        child = self._children.get((kind, operation))
        if child is None:
            child = self._children[(kind, operation)] = self.metrics.request_seconds.labels(
                kind, operation
            )
        return child


def _render(step: _Step) -> DesiredEvent | None:
    """What the item's target should hold (`consumer.targets`)."""
    item = step.item
    return target_spec(item.target).render(item.absence, step.job.resolved.stored.config)


def _address(step: _Step | None) -> str | None:
    """The mailbox an item's work is for, when known (a failure's history row)."""
    if step is None:
        return None
    if step.desired is not None:
        return step.desired.mailbox
    item = step.item
    return item.mailbox or target_spec(item.target).address(
        item.absence, step.job.resolved.stored.config
    )


def _mailboxes(step: _Step) -> Iterable[str]:
    """The mailboxes an item's work will call."""
    action, item = step.action, step.item
    if action is None:  # in doubt: the adoption, then whatever it leads to
        if item.mailbox:
            yield item.mailbox
        address = target_spec(item.target).address(
            item.absence, step.job.resolved.stored.config
        )
        if address is not None:
            yield address
        return
    if isinstance(action, Create | Update):
        yield action.desired.mailbox
    elif isinstance(action, Move):
        yield action.old_mailbox
        yield action.desired.mailbox
    elif isinstance(action, Delete):
        yield action.mailbox


def _bind(fn: Callable[[str, str], Awaitable[T]], a: str, b: str) -> Callable[[], Awaitable[T]]:
    return lambda: fn(a, b)


def _outcome(
    desired: DesiredEvent | None, event_id: str | None, mailbox: str | None
) -> store.Outcome:
    if desired is None:
        return store.Outcome("deleted", wanted=False)
    return store.Outcome("synced", True, event_id, mailbox, desired.content_hash())
