"""Kafka intake (docs/events.md, docs/guarantees.md): consume, validate,
dead-letter, record, commit.

For each batch: valid events are recorded in one PostgreSQL transaction,
invalid ones go to the dead-letter topic (awaited), and only then are the
offsets committed, so every record is recorded or dead-lettered before its
offset moves. A crash anywhere replays the batch, which the version check
makes harmless. Only this module knows Kafka.

Nothing a record holds stops the partition: a record that breaks the
contract is dead-lettered with its reason; one that PostgreSQL refuses
(the batch is then recorded record by record) with `refused_by_database`;
one on which our own code fails with `internal` and the exception's class.
A dead letter the broker refuses (too large) is sent again truncated.
Outages are waited out with a capped back-off and reported on /readyz:
PostgreSQL while recording, Kafka while dead-lettering.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    TopicAlreadyExistsError,
)

from consumer import logs, store
from consumer.errors import Unreachable
from consumer.events import InvalidEvent, parse_event
from consumer.kafka import broker_unreachable, client_args
from consumer.metrics import Metrics
from consumer.outages import INTERNAL, KAFKA_UNREACHABLE, Backoff, Outages, traceback_of
from consumer.settings import Settings

log = logs.get("intake")
T = TypeVar("T")

INTERNAL_REASON = "internal"
REFUSED_REASON = "refused_by_database"
# what is kept of a dead letter the broker refused as it was
TRUNCATED_VALUE_BYTES = 16 * 1024
TRUNCATED_KEY_BYTES = 1024
KAFKA_PROBE_SECONDS = 2.0
#: how long a poll waits for a partition's position to compute its lag (it is known
#: after a fetch; only a reset in progress makes it wait)
LAG_POSITION_SECONDS = 0.1


async def ensure_topics(settings: Settings, bootstrap: str, *, create: bool = True) -> list[str]:
    """The topic and the dead-letter topic: created when missing if `create` (the
    embedded broker, or ABSENCE_SYNC_CREATE_TOPICS), otherwise only looked up.
    Returns the names still missing (main topic first)."""
    admin = AIOKafkaAdminClient(**client_args(settings, bootstrap))
    try:
        await admin.start()
    except BaseException as exc:  # cancelled too: the connections opened so far are closed
        with contextlib.suppress(KafkaError):
            await admin.close()
        if isinstance(exc, KafkaError):
            raise broker_unreachable(bootstrap, exc) from exc
        raise
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(settings.topic, settings.topic_partitions, 1),
            NewTopic(settings.dlq_topic, 1, 1),
        ]
        missing = [t for t in wanted if t.name not in existing]
        if missing and create:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
            return []
        return [t.name for t in missing]
    finally:
        await admin.close()


class TopicWatch:
    """Against a cluster the worker does not create topics on, checks that they
    exist and says (in the log) which is missing, without stopping the worker.

    A missing event topic is a warning until it appears (the consumer picks it
    up at its next metadata refresh; `/readyz` names it through
    `Intake.kafka_problem`). A missing dead-letter topic is a warning only:
    consumption works without it, and clusters that create topics on first
    use (tansu, many development clusters) create it with the first dead letter.
    `problem` is the event topic's state in `/readyz` words, or None.
    """

    def __init__(self, settings: Settings, bootstrap: str, *, first_delay: float = 1.0,
                 max_delay: float = 30.0, remind_every: float = 300.0) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.remind_every = remind_every
        self.problem: str | None = None
        self._warned: dict[str, float] = {}

    async def check(self) -> list[str]:
        """Look the topics up once; returns the missing ones (a failed look-up: both)."""
        topic, dlq = self.settings.topic, self.settings.dlq_topic
        try:
            missing = await ensure_topics(self.settings, self.bootstrap, create=False)
        except (KafkaError, OSError, Unreachable) as exc:
            # the brokers' outage is reported as such; the topics' state is unknown
            self._warn("lookup", "cannot look up the Kafka topics; retrying",
                       error=type(exc).__name__)
            return [topic, dlq]
        hint = "create it, or set ABSENCE_SYNC_CREATE_TOPICS=true on a development cluster"
        if topic in missing:
            self.problem = f"kafka: topic {topic} does not exist"
            self._warn(topic, "the event topic does not exist; waiting for it",
                       topic=topic, hint=hint)
        else:
            if self.problem is not None and self._warned.get(topic):
                log.info("the event topic exists now", topic=topic)
            self.problem = None
        if dlq in missing:
            self._warn(dlq, "the dead-letter topic does not exist: invalid events need it "
                       "(a cluster that creates topics on first use creates it then)",
                       topic=dlq, hint=hint, remind=False)
        elif self._warned.pop(dlq, None):
            log.info("the dead-letter topic exists now", topic=dlq)
        return missing

    def _warn(self, key: str, message: str, *, remind: bool = True, **fields: Any) -> None:
        now = time.monotonic()
        last = self._warned.get(key)
        if last is None or (remind and now - last >= self.remind_every):
            self._warned[key] = now
            log.warning(message, **fields)

    async def run(self, stop: asyncio.Event) -> None:
        """Check until both topics exist (quickly at first, then every `max_delay`)."""
        delay = self.first_delay
        while not stop.is_set():
            if not await self.check():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, self.max_delay)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Finish the batch in flight (and its commit) before partitions move."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self.intake.batch_lock:
            log.info("partitions revoked", partitions=sorted(str(tp) for tp in revoked))
        self.intake.assigned -= set(revoked)  # not ready while the group rebalances
        for tp in revoked:  # another member reports these partitions now
            for gauge in (self.intake.metrics.lag_records, self.intake.metrics.lag_seconds):
                with contextlib.suppress(KeyError):
                    gauge.remove(tp.topic, str(tp.partition))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.intake.assigned = set(assigned)
        log.info("partitions assigned", partitions=sorted(str(tp) for tp in assigned))


@dataclass(frozen=True, slots=True)
class _Valid:
    tp: TopicPartition
    record: Any
    incoming: store.Incoming


@dataclass(frozen=True, slots=True)
class _Dead:
    tp: TopicPartition
    record: Any
    reason: str
    detail: str
    exception: str | None = None  # the class, for `internal`


class _Stopped(Exception):
    """Stop was asked while an outage was being waited out: the batch is dropped
    uncommitted (the next owner of the partition reads it again)."""


def _kafka_outage(exc: BaseException) -> bool:
    """The broker is out of reach (try again), rather than refusing the record."""
    return isinstance(exc, KafkaConnectionError | KafkaTimeoutError) or bool(
        getattr(exc, "retriable", False)
    )


class Intake:
    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        pool: asyncpg.Pool,
        metrics: Metrics,
        on_recorded: Callable[[], None] = lambda: None,
        outages: Outages | None = None,
        recorded: Callable[[list[store.Incoming]], None] = lambda _: None,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.pool = pool
        self.metrics = metrics
        self.on_recorded = on_recorded
        #: told the absences of each batch once its recording has committed
        self.recorded = recorded
        self.outages = outages or Outages(metrics)
        self.batch_lock = asyncio.Lock()
        self.assigned: set[TopicPartition] = set()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._stop = asyncio.Event()
        self.started = False  # the consumer has joined its group once

    async def start(self) -> None:
        try:
            await self._start()
        except KafkaError as exc:
            await self.stop()
            raise broker_unreachable(self.bootstrap, exc) from exc

    async def _start(self) -> None:
        kafka_args = client_args(self.settings, self.bootstrap)
        self.producer = AIOKafkaProducer(**kafka_args, acks="all", enable_idempotence=False)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(
            **kafka_args,
            group_id=self.settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.settings.batch_size,
            # memory follows these settings, not the backlog
            fetch_max_bytes=self.settings.fetch_max_bytes,
            max_partition_fetch_bytes=min(
                self.settings.fetch_max_bytes, self.settings.max_partition_fetch_bytes
            ),
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
        )
        self.consumer.subscribe([self.settings.topic], listener=_Rebalance(self))
        await self.consumer.start()
        self.started = True

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; the batch in flight is finished and committed.

        Never ends on an error: a fetch error or a batch that fails in our own
        code is retried after a back-off (the batch is read again from its
        first offset, nothing is skipped)."""
        assert self.consumer is not None
        self._stop = stop
        backoff = Backoff(self.settings.outage_retry_max_seconds)
        while not stop.is_set():
            fetch = asyncio.ensure_future(
                self.consumer.getmany(timeout_ms=500, max_records=self.settings.batch_size)
            )
            stopped = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if fetch not in done:
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError, KafkaError):
                    await fetch
                break
            try:
                batches = fetch.result()
            except Exception as exc:  # noqa: BLE001 - waited out; reported on /readyz
                if isinstance(exc, KafkaError):
                    self.outages.failing("intake", "kafka")
                    log.warning(
                        "fetching from Kafka failed; retrying", error_type=type(exc).__name__
                    )
                else:
                    self.metrics.internal_errors.labels("intake").inc()
                    self.outages.failing("intake", INTERNAL)
                    log.error("fetching from Kafka failed; retrying",
                              error_type=type(exc).__name__, traceback=traceback_of(exc))
                await backoff.wait(stop)
                continue
            await self._observe_caught_up(batches)
            if not batches:
                continue
            async with self.batch_lock:
                try:
                    await self.process(batches)
                except _Stopped:
                    break
                except Exception as exc:  # noqa: BLE001 - a bug must not stop the partition
                    self.metrics.internal_errors.labels("intake").inc()
                    self.outages.failing("intake", INTERNAL)
                    log.error(
                        "intake failed on a batch; reading it again",
                        error_type=type(exc).__name__,
                        traceback=traceback_of(exc),
                    )
                    self._rewind(batches)
                    await backoff.wait(stop)
                    continue
            if backoff.attempts:
                backoff.reset()
                self.outages.recovered("intake")

    def _rewind(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """Fetch these records again (their offsets were not committed)."""
        assert self.consumer is not None
        for tp, records in batches.items():
            if records and tp in self.consumer.assignment():
                # a partition revoked meanwhile is read again by its new owner anyway
                with contextlib.suppress(KafkaError):
                    self.consumer.seek(tp, records[0].offset)

    async def process(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """Record or dead-letter every record of `batches`, then commit their offsets."""
        assert self.consumer is not None and self.producer is not None
        started = time.monotonic()
        valid, dead = self._validate(batches)
        applied, stale, refused = await self._record(valid)
        dead.extend(refused)
        if dead:
            sent = await asyncio.gather(
                *(self._dead_letter(d) for d in dead), return_exceptions=True
            )
            for outcome in sent:
                if isinstance(outcome, BaseException):
                    raise outcome
        offsets = {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # partitions moved meanwhile, or the broker is away: the partition's
            # owner re-reads these records, which the version check makes harmless
            log.warning(
                "offset commit failed; records will be re-read", error_type=type(exc).__name__
            )
        self.metrics.events.labels("applied").inc(applied)
        self.metrics.events.labels("stale").inc(stale)
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        self._observe_lag(batches)
        if applied:
            self.on_recorded()
        log.debug("batch recorded", applied=applied, stale=stale, invalid=len(dead))

    def _validate(
        self, batches: dict[TopicPartition, list[Any]]
    ) -> tuple[list[_Valid], list[_Dead]]:
        valid: list[_Valid] = []
        dead: list[_Dead] = []
        for tp, records in batches.items():
            for record in records:
                try:
                    event = parse_event(record.value)
                    incoming = store.Incoming(event.absence, event.data, event.time)
                except InvalidEvent as exc:
                    dead.append(_Dead(tp, record, exc.reason, exc.detail))
                except Exception as exc:  # noqa: BLE001 - one record's bug must not stop the rest
                    dead.append(self._internal(tp, record, exc, "validating"))
                else:
                    valid.append(_Valid(tp, record, incoming))
        return valid, dead

    def _internal(self, tp: TopicPartition, record: Any, exc: Exception, doing: str) -> _Dead:
        """A record on which our own code failed: logged as the bug it is, dead-lettered."""
        self.metrics.internal_errors.labels("intake").inc()
        log.error(
            f"internal error {doing} a record; it is dead-lettered",
            error_type=type(exc).__name__,
            traceback=traceback_of(exc),
            partition=tp.partition,
            offset=record.offset,
        )
        return _Dead(
            tp, record, INTERNAL_REASON, f"absence-sync failed while {doing} it",
            type(exc).__qualname__,
        )

    async def _record(self, valid: list[_Valid]) -> tuple[int, int, list[_Dead]]:
        """Record `valid` in one transaction; if PostgreSQL refuses it, record by record.

        Returns (applied, stale, refused records to dead-letter)."""
        if not valid:
            return 0, 0, []
        incoming = [v.incoming for v in valid]
        try:
            applied, stale = await self._waiting_out_database(lambda: self._record_all(incoming))
        except _Stopped:
            raise
        except Exception as exc:  # noqa: BLE001 - refused: find the record(s) it refuses
            log.warning(
                "PostgreSQL refused a batch; recording it record by record",
                error_type=type(exc).__name__,
                sqlstate=getattr(exc, "sqlstate", None),
            )
            return await self._waiting_out_database(lambda: self._record_each(valid))
        return applied, stale, []

    async def _record_all(self, incoming: list[store.Incoming]) -> tuple[int, int]:
        async with self.pool.acquire() as conn, conn.transaction():
            counts = await store.record_absences(conn, incoming)
        self.recorded(incoming)
        return counts

    async def _record_each(self, valid: list[_Valid]) -> tuple[int, int, list[_Dead]]:
        applied = stale = 0
        refused: list[_Dead] = []
        async with self.pool.acquire() as conn, conn.transaction():
            for item in valid:
                try:
                    async with conn.transaction():  # a savepoint: a refusal undoes this record only
                        one_applied, one_stale = await store.record_absences(conn, [item.incoming])
                except Exception as exc:
                    if store.is_unavailable(exc):
                        raise
                    refused.append(self._refused(item, exc))
                    continue
                applied += one_applied
                stale += one_stale
        return applied, stale, refused

    def _refused(self, item: _Valid, exc: Exception) -> _Dead:
        if isinstance(exc, asyncpg.PostgresError):
            # the server's message may quote the value: only its class and code are kept
            return _Dead(
                item.tp, item.record, REFUSED_REASON,
                f"PostgreSQL refused the record ({type(exc).__name__}, SQLSTATE {exc.sqlstate})",
            )
        return self._internal(item.tp, item.record, exc, "recording")

    async def _waiting_out_database(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, repeated after a capped back-off while PostgreSQL is unavailable."""
        backoff = Backoff(self.settings.outage_retry_max_seconds)
        while True:
            try:
                result = await attempt()
            except Exception as exc:
                if not store.is_unavailable(exc):
                    raise
                self.outages.failing("intake", "postgresql")
                log.warning(
                    "PostgreSQL unavailable; intake retries the batch",
                    error_type=type(exc).__name__,
                )
                await backoff.wait(self._stop)
                if self._stop.is_set():
                    raise _Stopped from exc
                continue
            if backoff.attempts:
                self.outages.recovered("intake", "postgresql")
            return result

    async def _dead_letter(self, dead: _Dead) -> None:
        """Send `dead` to the dead-letter topic, waiting out broker outages; a record
        the broker refuses as it is (too large) goes truncated."""
        assert self.producer is not None
        record = dead.record
        headers = [
            ("absence-sync-reason", dead.reason.encode()),
            ("absence-sync-error", dead.detail[:500].encode("utf-8", "replace")),
            ("absence-sync-original-topic", dead.tp.topic.encode()),
            ("absence-sync-original-partition", str(dead.tp.partition).encode()),
            ("absence-sync-original-offset", str(record.offset).encode()),
        ]
        if dead.exception is not None:
            headers.append(("absence-sync-exception", dead.exception.encode()))
        value: bytes | None = record.value
        key: bytes | None = record.key
        truncated = False
        backoff = Backoff(self.settings.outage_retry_max_seconds)
        while True:
            try:
                await self.producer.send_and_wait(
                    self.settings.dlq_topic, value=value, key=key, headers=headers
                )
                break
            except Exception as exc:
                if not truncated and not _kafka_outage(exc):
                    truncated = True
                    size = len(value) if value is not None else 0
                    value = value[:TRUNCATED_VALUE_BYTES] if value is not None else None
                    key = key[:TRUNCATED_KEY_BYTES] if key is not None else None
                    headers.append(("absence-sync-truncated", str(size).encode()))
                    log.warning(
                        "Kafka refused a dead letter; sending it truncated",
                        error_type=type(exc).__name__,
                        partition=dead.tp.partition,
                        offset=record.offset,
                        size=size,
                    )
                    continue
                self.outages.failing("intake", "kafka")
                log.warning(
                    "dead-letter topic unavailable; retrying",
                    error_type=type(exc).__name__,
                    partition=dead.tp.partition,
                    offset=record.offset,
                )
                await backoff.wait(self._stop)
                if self._stop.is_set():
                    raise _Stopped from exc
        if backoff.attempts:
            self.outages.recovered("intake", "kafka")
        self.metrics.events.labels("invalid").inc()
        self.metrics.dead_letters.labels(dead.reason).inc()
        log.warning(
            "event dead-lettered",
            reason=dead.reason,
            detail=dead.detail[:200],
            partition=dead.tp.partition,
            offset=record.offset,
        )

    async def kafka_problem(self) -> str | None:
        """For /readyz: why this worker cannot consume, in fixed words, or None."""
        if self.consumer is None or not self.started:
            return "kafka: joining the consumer group"
        try:
            async with asyncio.timeout(KAFKA_PROBE_SECONDS):
                topics = await self.consumer.topics()
        except (KafkaError, TimeoutError, OSError):
            return KAFKA_UNREACHABLE
        if self.settings.topic not in topics:
            return f"kafka: topic {self.settings.topic} does not exist"
        if not self.assigned:
            return "kafka: no partition assigned yet"
        return None

    async def _observe_caught_up(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """On every poll, the lag of the assigned partitions this poll brought no record
        of (`_observe_lag` does the others once their batch is recorded): records
        behind the high watermark of the latest fetch response (never the end
        offsets, which tansu reports too low), and 0 seconds once the position is at
        or past it, so an idle worker never shows a stale lag."""
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            if batches.get(tp):
                continue
            high = self.consumer.highwater(tp)
            if high is None:
                continue  # no fetch answered for it yet
            try:
                async with asyncio.timeout(LAG_POSITION_SECONDS):
                    position = await self.consumer.position(tp)
            except (KafkaError, TimeoutError):
                continue  # revoked, or its position is being reset: the next poll
            labels = (tp.topic, str(tp.partition))
            behind = max(0, high - position)
            self.metrics.lag_records.labels(*labels).set(behind)
            if behind == 0:
                self.metrics.lag_seconds.labels(*labels).set(0.0)

    def _observe_lag(self, batches: dict[TopicPartition, list[Any]]) -> None:
        assert self.consumer is not None
        now_ms = time.time() * 1000
        for tp, records in batches.items():
            if not records:
                continue
            high = self.consumer.highwater(tp)
            labels = (tp.topic, str(tp.partition))
            if high is not None:
                self.metrics.lag_records.labels(*labels).set(max(0, high - records[-1].offset - 1))
            if records[-1].timestamp:
                self.metrics.lag_seconds.labels(*labels).set(
                    max(0.0, (now_ms - records[-1].timestamp) / 1000)
                )

    async def stop(self) -> None:
        """Close the producer (no batch is in flight any more), then leave the group
        and close the consumer. The producer is closed first because leaving the
        group may be cut short by the shutdown budget."""
        try:
            if self.producer is not None:
                with contextlib.suppress(KafkaError):
                    await self.producer.stop()
        finally:
            if self.consumer is not None:
                try:
                    with contextlib.suppress(KafkaError):
                        await self.consumer.stop()
                except asyncio.CancelledError:
                    # the shutdown budget ran out while leaving the group: close the
                    # connections anyway (the broker ends the membership after its
                    # session timeout); aiokafka offers no public call for this
                    with contextlib.suppress(Exception):
                        await self.consumer._client.close()
                    raise
