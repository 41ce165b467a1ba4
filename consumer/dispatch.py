"""Dispatch (docs/guarantees.md): pending work -> providers, with per-tenant limits.

The dispatcher leases due items from PostgreSQL (`FOR UPDATE SKIP LOCKED`, so
replicas share work without doubles), renders and plans each one (pure
code), executes the action through the configuration's provider, and
records the outcome. Every item runs in its own task under its tenant's
semaphore and a timeout: a hanging or failing tenant only ever holds its
own slots, never another tenant's work nor a Kafka partition.

Nothing ends the dispatcher but a stop: a database outage is waited out
with a capped back-off (reported on /readyz), both in the leasing loop and
in an item's own database steps while its lease lasts. An exception other
than `ProviderError` inside an item's work is a bug of ours: it is logged at
ERROR with its traceback and recorded on the item as `provider_error` with
back-off (attempts counted), so the item is neither lost nor leased again
and again in silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from consumer import logs, store
from consumer.coalesce import Coalescer
from consumer.metrics import Metrics
from consumer.outages import INTERNAL, Backoff, Outages, traceback_of
from consumer.plan import Create, Delete, Move, Noop, Recorded, Update, plan
from consumer.providers import build_provider
from consumer.providers.base import (
    PROVIDER_ERROR,
    SERVER_UNREACHABLE,
    EventGone,
    Provider,
    ProviderContext,
    ProviderError,
)
from consumer.render import DesiredEvent, render
from consumer.secrets import SecretBox
from consumer.settings import Settings

log = logs.get("dispatch")

ProviderFactory = Callable[[store.StoredConfig], Provider]
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


@dataclass
class _MailboxSlot:
    semaphore: asyncio.Semaphore
    users: int = 0


def transaction_id(config_id: str, absence_id: str, generation: int) -> str:
    return f"{config_id}/{absence_id}/{generation}"


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        metrics: Metrics,
        *,
        box: SecretBox | None = None,
        provider_factory: ProviderFactory | None = None,
        context: ProviderContext | None = None,
        outages: Outages | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.outages = outages or Outages(metrics)
        self.box = box or SecretBox(settings.secret_keys)
        self.context = context or ProviderContext(settings)
        self.factory: ProviderFactory = provider_factory or (
            lambda stored: build_provider(stored.config, self.context)
        )
        self.policy = RetryPolicy(
            settings.retry_base_seconds, settings.retry_max_seconds, settings.retry_for_seconds
        )
        self.wake = asyncio.Event()
        self._providers: dict[str, tuple[int, Provider]] = {}
        self._revisions: dict[str, int] = {}
        self._last_claim = 0.0
        self._provider_lock = asyncio.Lock()
        self._configs: dict[str, store.StoredConfig] = {}
        self._warnings: dict[str, tuple[str, ...]] = {}  # as stored, per configuration
        self._tenant_load: dict[str, int] = defaultdict(int)
        self._tasks: dict[asyncio.Task[None], store.Claimed] = {}
        self._slots = asyncio.Semaphore(settings.dispatch_concurrency)
        self._mailbox_slots: dict[tuple[str, str], _MailboxSlot] = {}
        self._intents: Coalescer[tuple[store.Claimed, str, int]] = Coalescer(
            lambda rows: store.begin_creates(pool, rows)
        )
        self._finished: Coalescer[tuple[store.Claimed, store.Outcome, str]] = Coalescer(
            lambda rows: store.finish_many(pool, rows)
        )

    def notify(self) -> None:
        self.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Lease and start work until `stop` is set; then drain (see `drain`).

        An error while leasing is retried after a capped back-off, never fatal."""
        backoff = Backoff(self.settings.outage_retry_max_seconds)
        while not stop.is_set():
            try:
                started = await self.tick()
            except Exception as exc:  # noqa: BLE001 - waited out; reported on /readyz
                self._tick_failed(exc)
                await backoff.wait(stop)
                continue
            if backoff.attempts:
                backoff.reset()
                self.outages.recovered("dispatch")
                log.info("dispatch resumed")
            if started:
                continue
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.dispatch_poll_seconds):
                    await _first(self.wake.wait(), stop.wait())

    def _tick_failed(self, exc: Exception) -> None:
        if store.is_unavailable(exc):
            self.outages.failing("dispatch", "postgresql")
            log.warning("PostgreSQL unavailable; dispatch retries", error_type=type(exc).__name__)
            return
        self.outages.failing("dispatch", INTERNAL)
        self.metrics.internal_errors.labels("dispatch").inc()
        log.error(
            "dispatch failed to lease work; retrying",
            error_type=type(exc).__name__,
            traceback=traceback_of(exc),
        )

    async def tick(self) -> int:
        """Lease what is due and start a task per item; returns how many started."""
        free = self.settings.dispatch_concurrency - len(self._tasks)
        now = time.monotonic()
        # claim in batches (`_done` wakes the loop once a quarter of the slots are
        # free), but at least once per poll interval whatever is free, so slow
        # calls holding most slots never starve the rest
        batch_ready = free >= self.settings.dispatch_concurrency // 4 or not self._tasks
        overdue = now - self._last_claim >= self.settings.dispatch_poll_seconds
        if free <= 0 or not (batch_ready or overdue):
            return 0
        self._last_claim = now
        busy = [t for t, n in self._tenant_load.items() if n >= self.settings.tenant_concurrency]
        self._revisions = await store.config_revisions(self.pool)
        items = await store.claim(
            self.pool,
            limit=free,
            per_tenant=self.settings.tenant_concurrency,
            busy_tenants=busy,
            lease_seconds=self.settings.lease_seconds,
        )
        # past this, another replica may lease the item: our own database steps give up
        deadline = (
            asyncio.get_running_loop().time()
            + self.settings.lease_seconds
            - self.settings.request_timeout_seconds
        )
        for item in items:
            self._tenant_load[item.tenant] += 1
            task = asyncio.create_task(self._run_item(item, deadline))
            self._tasks[task] = item
            task.add_done_callback(self._done)
        self.metrics.in_flight.set(len(self._tasks))
        return len(items)

    def _done(self, task: asyncio.Task[None]) -> None:
        item = self._tasks.pop(task)
        self._tenant_load[item.tenant] -= 1
        if self._tenant_load[item.tenant] <= 0:
            del self._tenant_load[item.tenant]
        self.metrics.in_flight.set(len(self._tasks))
        if not task.cancelled() and task.exception() is not None:
            log.error("dispatch task crashed", exc_info=task.exception())
        # claim in batches: wake the loop once a quarter of the slots are free
        if len(self._tasks) <= self.settings.dispatch_concurrency * 3 // 4:
            self.wake.set()

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for work in flight, then cancel it and hand it back."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        leftover = dict(self._tasks)
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.gather(*leftover, return_exceptions=True)
            # best effort: if PostgreSQL is away the leases simply expire
            with contextlib.suppress(
                OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError
            ):
                await store.release(self.pool, list(leftover.values()))
        for _, provider in self._providers.values():
            with contextlib.suppress(Exception):
                await provider.close()
        self._providers.clear()

    async def _provider(self, config_id: str) -> tuple[store.StoredConfig, Provider] | None:
        """The configuration and its provider, rebuilt when the configuration changes."""
        async with self._provider_lock:
            return await self._provider_locked(config_id)

    async def _provider_locked(
        self, config_id: str
    ) -> tuple[store.StoredConfig, Provider] | None:
        revision = self._revisions.get(config_id)
        cached = self._providers.get(config_id)
        if cached is not None and revision in (None, cached[0]) and config_id in self._configs:
            return self._configs[config_id], cached[1]
        stored = await store.get_config(self.pool, config_id, self.box)
        if stored is None:
            return None
        provider = self.factory(stored)
        if cached is not None:
            with contextlib.suppress(Exception):
                await cached[1].close()
        self._providers[config_id] = (stored.revision, provider)
        self._configs[config_id] = stored
        self._warnings[config_id] = stored.warnings
        return stored, provider

    async def _run_item(self, item: store.Claimed, deadline: float) -> None:
        structlog_ctx = {
            "tenant": item.tenant, "config": item.config_id, "absence": item.absence_id
        }
        operation = "resolve"
        kind = "unknown"
        provider: Provider | None = None
        try:
            found = await self._persist(deadline, lambda: self._provider(item.config_id))
            if found is None:
                return
            stored, provider = found
            kind = provider.kind
            operation, desired, outcome = await self._execute(item, stored, provider, deadline)
            await self._persist(deadline, lambda: self._finished.submit((item, outcome, operation)))
            if operation != "noop" and desired is not None and item.event_time is not None:
                age = (dt.datetime.now(dt.UTC) - item.event_time).total_seconds()
                self.metrics.end_to_end.observe(max(0.0, age))
            if operation != "noop":
                log.info("synced", operation=operation, **structlog_ctx)
        except ProviderError as exc:
            self.metrics.errors.labels(kind, exc.code).inc()
            retry_at = (
                self.policy.next_attempt(item.attempts, exc.retry_after, item.first_failure_at)
                if exc.retriable
                else None
            )
            log.warning(
                "calendar write failed", code=exc.code, retriable=exc.retriable,
                retry_after=exc.retry_after, error=exc.message[:300], **structlog_ctx,
            )
            await self._record_failure(
                item, deadline, code=exc.code, message=exc.message, hint=exc.hint,
                retry_at=retry_at, operation=operation,
            )
        except Exception as exc:  # noqa: BLE001 - recorded on the item, never silent
            if store.is_unavailable(exc):
                log.warning(
                    "PostgreSQL unavailable for longer than the lease; the item is retried "
                    "when its lease expires", error_type=type(exc).__name__, **structlog_ctx,
                )
                return
            self.metrics.internal_errors.labels("dispatch").inc()
            log.error(
                "internal error while syncing an item; recorded as provider_error, retried "
                "with back-off", error_type=type(exc).__name__, operation=operation,
                traceback=traceback_of(exc), **structlog_ctx,
            )
            await self._record_failure(
                item, deadline, code=PROVIDER_ERROR,
                message=f"internal error ({type(exc).__name__}) during {operation}",
                hint=INTERNAL_ERROR_HINT,
                retry_at=self.policy.next_attempt(item.attempts, None, item.first_failure_at),
                operation=operation,
            )
        if provider is not None:
            await self._report_warnings(item.config_id, provider)

    async def _report_warnings(self, config_id: str, provider: Provider) -> None:
        """Store what the provider reports about its configuration (e.g. a server out
        of support, learnt on its first call) on the configuration, when it changes."""
        warnings = tuple(provider.warnings)
        if self._warnings.get(config_id) == warnings:
            return
        self._warnings[config_id] = warnings
        try:
            await store.set_config_warnings(self.pool, config_id, warnings)
        except (OSError, asyncpg.PostgresError) as exc:
            self._warnings.pop(config_id, None)  # tried again after the next call
            log.warning("cannot store configuration warnings", config=config_id, error=str(exc))

    async def _record_failure(
        self,
        item: store.Claimed,
        deadline: float,
        *,
        code: str,
        message: str,
        hint: str,
        retry_at: dt.datetime | None,
        operation: str,
    ) -> None:
        """`store.fail`, through a database outage while the lease lasts; if that is
        not enough, the lease expires and the item is simply tried again."""
        try:
            await self._persist(deadline, lambda: store.fail(
                self.pool, item, code=code, message=message, hint=hint, retry_at=retry_at,
                operation=operation,
            ))
        except Exception as exc:  # noqa: BLE001 - the lease hands the item back
            log.warning(
                "could not record a failure; the item is retried when its lease expires",
                error_type=type(exc).__name__, config=item.config_id, absence=item.absence_id,
            )

    async def _persist(self, deadline: float, step: Callable[[], Awaitable[T]]) -> T:
        """One database step of an item, repeated while PostgreSQL is unavailable and
        the item's lease lasts (`deadline`, loop time). The steps are idempotent."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(self.settings.outage_retry_max_seconds)
        while True:
            try:
                result = await step()
            except Exception as exc:
                delay = backoff.next_delay()
                if not store.is_unavailable(exc) or loop.time() + delay > deadline:
                    raise
                self.outages.failing("dispatch", "postgresql")
                await asyncio.sleep(delay)
                continue
            if backoff.attempts:
                self.outages.recovered("dispatch", "postgresql")
            return result

    @contextlib.asynccontextmanager
    async def _mailbox_slot(self, provider: Provider, mailbox: str) -> AsyncIterator[None]:
        """The provider's per-mailbox limit, held only for the call itself."""
        limit = provider.mailbox_concurrency
        if limit is None:
            yield
            return
        key = (provider.kind, mailbox)
        entry = self._mailbox_slots.get(key)
        if entry is None:
            entry = self._mailbox_slots[key] = _MailboxSlot(asyncio.Semaphore(limit))
        entry.users += 1
        try:
            async with entry.semaphore:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:  # dropped only when idle, so memory follows activity
                del self._mailbox_slots[key]

    async def _call(
        self,
        provider: Provider,
        mailbox: str,
        operation: str,
        coro_fn: Callable[[], Awaitable[T]],
    ) -> T:
        kind = provider.kind
        started = time.monotonic()
        outcome = "error"
        try:
            async with (
                self._mailbox_slot(provider, mailbox),
                self._slots,
                asyncio.timeout(self.settings.request_timeout_seconds * 2),
            ):
                result = await coro_fn()
            outcome = "ok"
            return result
        except TimeoutError as exc:
            raise ProviderError(
                SERVER_UNREACHABLE, f"{operation} timed out", retriable=True
            ) from exc
        except ProviderError:
            raise
        except OSError as exc:
            # a network error the provider did not translate; anything else is a bug
            # of ours and goes to the item's internal-error path
            raise ProviderError(PROVIDER_ERROR, f"{operation}: {exc}", retriable=True) from exc
        finally:
            self.metrics.requests.labels(kind, operation, outcome).inc()
            self.metrics.request_seconds.labels(kind, operation).observe(
                time.monotonic() - started
            )

    async def _execute(
        self, item: store.Claimed, stored: store.StoredConfig, provider: Provider, deadline: float
    ) -> tuple[str, DesiredEvent | None, store.Outcome]:
        config = stored.config
        desired = render(item.absence, config)
        recorded = Recorded(item.event_id, item.mailbox, item.applied_hash)
        if item.intent == "create" and item.event_id is None and item.mailbox:
            recorded = await self._adopt(item, provider, item.mailbox)
        action = plan(desired, recorded, force=item.force)

        async def create(target: DesiredEvent, generation: int) -> str:
            await self._persist(
                deadline, lambda: self._intents.submit((item, target.mailbox, generation))
            )
            tx = transaction_id(item.config_id, item.absence_id, generation)
            event_id = await self._call(
                provider, target.mailbox, "create",
                lambda: provider.create(target, transaction_id=tx),
            )
            return str(event_id)

        # a create retried after an unknown outcome keeps its transaction id
        generation = item.generation - 1 if item.intent == "create" else item.generation
        if isinstance(action, Noop):
            return "noop", desired, _outcome(desired, recorded.event_id, recorded.mailbox)
        if isinstance(action, Create):
            event_id = await create(action.desired, generation + 1)
            return "create", desired, _outcome(desired, event_id, action.desired.mailbox)
        if isinstance(action, Update):
            try:
                target = action.desired
                event_id = await self._call(
                    provider, target.mailbox, "update",
                    lambda: provider.update(target.mailbox, action.event_id, target),
                )
            except EventGone:
                event_id = await create(action.desired, generation + 1)
                return "recreate", desired, _outcome(desired, event_id, action.desired.mailbox)
            return "update", desired, _outcome(desired, event_id, action.desired.mailbox)
        if isinstance(action, Move):
            await self._call(
                provider, action.old_mailbox, "delete",
                lambda: provider.delete(action.old_mailbox, action.old_event_id),
            )
            await self._persist(deadline, lambda: store.forget_event(self.pool, item))
            event_id = await create(action.desired, generation + 1)
            return "move", desired, _outcome(desired, event_id, action.desired.mailbox)
        assert isinstance(action, Delete)
        existed = await self._call(
            provider, action.mailbox, "delete",
            lambda: provider.delete(action.mailbox, action.event_id),
        )
        return ("delete" if existed else "delete_gone"), None, _outcome(None, None, None)

    async def _adopt(
        self, item: store.Claimed, provider: Provider, mailbox: str
    ) -> Recorded:
        """A create may have landed before a crash: find it by its mark, keep one."""
        from consumer.render import Mark

        mark = Mark(item.config_id, item.absence_id)
        found = await self._call(provider, mailbox, "find", lambda: provider.find(mailbox, mark))
        ids = list(found)
        if not ids:
            return Recorded()
        for extra in ids[1:]:
            await self._call(provider, mailbox, "delete", _bind(provider.delete, mailbox, extra))
        log.info("adopted event written before a crash", config=item.config_id,
                 absence=item.absence_id)
        return Recorded(ids[0], mailbox, None)


def _bind(fn: Callable[[str, str], Awaitable[T]], a: str, b: str) -> Callable[[], Awaitable[T]]:
    return lambda: fn(a, b)


def _outcome(
    desired: DesiredEvent | None, event_id: str | None, mailbox: str | None
) -> store.Outcome:
    if desired is None:
        return store.Outcome("deleted", wanted=False)
    return store.Outcome("synced", True, event_id, mailbox, desired.content_hash())


async def _first(*aws: object) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]  # type: ignore[call-overload]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
