"""The scheduler (docs/guarantees.md): lease due work in batches, keep slots, drain.

`Dispatcher` leases due items from PostgreSQL in batches (`FOR UPDATE SKIP
LOCKED`, so replicas share work without doubles), never more than
`dispatch_concurrency` items in flight, and hands each batch to the
`Executor`, where at most `tenant_concurrency` items of a tenant are at work
at once (one `KeyedLimiter` for tenants, another for mailboxes); tenants at
that limit are not leased more work. A batch's items free their slots as
their outcomes are recorded, so calls that hang hold their own slots only:
another tenant's work, and the Kafka partitions, go on.

While work is in flight a heartbeat renews its leases (and the mailbox
leases) every third of `lease_seconds`, so an operation of several calls (a
move, an adoption) never outlives its lease. Nothing ends the dispatcher
but a stop: a database outage is waited out with a capped back-off
(reported on /readyz). `drain` gives work in flight a bounded time, then
cancels it and hands its leases back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import asyncpg

from consumer import logs, store
from consumer.dispatch.executor import Executor, Job, LeaseClock, RetryPolicy
from consumer.dispatch.limits import KeyedLimiter, MailboxLeases
from consumer.dispatch.providers import ProviderCache, ProviderFactory, Resolved
from consumer.metrics import Metrics
from consumer.outages import INTERNAL, Backoff, Outages, traceback_of
from consumer.providers import build_provider
from consumer.providers.base import ProviderContext
from consumer.secrets import SecretBox
from consumer.settings import Settings

log = logs.get("dispatch")

_Key = tuple[str, str, str]  # (configuration, absence, target)
#: a tenant whose every slot has been taken for this long gets no more work
BUSY_AFTER_SECONDS = 0.25


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
        factory: ProviderFactory = provider_factory or (
            lambda stored: build_provider(stored.config, self.context)
        )
        #: this dispatcher's name on the leases it holds
        self.owner = uuid.uuid4().hex
        self.providers = ProviderCache(pool, self.box, factory)
        #: absences this process recorded (intake fills it): leased without a re-read
        self.recent = store.RecentAbsences()
        self.tenants: KeyedLimiter[str] = KeyedLimiter()  # items of each tenant at work
        self.mailbox_leases = MailboxLeases(pool, self.owner, settings.lease_seconds)
        self.executor = Executor(
            pool, metrics,
            RetryPolicy(settings.retry_base_seconds, settings.retry_max_seconds,
                        settings.retry_for_seconds),
            mailbox_slots=KeyedLimiter(), mailbox_leases=self.mailbox_leases,
            tenant_slots=self.tenants, tenant_limit=settings.tenant_concurrency,
            tenant_wait=max(1.0, settings.dispatch_poll_seconds),
            outages=self.outages, outage_retry_max_seconds=settings.outage_retry_max_seconds,
            defer_seconds=max(0.2, settings.dispatch_poll_seconds),
        )
        self.wake = asyncio.Event()
        self._in_flight: dict[_Key, store.Claimed] = {}  # leased, outcome not recorded yet
        self._working: set[_Key] = set()  # leased, calls not over yet: they take the slots
        self._batches: dict[asyncio.Task[None], list[store.Claimed]] = {}
        self._clocks: dict[asyncio.Task[None], LeaseClock] = {}
        self._last_claim = 0.0

    def notify(self) -> None:
        self.wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self, stop: asyncio.Event) -> None:
        """Lease and start work until `stop` is set; then drain (see `drain`).

        An error while leasing is retried after a capped back-off, never fatal."""
        heartbeat = asyncio.create_task(self._heartbeat(stop), name="dispatch-heartbeat")
        try:
            await self._claim_loop(stop)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    async def _claim_loop(self, stop: asyncio.Event) -> None:
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
        """Lease what is due and start it as one batch; returns how many items."""
        settings = self.settings
        concurrency = settings.dispatch_concurrency
        free = concurrency - len(self._working)
        now = time.monotonic()
        # claim in batches (`_item_done` wakes the loop once half the slots are
        # free), but at least once per poll interval whatever is free, so slow
        # calls holding most slots never starve the rest
        batch_ready = free >= concurrency // 2 or not self._working
        overdue = now - self._last_claim >= settings.dispatch_poll_seconds
        if free <= 0 or not (batch_ready or overdue):
            return 0
        self._last_claim = now
        await self.mailbox_leases.release_idle()
        items = await store.claim(
            self.pool,
            limit=free,
            # tenants whose turns do not come round (slow or stuck calendars); one
            # whose slots turn over quickly keeps getting work
            busy_tenants=self.tenants.saturated(BUSY_AFTER_SECONDS),
            lease_seconds=settings.lease_seconds,
            owner=self.owner,
            recent=self.recent,
        )
        if not items:
            return 0
        # past this, another replica may lease the items: their database steps give up
        clock = LeaseClock(
            asyncio.get_running_loop().time() + settings.lease_seconds
            - settings.request_timeout_seconds
        )
        for item in items:
            key = item.key
            self._in_flight[key] = item
            self._working.add(key)
        task = asyncio.create_task(self._run_batch(items, clock))
        self._batches[task] = items
        self._clocks[task] = clock
        task.add_done_callback(self._batch_done)
        self.metrics.in_flight.set(len(self._working))
        return len(items)

    async def _run_batch(self, items: list[store.Claimed], clock: LeaseClock) -> None:
        jobs: list[Job] = []
        resolved_by_config: dict[str, Resolved] = {}
        for item in items:
            resolved = resolved_by_config.get(item.config_id)
            if resolved is None:
                try:
                    resolved = await self.providers.get(item.config_id, item.config_revision)
                except Exception as exc:  # noqa: BLE001 - the leases hand the items back
                    log.warning("cannot read a configuration; its items are retried when "
                                "their leases expire", config=item.config_id,
                                error_type=type(exc).__name__)
                    resolved = None
                if resolved is None:
                    self._item_done(item)  # the configuration is gone, or unreadable now
                    continue
                resolved_by_config[item.config_id] = resolved
            jobs.append(Job(item, resolved))
        if jobs:
            await self.executor.run(jobs, clock, self._item_done, self._item_free)
        for config_id, resolved in resolved_by_config.items():
            if resolved.provider is not None:
                await self.providers.report_warnings(config_id, resolved.provider)

    def _item_free(self, item: store.Claimed) -> None:
        """Its calls are over: its slot goes to the next batch (the outcome may still
        be on its way to the database)."""
        key = item.key
        if key not in self._working:
            return
        self._working.discard(key)
        # claim in batches: wake the loop once half the slots are free
        if len(self._working) <= self.settings.dispatch_concurrency // 2:
            self.wake.set()

    def _item_done(self, item: store.Claimed) -> None:
        self._item_free(item)
        self._in_flight.pop(item.key, None)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        items = self._batches.pop(task, [])
        self._clocks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("dispatch batch crashed", error_type=type(task.exception()).__name__,
                      traceback=traceback_of(task.exception()))  # type: ignore[arg-type]
        leftover = [i for i in items if i.key in self._in_flight]
        for item in leftover:  # left to their leases (drain hands them back first)
            self._item_done(item)
        self.metrics.in_flight.set(len(self._working))

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        """Renew the leases of the work in flight (items and mailboxes)."""
        interval = self.settings.lease_seconds / 3
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
            if stop.is_set():
                return
            await self.renew()

    async def renew(self) -> None:
        """Extend every lease this dispatcher holds; the batches' clocks move on."""
        items = list(self._in_flight.values())
        clocks = list(self._clocks.values())
        started = asyncio.get_running_loop().time()
        try:
            await store.renew_leases(self.pool, self.owner, items, self.settings.lease_seconds)
            await self.mailbox_leases.renew()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("cannot renew leases; retried at the next heartbeat",
                        error_type=type(exc).__name__)
            return
        deadline = started + self.settings.lease_seconds - self.settings.request_timeout_seconds
        for clock in clocks:
            clock.deadline = max(clock.deadline, deadline)

    async def wait(self) -> None:
        """Until the batches in flight are over (their errors are not raised)."""
        while self._batches:
            await asyncio.gather(*list(self._batches), return_exceptions=True)

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for work in flight, then cancel it and hand it back."""
        if self._batches:
            await asyncio.wait(list(self._batches), timeout=grace)
        leftover = dict(self._batches)
        unfinished = list(self._in_flight.values())
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.gather(*leftover, return_exceptions=True)
        # best effort: if PostgreSQL is away the leases simply expire
        with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError,
                                 asyncpg.InterfaceError):
            await store.release(self.pool, unfinished)
        with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError,
                                 asyncpg.InterfaceError):
            await self.mailbox_leases.release_all()
        await self.providers.close()


async def _first(*aws: object) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]  # type: ignore[call-overload]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
