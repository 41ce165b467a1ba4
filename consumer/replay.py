"""Reading the absence topic once, for a resync (README "Resync and replay").

`TopicReader` reads every partition from the beginning, or from the offsets
for a time, up to the end offsets taken when it starts: records appended
meanwhile are the live workers' business. It is the only other module that
knows Kafka, beside `intake`, and it never joins the live group:

- a real resync reads in its own temporary consumer group (a unique name);
  it assigns the partitions itself (no group join, no rebalance) and commits
  the offsets it has recorded, so the standard tools show its progress; the
  group is deleted when the reader closes;
- a dry run reads without any group: nothing is committed, nothing is left.

Broker quirks handled here, seen with tansu 0.6 (the embedded broker):
ListOffsets(latest) answers the last batch's base offset + 1, short of the
real end when that batch holds several records, so the end taken at start is
the larger of it and the high watermark of the first fetch; and
ListOffsets(timestamp) answers offset 0, so records older than `from_time`
before the first one at or after it are skipped here too, which is exactly
Kafka's `offsets_for_times` rule on a broker that gets it right.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DeleteGroupsRequest

from consumer import logs
from consumer.kafka import client_args
from consumer.settings import Settings

log = logs.get("replay")

# DeleteGroups error codes that leave no group behind
_GONE = {0, 69}  # none, GROUP_ID_NOT_FOUND


class ReplayError(Exception):
    """The topic cannot be read as asked (e.g. it does not exist)."""


@dataclass(slots=True)
class Batch:
    """Records to apply, and the offsets to commit once they are recorded."""

    records: list[Any]
    offsets: dict[TopicPartition, int]


@dataclass(slots=True)
class _Partition:
    start: int
    listed_end: int
    end: int | None = None  # final once the first fetch reported a high watermark
    reached_time: bool = True
    done: bool = False
    skipped: int = 0


_START_GRACE_SECONDS = 5.0


@dataclass
class TopicReader:
    settings: Settings
    bootstrap: str
    group_id: str | None = None
    from_time: dt.datetime | None = None
    read: int = 0
    _consumer: AIOKafkaConsumer | None = None
    _parts: dict[TopicPartition, _Partition] = field(default_factory=dict)
    _committed: bool = False

    async def __aenter__(self) -> Self:
        settings = self.settings
        self._consumer = AIOKafkaConsumer(
            **client_args(settings, self.bootstrap),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.batch_size,
            fetch_max_bytes=settings.fetch_max_bytes,
            max_partition_fetch_bytes=min(
                settings.fetch_max_bytes, settings.max_partition_fetch_bytes
            ),
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
        )
        starting = asyncio.ensure_future(self._consumer.start())
        try:
            await asyncio.shield(starting)
            await self._assign()
        except BaseException:  # cancelled too: no connection is left open
            if not starting.done():
                # aiokafka loses track of its bootstrap connection when its start is
                # cancelled midway: let the start finish (briefly), then close
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(starting), _START_GRACE_SECONDS)
                starting.cancel()
            await self._close_consumer()
            raise
        return self

    async def _assign(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        topic = self.settings.topic
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer.topics()  # refreshes the metadata
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise ReplayError(f"topic {topic!r} does not exist")
        tps = sorted((TopicPartition(topic, p) for p in partitions), key=lambda tp: tp.partition)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        if self.from_time is not None:
            stamp = int(self.from_time.timestamp() * 1000)
            found = await consumer.offsets_for_times({tp: stamp for tp in tps})
            for tp in tps:
                hit = found.get(tp)
                starts[tp] = max(starts[tp], hit.offset) if hit is not None else ends[tp]
        # assigned only now, so no fetch starts anywhere but at these offsets
        consumer.assign(tps)
        for tp in tps:
            self._parts[tp] = _Partition(
                start=starts[tp], listed_end=ends[tp], reached_time=self.from_time is None
            )
            consumer.seek(tp, starts[tp])

    @property
    def total(self) -> int:
        """Records to read in all: exact once every partition has been fetched
        (compacted-away offsets are discovered as reading goes)."""
        count = 0
        for part in self._parts.values():
            end = part.end if part.end is not None else part.listed_end
            count += max(0, end - part.start) - part.skipped
        return max(count, self.read)

    @property
    def finished(self) -> bool:
        return all(p.done for p in self._parts.values())

    async def batches(self) -> AsyncIterator[Batch]:
        """Batches until every partition reached its end; an empty batch now
        and then while waiting on the broker."""
        consumer = self._consumer
        assert consumer is not None
        stamp = int(self.from_time.timestamp() * 1000) if self.from_time is not None else 0
        while not self.finished:
            fetched = await consumer.getmany(
                timeout_ms=500, max_records=self.settings.batch_size
            )
            records: list[Any] = []
            offsets: dict[TopicPartition, int] = {}
            for tp, part in self._parts.items():
                if part.done:
                    continue
                if part.end is None:
                    high = consumer.highwater(tp)
                    if high is None:
                        continue
                    part.end = max(part.listed_end, high)
                for record in fetched.get(tp, []):
                    if record.offset >= part.end:
                        break
                    if not part.reached_time:
                        if record.timestamp < stamp:
                            part.skipped += 1
                            continue
                        part.reached_time = True
                    records.append(record)
                position = await consumer.position(tp)
                if fetched.get(tp):
                    offsets[tp] = min(position, part.end)
                if position >= part.end:
                    part.done = True
                    consumer.pause(tp)
            self.read += len(records)
            yield Batch(records, offsets)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit recorded offsets in the temporary group (progress for the
        standard tools); a failure is logged, the resync goes on."""
        if self.group_id is None or not offsets or self._consumer is None:
            return
        try:
            await self._consumer.commit(offsets)
            self._committed = True
        except KafkaError as exc:
            log.warning("resync offset commit failed", group=self.group_id, error=str(exc))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close_consumer()
        if self.group_id is not None:
            await delete_group(self.settings, self.bootstrap, self.group_id)

    async def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            with contextlib.suppress(KafkaError):
                await consumer.stop()
        except asyncio.CancelledError:
            # cancelled while leaving the group: close the connections anyway
            # (aiokafka offers no public call for this)
            with contextlib.suppress(Exception):
                await consumer._client.close()
            raise


async def delete_group(settings: Settings, bootstrap: str, group_id: str) -> bool:
    """Delete a consumer group (DeleteGroups, Kafka 1.1+, supported by tansu);
    True when no such group is left. aiokafka's admin client has no method for
    it, so the request goes through its client."""
    admin = AIOKafkaAdminClient(**client_args(settings, bootstrap))
    try:
        await admin.start()
        node = await admin.find_coordinator(group_id)
        response = await admin._client.send(node, DeleteGroupsRequest([group_id]))
    except KafkaError as exc:
        log.warning(
            "could not delete the temporary consumer group; delete it with the Kafka tools",
            group=group_id, error=str(exc),
        )
        return False
    finally:
        with contextlib.suppress(KafkaError):
            await admin.close()
    codes = [code for _, code in response.results]
    if all(code in _GONE for code in codes):
        return True
    log.warning(
        "could not delete the temporary consumer group; delete it with the Kafka tools",
        group=group_id, error_codes=codes,
    )
    return False
