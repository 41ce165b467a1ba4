"""Kafka intake (SPEC sections 3 and 7): consume, validate, dead-letter, record, commit.

For each batch: invalid events go to the dead-letter topic (awaited), valid
ones are recorded in one PostgreSQL transaction, and only then are the
offsets committed. A crash anywhere replays the batch, which the version
check makes harmless. Only this module knows Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from consumer import logs, store
from consumer.errors import Unreachable
from consumer.events import InvalidEvent, parse_event
from consumer.kafka import broker_unreachable, client_args
from consumer.metrics import Metrics
from consumer.settings import Settings

log = logs.get("intake")


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
    exist and says which is missing, without stopping the worker.

    A missing event topic is a warning and a `/readyz` reason until it
    appears (the consumer picks it up at its next metadata refresh). A missing
    dead-letter topic is a warning only: consumption works without it, and
    clusters that create topics on first use (tansu, many development
    clusters) create it with the first dead letter.
    """

    def __init__(self, settings: Settings, bootstrap: str, *, first_delay: float = 1.0,
                 max_delay: float = 30.0, remind_every: float = 300.0) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.remind_every = remind_every
        self.problem: str | None = "kafka: topics not checked yet"
        self._warned: dict[str, float] = {}

    async def readiness(self) -> str | None:
        """The `/readyz` reason, or None."""
        return self.problem

    async def check(self) -> list[str]:
        """Look the topics up once; returns the missing ones (a failed look-up: both)."""
        topic, dlq = self.settings.topic, self.settings.dlq_topic
        try:
            missing = await ensure_topics(self.settings, self.bootstrap, create=False)
        except (KafkaError, OSError, Unreachable) as exc:
            self.problem = f"kafka: cannot look up the topics ({type(exc).__name__})"
            self._warn("lookup", "cannot look up the Kafka topics; retrying",
                       error=type(exc).__name__)
            return [topic, dlq]
        hint = "create it, or set ABSENCE_SYNC_CREATE_TOPICS=true on a development cluster"
        if topic in missing:
            self.problem = f"kafka: topic {topic!r} does not exist: {hint}"
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
        for tp in revoked:  # another member reports these partitions now
            for gauge in (self.intake.metrics.lag_records, self.intake.metrics.lag_seconds):
                with contextlib.suppress(KeyError):
                    gauge.remove(tp.topic, str(tp.partition))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.intake.assigned = set(assigned)
        log.info("partitions assigned", partitions=sorted(str(tp) for tp in assigned))


class Intake:
    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        pool: asyncpg.Pool,
        metrics: Metrics,
        on_recorded: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.pool = pool
        self.metrics = metrics
        self.on_recorded = on_recorded
        self.batch_lock = asyncio.Lock()
        self.assigned: set[TopicPartition] = set()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None

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

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; the batch in flight is finished and committed."""
        assert self.consumer is not None
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
            batches = fetch.result()
            if batches:
                async with self.batch_lock:
                    await self.process(batches)

    async def process(self, batches: dict[TopicPartition, list[Any]]) -> None:
        assert self.consumer is not None and self.producer is not None
        started = time.monotonic()
        incoming: list[store.Incoming] = []
        dead: list[Any] = []
        for tp, records in batches.items():
            for record in records:
                try:
                    event = parse_event(record.value)
                except InvalidEvent as exc:
                    dead.append(self._dead_letter(tp, record, exc))
                    continue
                incoming.append(store.Incoming(event.absence, event.data, event.time))
        if dead:
            await asyncio.gather(*dead)
        async with self.pool.acquire() as conn, conn.transaction():
            applied, stale = await store.record_absences(conn, incoming)
        offsets = {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # partitions moved meanwhile: the new owner re-reads these records,
            # which the version check makes harmless
            log.warning("offset commit failed; records will be re-read", error=str(exc))
        self.metrics.events.labels("applied").inc(applied)
        self.metrics.events.labels("stale").inc(stale)
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        self._observe_lag(batches)
        if applied:
            self.on_recorded()
        log.debug("batch recorded", applied=applied, stale=stale, invalid=len(dead))

    async def _dead_letter(self, tp: TopicPartition, record: Any, exc: InvalidEvent) -> None:
        assert self.producer is not None
        headers = [
            ("absence-sync-reason", exc.reason.encode()),
            ("absence-sync-error", exc.detail[:500].encode("utf-8", "replace")),
            ("absence-sync-original-topic", tp.topic.encode()),
            ("absence-sync-original-partition", str(tp.partition).encode()),
            ("absence-sync-original-offset", str(record.offset).encode()),
        ]
        await self.producer.send_and_wait(
            self.settings.dlq_topic, value=record.value, key=record.key, headers=headers
        )
        self.metrics.events.labels("invalid").inc()
        self.metrics.dead_letters.labels(exc.reason).inc()
        log.warning(
            "event dead-lettered",
            reason=exc.reason,
            detail=exc.detail[:200],
            partition=tp.partition,
            offset=record.offset,
        )

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
