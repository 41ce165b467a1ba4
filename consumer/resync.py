"""Batch resync and replay (README "Resync and replay").

"Synchronize absences from this date": re-read the topic beside the live
workers, apply what is read through the same idempotent path as intake, then
mark the (configuration, absence) pairs the filters select for a write. The
dispatchers (the live workers, or one run here with `wait`) do the writes:
an unchanged event costs no calendar request unless `force` asks for one.

Steps, for a request:
1. resolve the configurations (a tenant's, or the given ids); a real run
   records a job and holds its configurations (at most one running resync
   per configuration, enforced by the database);
2. read the topic (`replay.TopicReader`: a temporary consumer group, from the
   beginning or `from_time`, up to the end offsets taken at start); records
   of the configurations' tenants go through `parse_event` and
   `store.record_absences`, so stale versions change nothing and invalid
   records are only counted (the live intake dead-letters them);
3. scan the recorded absences the filters select (with `from_time`, only
   those read in step 2) and count the pairs whose latest version the
   configuration wants (`render.wanted`): `in_scope`, the "initialize N
   events" figure; a real run marks exactly those;
4. with `wait`, stay until every marked pair is done, and tell written,
   unchanged and failed apart (each pair remembers the job that marked it).

A dry run changes nothing anywhere: it reads without a consumer group, keeps
the versions it read that are newer than the recorded ones in memory (the
live workers keep that set small), and only counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

import asyncpg

from consumer import logs, store
from consumer.config import SyncConfig
from consumer.dispatch import Dispatcher, ProviderFactory
from consumer.events import (
    MAX_EVENT_BYTES,
    Absence,
    InvalidEvent,
    absence_from_data,
    parse_event,
)
from consumer.metrics import Metrics
from consumer.providers.base import ProviderContext, make_ssl_context
from consumer.render import wanted
from consumer.replay import ReplayError, TopicReader
from consumer.secrets import SecretBox
from consumer.settings import Settings

log = logs.get("resync")

#: how long a job's row stays held without a heartbeat from its process
JOB_LEASE_SECONDS = 30.0
_WAIT_POLL_SECONDS = 0.2
_DB_RETRIES = 3
_PARSE_SLICE = 100
T = TypeVar("T")

Phase = Literal["starting", "reading", "selecting", "writing", "done"]


class ResyncError(Exception):
    """A resync that cannot run as asked (no tenant nor configuration, an
    unknown configuration, a missing topic...); the message says why and is
    fit to show to whoever asked."""


class UnknownConfiguration(ResyncError):
    """A configuration id that does not exist (for the request's tenant, when
    it names one), or a tenant without configurations: a 404 for the API."""


class ResyncConflict(ResyncError):
    """A configuration already has a running resync."""

    def __init__(self, config_id: str, job_id: str) -> None:
        super().__init__(
            f"configuration {config_id!r} already has a running resync (job {job_id}); "
            "wait for it to finish"
        )
        self.config_id = config_id
        self.job_id = job_id


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    """What to resync. `tenant` or `config_ids` is required.

    - `config_ids`: these configurations (all of `tenant`'s when empty); with
      `tenant` too, each must be that tenant's.
    - `since`: only absences whose end date is on or after this date.
    - `establishments`: only absences of these establishments (empty: all).
    - `from_time`: read from the offsets for this (aware) time instead of the
      beginning; only the absences read (a record at or after that time) are
      then in scope, at their latest recorded version.
    - `dry_run`: count only; nothing anywhere changes.
    - `force`: write even when the recorded content hash says unchanged (an
      update whose event is gone re-creates it).
    - `wait`: return once every marked pair is synced or failed.
    - `dispatch`: while waiting, run a dispatcher in this process (needed when
      no worker runs; it shares the work with running workers through the
      usual leases). False only makes sense inside a worker process.
    """

    tenant: str | None = None
    config_ids: tuple[str, ...] = ()
    establishments: tuple[str, ...] = ()
    since: dt.date | None = None
    from_time: dt.datetime | None = None
    dry_run: bool = False
    force: bool = False
    wait: bool = False
    dispatch: bool = True

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, as stored in the job row."""
        return {
            "tenant": self.tenant,
            "config_ids": list(self.config_ids),
            "establishments": list(self.establishments),
            "since": self.since.isoformat() if self.since else None,
            "from_time": self.from_time.isoformat() if self.from_time else None,
            "dry_run": self.dry_run,
            "force": self.force,
            "wait": self.wait,
        }


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot while a resync runs. `total` is the records to read (it may
    grow a little once every partition was fetched, and shrinks to `read` at
    the end on a compacted topic); `written + unchanged + failed` of `marked`
    are done once `phase` is "writing"."""

    phase: Phase
    read: int = 0
    total: int = 0
    in_scope: int = 0
    marked: int = 0
    written: int = 0
    unchanged: int = 0
    failed: int = 0
    invalid: int = 0


@dataclass(frozen=True, slots=True)
class Summary:
    """The outcome of a resync.

    `read` records were read. Of those of the run's tenants, `applied` were
    newer than the recorded version (recorded; in a dry run, would be),
    `stale` changed nothing and `invalid` break the event contract (counted
    only: the live intake dead-letters them), as do records whose tenant
    cannot be read at all; other tenants' records are only read. `in_scope` pairs
    match the filters and are wanted; a real run `marked` them all (fewer
    only when a configuration was deleted meanwhile). `written`, `unchanged`
    and `failed` are those of the marked pairs, known only with `wait` (else
    0). `job_id` is None for a dry run.
    """

    read: int
    in_scope: int
    marked: int
    written: int
    unchanged: int
    failed: int
    dry_run: bool
    invalid: int = 0
    applied: int = 0
    stale: int = 0
    job_id: str | None = None

    def counts(self) -> dict[str, int | bool]:
        """The public summary: read, in_scope, marked, written, unchanged,
        failed, dry_run (the `--json` line)."""
        return {
            "read": self.read,
            "in_scope": self.in_scope,
            "marked": self.marked,
            "written": self.written,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "dry_run": self.dry_run,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Job = store.ResyncJob
ProgressCallback = Callable[[Progress], None]


# --- the library functions --------------------------------------------------


async def resync(
    pool: asyncpg.Pool,
    settings: Settings,
    bootstrap: str,
    request: ResyncRequest,
    *,
    on_progress: ProgressCallback | None = None,
    provider_factory: ProviderFactory | None = None,
    lease_seconds: float = JOB_LEASE_SECONDS,
) -> Summary:
    """Run a resync to its end and return its summary.

    A real run records a job (readable with `get_job` while it runs) and
    raises `ResyncConflict` at once when one of its configurations has a
    running resync; a dry run records nothing. `on_progress` is called (on
    the event loop, so keep it quick) after every batch read, every chunk
    marked and every poll while waiting. Raises `ResyncError` for a request
    that cannot run; Kafka and PostgreSQL errors propagate (the job is then
    recorded as failed). Cancelling it records the job as failed and frees
    its configurations; pairs already marked are still written by the
    workers.

    `provider_factory` replaces the providers of the dispatcher run with
    `wait` (tests); `lease_seconds` is how long the job blocks its
    configurations after this process stops without closing it. `pool` needs
    at least two connections (one holds the scan's snapshot while another
    marks).
    """
    scope = await _resolve(pool, request)
    job_id = None if request.dry_run else await _begin(pool, request, scope, lease_seconds)
    run = _Run(
        pool, settings, bootstrap, request, scope, job_id,
        on_progress=on_progress, provider_factory=provider_factory, lease_seconds=lease_seconds,
    )
    return await run.execute()


_running: dict[str, asyncio.Task[Summary]] = {}


async def start_job(
    pool: asyncpg.Pool,
    settings: Settings,
    bootstrap: str,
    request: ResyncRequest,
    *,
    provider_factory: ProviderFactory | None = None,
    lease_seconds: float = JOB_LEASE_SECONDS,
) -> str:
    """Start a real resync as a background task of this process; returns its
    job id as soon as the job is recorded.

    Raises, before anything runs: `ResyncError` for a request that cannot
    run, including a dry run (answer those with `resync(..., dry_run=True)`,
    which touches nothing), and `ResyncConflict` when one of the
    configurations has a running resync. Afterwards the job's progress,
    state and summary are read with `get_job`. `pool` must stay open while
    the job runs; call `cancel_jobs` before closing it.
    """
    if request.dry_run:
        raise ResyncError("a dry run is not a job: call resync() with dry_run=True")
    scope = await _resolve(pool, request)
    job_id = await _begin(pool, request, scope, lease_seconds)
    run = _Run(
        pool, settings, bootstrap, request, scope, job_id,
        provider_factory=provider_factory, lease_seconds=lease_seconds,
    )
    task = asyncio.create_task(run.execute(), name=f"resync-{job_id}")
    _running[job_id] = task
    task.add_done_callback(lambda t: _job_done(job_id, t))
    return job_id


def _job_done(job_id: str, task: asyncio.Task[Summary]) -> None:
    _running.pop(job_id, None)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("resync job failed", job=job_id, error=str(exc)[:300])


async def get_job(pool: asyncpg.Pool, job_id: str, tenant: str) -> Job | None:
    """The job with this id if it is `tenant`'s, else None (another tenant's
    job is indistinguishable from an unknown id). A job spanning several
    tenants (possible from the command line) is nobody's.

    `state` is running, succeeded (ran to its end, possibly with failed
    writes: see `failed`) or failed (`error` says why; a job whose process
    died is reported failed once its lease ran out). Counters move while it
    runs; `summary` is `Summary.as_dict()` once it succeeded."""
    return await store.get_resync_job(pool, job_id, tenant)


async def cancel_job(job_id: str) -> bool:
    """Cancel a job running in this process; False when it runs elsewhere or
    not at all. The job is recorded as failed; marked pairs are still written."""
    task = _running.get(job_id)
    if task is None:
        return False
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return True


async def cancel_jobs() -> None:
    """Cancel every job running in this process (graceful shutdown)."""
    for job_id in list(_running):
        await cancel_job(job_id)


# --- resolving a request ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Scope:
    configs: tuple[SyncConfig, ...]
    by_tenant: dict[str, tuple[SyncConfig, ...]]

    @property
    def tenant(self) -> str | None:
        """The tenant, when the run has exactly one."""
        return next(iter(self.by_tenant)) if len(self.by_tenant) == 1 else None


async def _resolve(pool: asyncpg.Pool, request: ResyncRequest) -> _Scope:
    if not request.tenant and not request.config_ids:
        raise ResyncError(
            "a resync needs a tenant or at least one configuration id "
            "(so that nobody resyncs every tenant by accident)"
        )
    if request.from_time is not None and request.from_time.utcoffset() is None:
        raise ResyncError("from_time must carry a UTC offset")
    if any(not e for e in request.establishments):
        raise ResyncError("an establishment id cannot be empty")
    configs: list[SyncConfig] = []
    if request.config_ids:
        for config_id in dict.fromkeys(request.config_ids):
            stored = await store.get_config(pool, config_id)
            if stored is None or (request.tenant and stored.config.tenant != request.tenant):
                where = f" for tenant {request.tenant!r}" if request.tenant else ""
                raise UnknownConfiguration(f"no configuration with id {config_id!r}{where}")
            configs.append(stored.config)
    else:
        configs = [
            s.config for s in await store.list_configs(pool) if s.config.tenant == request.tenant
        ]
        if not configs:
            raise UnknownConfiguration(f"tenant {request.tenant!r} has no sync configuration")
    by_tenant: dict[str, list[SyncConfig]] = {}
    for config in configs:
        by_tenant.setdefault(config.tenant, []).append(config)
    return _Scope(tuple(configs), {t: tuple(c) for t, c in by_tenant.items()})


async def _begin(
    pool: asyncpg.Pool, request: ResyncRequest, scope: _Scope, lease_seconds: float
) -> str:
    job_id = uuid.uuid4().hex
    busy = await store.begin_resync_job(
        pool, job_id=job_id, tenant=scope.tenant, config_ids=[c.id for c in scope.configs],
        request=request.as_dict(), lease_seconds=lease_seconds,
    )
    if busy is not None:
        raise ResyncConflict(*busy)
    return job_id


# --- running one ------------------------------------------------------------


@dataclass
class _Run:
    pool: asyncpg.Pool
    settings: Settings
    bootstrap: str
    request: ResyncRequest
    scope: _Scope
    job_id: str | None
    on_progress: ProgressCallback | None = None
    provider_factory: ProviderFactory | None = None
    lease_seconds: float = JOB_LEASE_SECONDS
    phase: Phase = "starting"
    read: int = 0
    total: int = 0
    invalid: int = 0
    applied: int = 0
    stale: int = 0
    in_scope: int = 0
    marked: int = 0
    written: int = 0
    unchanged: int = 0
    failed: int = 0
    lost: bool = False
    # dry run: versions read that are newer than the recorded ones
    overlay: dict[tuple[str, str], Absence] = field(default_factory=dict)
    # with from_time: the (tenant, absence id) of every usable record read, the
    # only absences then in scope; None: every recorded absence is
    read_keys: set[tuple[str, str]] | None = None

    def __post_init__(self) -> None:
        if self.request.from_time is not None:
            self.read_keys = set()

    async def execute(self) -> Summary:
        log.info(
            "resync started", job=self.job_id, tenant=self.scope.tenant,
            configs=[c.id for c in self.scope.configs], dry_run=self.request.dry_run,
        )
        heartbeat = (
            asyncio.create_task(self._heartbeat(), name="resync-heartbeat")
            if self.job_id is not None else None
        )
        try:
            await self._read()
            await self._scan()
            if self.request.wait and not self.request.dry_run:
                await self._wait()
            summary = self._summary()
        except BaseException as exc:
            await self._close(None, _describe(exc))
            raise
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
        self.phase = "done"
        self._report()
        await self._close(summary, None)
        log.info("resync finished", job=self.job_id, **summary.counts())
        return summary

    # reading

    async def _read(self) -> None:
        self.phase = "reading"
        self._report()
        group = (
            None if self.job_id is None else f"{self.settings.group_id}.resync.{self.job_id}"
        )
        try:
            async with TopicReader(
                self.settings, self.bootstrap, group_id=group, from_time=self.request.from_time
            ) as reader:
                async for batch in reader.batches():
                    self._check_lease()
                    incoming = await self._parse(batch.records)
                    if self.read_keys is not None:
                        self.read_keys.update((i.absence.tenant, i.absence.id) for i in incoming)
                    if incoming:
                        if self.request.dry_run:
                            await self._overlay(incoming)
                        else:
                            applied, stale = await _retrying(self._record, incoming)
                            self.applied += applied
                            self.stale += stale
                    await reader.commit(batch.offsets)
                    self.read, self.total = reader.read, reader.total
                    self._report()
                self.total = self.read
        except ReplayError as exc:
            raise ResyncError(str(exc)) from exc

    async def _parse(self, records: Sequence[Any]) -> list[store.Incoming]:
        """The records of this run's tenants, validated as intake does. Other
        tenants' records are passed over after a cheap look at their tenant
        (full validation costs ten times more), so `invalid` counts the
        unusable records of these tenants and those with no readable tenant.
        Yields to the event loop now and then: a job may share its process
        with a worker."""
        incoming: list[store.Incoming] = []
        for index, record in enumerate(records):
            if index % _PARSE_SLICE == _PARSE_SLICE - 1:
                await asyncio.sleep(0)
            tenant = _tenant_of(record.value)
            if tenant is not None and tenant not in self.scope.by_tenant:
                continue
            try:
                event = parse_event(record.value)
            except InvalidEvent:
                self.invalid += 1
                continue
            if event.absence.tenant in self.scope.by_tenant:
                incoming.append(store.Incoming(event.absence, event.data, event.time))
        return incoming

    async def _record(self, incoming: list[store.Incoming]) -> tuple[int, int]:
        async with self.pool.acquire() as conn, conn.transaction():
            return await store.record_replayed(conn, incoming)

    async def _overlay(self, incoming: list[store.Incoming]) -> None:
        keys = list(dict.fromkeys((i.absence.tenant, i.absence.id) for i in incoming))
        recorded = await store.absence_versions(self.pool, keys)
        for item in incoming:
            key = (item.absence.tenant, item.absence.id)
            floor = recorded.get(key)
            if key in self.overlay:
                floor = self.overlay[key].version
            if floor is not None and item.absence.version <= floor:
                self.stale += 1
                continue
            self.applied += 1
            self.overlay[key] = item.absence

    # scanning and marking

    async def _scan(self) -> None:
        self.phase = "selecting"
        self._report()
        request = self.request
        pairs: list[tuple[str, str, str]] = []
        read_keys = self.read_keys
        if read_keys is not None and not read_keys:
            return  # nothing was read since from_time: nothing is in scope
        scope = store.resync_scope(
            self.pool,
            tenants=sorted(self.scope.by_tenant),
            since=request.since,
            establishments=request.establishments or None,
        )
        async with contextlib.aclosing(scope) as chunks:
            async for chunk in chunks:
                self._check_lease()
                for row in chunk:
                    if (row.tenant, row.id) in self.overlay:
                        continue  # a newer version was read (dry run)
                    if read_keys is not None and (row.tenant, row.id) not in read_keys:
                        continue  # not read since from_time
                    absence = _absence(row)
                    if absence is not None:
                        self._select(absence, pairs)
                await self._mark(pairs)
                pairs = []
                self._report()
        for absence in self.overlay.values():
            if self._filters_match(absence):
                self._select(absence, pairs)
        await self._mark(pairs)
        self._report()

    def _filters_match(self, absence: Absence) -> bool:
        """The scan's SQL filters, for versions only read (dry run)."""
        request = self.request
        if absence.deleted or absence.end is None or absence.employee is None:
            return False  # never wanted
        if request.since is not None and absence.end.date < request.since:
            return False
        return not (
            request.establishments
            and absence.employee.establishment_id not in request.establishments
        )

    def _select(self, absence: Absence, pairs: list[tuple[str, str, str]]) -> None:
        for config in self.scope.by_tenant.get(absence.tenant, ()):
            if wanted(absence, config):
                self.in_scope += 1
                pairs.append((config.id, absence.tenant, absence.id))

    async def _mark(self, pairs: list[tuple[str, str, str]]) -> None:
        if self.job_id is None or not pairs:
            return
        self.marked += await _retrying(self._mark_now, self.job_id, pairs)

    async def _mark_now(self, job_id: str, pairs: list[tuple[str, str, str]]) -> int:
        return await store.mark_for_resync(self.pool, job_id, pairs, force=self.request.force)

    # waiting for the writes

    async def _wait(self) -> None:
        assert self.job_id is not None
        self.phase = "writing"
        stop = asyncio.Event()
        dispatcher: Dispatcher | None = None
        task: asyncio.Task[None] | None = None
        if self.request.dispatch:
            dispatcher = Dispatcher(
                self.settings, self.pool, Metrics(),
                box=SecretBox(self.settings.secret_keys),
                provider_factory=self.provider_factory,
                context=ProviderContext(self.settings, make_ssl_context(self.settings)),
            )
            task = asyncio.create_task(dispatcher.run(stop), name="resync-dispatch")
        try:
            while True:
                self._check_lease()
                outcomes = await store.resync_outcomes(self.pool, self.job_id)
                self.written = outcomes.written
                self.unchanged = outcomes.unchanged
                self.failed = outcomes.failed
                self._report()
                if outcomes.outstanding == 0:
                    break
                if task is not None and task.done():
                    task.result()  # the dispatcher crashed: say why
                await asyncio.sleep(_WAIT_POLL_SECONDS)
        finally:
            stop.set()
            if task is not None and dispatcher is not None:
                await asyncio.gather(task, return_exceptions=True)
                await dispatcher.drain(self.settings.shutdown_timeout_seconds)

    # reporting

    def _progress(self) -> Progress:
        return Progress(
            phase=self.phase, read=self.read, total=max(self.total, self.read),
            in_scope=self.in_scope, marked=self.marked, written=self.written,
            unchanged=self.unchanged, failed=self.failed, invalid=self.invalid,
        )

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self._progress())

    def _counters(self) -> dict[str, int]:
        return {
            "records_read": self.read, "records_total": max(self.total, self.read),
            "in_scope": self.in_scope, "marked": self.marked, "written": self.written,
            "unchanged": self.unchanged, "failed": self.failed,
        }

    def _summary(self) -> Summary:
        return Summary(
            read=self.read, in_scope=self.in_scope, marked=self.marked, written=self.written,
            unchanged=self.unchanged, failed=self.failed, dry_run=self.request.dry_run,
            invalid=self.invalid, applied=self.applied, stale=self.stale, job_id=self.job_id,
        )

    async def _heartbeat(self) -> None:
        """Progress into the job row, and the lease renewed, a few times a second."""
        assert self.job_id is not None
        interval = min(0.5, self.lease_seconds / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                ours = await store.renew_resync_job(
                    self.pool, self.job_id, phase=self.phase, counters=self._counters(),
                    lease_seconds=self.lease_seconds,
                )
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("resync heartbeat failed", job=self.job_id, error=str(exc))
                continue
            if not ours:
                self.lost = True
                return

    def _check_lease(self) -> None:
        if self.lost:
            raise ResyncError(
                f"job {self.job_id} was closed as abandoned (no heartbeat for "
                f"{self.lease_seconds:g} s) and another resync may have started; stopping"
            )

    async def _close(self, summary: Summary | None, error: str | None) -> None:
        if self.job_id is None:
            return
        try:
            await store.finish_resync_job(
                self.pool, self.job_id, succeeded=summary is not None,
                counters=self._counters(),
                summary=summary.as_dict() if summary is not None else None, error=error,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # the lease runs out and frees the configurations anyway
            log.warning("could not record the end of a resync job", job=self.job_id,
                        error=str(exc))


def _tenant_of(raw: bytes | None) -> str | None:
    """The event's tenant attribute when the record is JSON that has one."""
    if raw is None or len(raw) > MAX_EVENT_BYTES:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    tenant = doc.get("tenant") if isinstance(doc, dict) else None
    return tenant if isinstance(tenant, str) else None


def _absence(row: store.StoredAbsence) -> Absence | None:
    try:
        return absence_from_data(row.tenant, row.deleted, row.data)
    except (InvalidEvent, KeyError, TypeError, ValueError):
        log.warning("recorded absence cannot be read; skipped", tenant=row.tenant,
                    absence=row.id)
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        return "interrupted before it finished"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}"[:1000] if text else type(exc).__name__


async def _retrying(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """A transaction PostgreSQL chose as a deadlock victim is simply run again."""
    for attempt in range(_DB_RETRIES):
        try:
            return await fn(*args)
        except asyncpg.DeadlockDetectedError:
            if attempt == _DB_RETRIES - 1:
                raise
            log.warning("resync transaction was a deadlock victim; retrying")
    raise AssertionError("unreachable")
