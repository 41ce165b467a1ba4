"""Kafka clients: settings shared by every consumer, producer and admin client,
and the operator's read-only views of the brokers (dead letters).

`client_args` turns the ABSENCE_SYNC_KAFKA_* security settings into aiokafka
keyword arguments, so the live intake, a resync, `status` and `dlq show`
reach a secured cluster (TLS, SASL PLAIN or SCRAM) the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from dataclasses import dataclass
from typing import Any

from consumer.errors import Unreachable
from consumer.logs import register_secret_value
from consumer.settings import Settings


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """Verified TLS to the brokers: the system store plus ABSENCE_SYNC_KAFKA_CA_FILE,
    and the client certificate when one is configured."""
    context = ssl.create_default_context()
    if settings.kafka_ca_file is not None:
        context.load_verify_locations(cafile=str(settings.kafka_ca_file))
    if settings.kafka_cert_file is not None and settings.kafka_key_file is not None:
        context.load_cert_chain(str(settings.kafka_cert_file), str(settings.kafka_key_file))
    return context


def sasl_password(settings: Settings) -> str | None:
    if settings.kafka_sasl_password:
        return settings.kafka_sasl_password
    if settings.kafka_sasl_password_file is not None:
        password = settings.kafka_sasl_password_file.read_text(encoding="utf-8").strip()
        return register_secret_value(password)
    return None


#: how often clients refresh cluster metadata: a topic created after the worker
#: started (on a cluster where the worker does not create topics) is consumed
#: within this delay, instead of aiokafka's default five minutes
METADATA_MAX_AGE_MS = 30_000


def broker_unreachable(bootstrap: str, exc: BaseException) -> Unreachable:
    """The operator's wording for a broker that cannot be used."""
    detail = " ".join(str(exc).split())[:300] or type(exc).__name__
    return Unreachable("Kafka", bootstrap, "ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS", detail)


def client_args(settings: Settings, bootstrap: str) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaConsumer, AIOKafkaProducer and AIOKafkaAdminClient."""
    protocol = settings.kafka_security_protocol
    args: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "security_protocol": protocol,
        "metadata_max_age_ms": METADATA_MAX_AGE_MS,
    }
    if protocol in ("SSL", "SASL_SSL"):
        args["ssl_context"] = ssl_context(settings)
    if protocol.startswith("SASL_"):
        args["sasl_mechanism"] = settings.kafka_sasl_mechanism
        args["sasl_plain_username"] = settings.kafka_sasl_username
        args["sasl_plain_password"] = sasl_password(settings)
    return args


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead-letter topic, with the reasons intake attached."""

    partition: int
    offset: int
    timestamp: dt.datetime | None
    key: str | None
    headers: dict[str, str]
    value: bytes | None

    def as_dict(self, value_chars: int = 500) -> dict[str, Any]:
        text = None if self.value is None else self.value[:value_chars].decode("utf-8", "replace")
        return {
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp.isoformat() if self.timestamp else None,
            "key": self.key,
            "reason": self.headers.get("absence-sync-reason"),
            "error": self.headers.get("absence-sync-error"),
            "original_topic": self.headers.get("absence-sync-original-topic"),
            "original_partition": _int(self.headers.get("absence-sync-original-partition")),
            "original_offset": _int(self.headers.get("absence-sync-original-offset")),
            "headers": self.headers,
            "value": text,
            "value_bytes": None if self.value is None else len(self.value),
        }


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


async def read_dead_letters(settings: Settings, bootstrap: str, limit: int) -> list[DeadLetter]:
    """The last `limit` records of the dead-letter topic, oldest first.

    Reads without a consumer group (nothing is committed, nobody's offsets move).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    consumer = AIOKafkaConsumer(**client_args(settings, bootstrap), enable_auto_commit=False,
                                group_id=None)
    try:
        await consumer.start()
        if settings.dlq_topic not in await consumer.topics():  # refreshes the metadata
            return []
        partitions = consumer.partitions_for_topic(settings.dlq_topic) or set()
        tps = [TopicPartition(settings.dlq_topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        found: list[DeadLetter] = []
        for tp in tps:
            # Some brokers (tansu) under-report the end offset after a batch of
            # several records: start early enough, read until a fetch comes back
            # empty, keep the last `limit`.
            consumer.seek(tp, max(starts[tp], ends[tp] - limit))
            while True:
                batch = await consumer.getmany(tp, timeout_ms=500)
                records = batch.get(tp, [])
                found.extend(_dead_letter(r) for r in records)
                if not records and (await consumer.position(tp)) >= max(
                    ends[tp], consumer.highwater(tp) or 0
                ):
                    break
        found.sort(key=lambda d: (d.timestamp or dt.datetime.min.replace(tzinfo=dt.UTC),
                                  d.partition, d.offset))
        return found[-limit:]
    except KafkaError as exc:
        raise broker_unreachable(bootstrap, exc) from exc
    finally:
        with contextlib.suppress(KafkaError):
            await consumer.stop()


def _dead_letter(record: Any) -> DeadLetter:
    headers = {k: bytes(v).decode("utf-8", "replace") for k, v in (record.headers or [])}
    stamp = (dt.datetime.fromtimestamp(record.timestamp / 1000, dt.UTC)
             if record.timestamp and record.timestamp > 0 else None)
    key = bytes(record.key).decode("utf-8", "replace") if record.key is not None else None
    return DeadLetter(record.partition, record.offset, stamp, key, headers, record.value)


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """How far the live group is behind on one partition of the topic."""

    partition: int
    committed: int | None  # None: the group has committed nothing here yet
    start: int  # the first offset still in the log
    end: int  # the offset the next record will get

    @property
    def lag(self) -> int:
        """Records not consumed yet; without a commit the group starts at the beginning."""
        position = self.committed if self.committed is not None else self.start
        return max(0, self.end - max(position, self.start))

    def as_dict(self) -> dict[str, Any]:
        return {"partition": self.partition, "committed": self.committed, "start": self.start,
                "end": self.end, "lag": self.lag}


#: how long `group_lag` reads to learn the true end of each partition
_HIGHWATER_SECONDS = 5.0


async def group_lag(settings: Settings, bootstrap: str) -> list[PartitionLag] | None:
    """The live group's committed offsets against the end of each partition of
    the topic; None when the topic does not exist.

    Reads without joining the group (the admin client fetches its offsets; a
    consumer without a group reads the ends), so the running workers' group is
    neither rebalanced nor moved. The end of a partition is the larger of the
    ListOffsets answer and the high watermark of a fetch: some brokers (tansu)
    under-report the former after a batch of several records."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(**client_args(settings, bootstrap))
    consumer = AIOKafkaConsumer(**client_args(settings, bootstrap), enable_auto_commit=False,
                                group_id=None, fetch_max_wait_ms=100)
    try:
        await consumer.start()
        if settings.topic not in await consumer.topics():
            return None
        tps = [TopicPartition(settings.topic, p)
               for p in sorted(consumer.partitions_for_topic(settings.topic) or set())]
        if not tps:
            return None
        await admin.start()
        # the partitions are named: some brokers (tansu) cannot answer "all of them"
        committed = await admin.list_consumer_group_offsets(settings.group_id, partitions=tps)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, ends[tp])
        deadline = asyncio.get_running_loop().time() + _HIGHWATER_SECONDS
        while any(consumer.highwater(tp) is None for tp in tps):
            if asyncio.get_running_loop().time() > deadline:
                break
            await consumer.getmany(*tps, timeout_ms=100, max_records=1)
        found = []
        for tp in tps:
            offset = committed.get(tp)
            mark = offset.offset if offset is not None and offset.offset >= 0 else None
            end = max(ends[tp], consumer.highwater(tp) or 0)
            found.append(PartitionLag(tp.partition, mark, starts[tp], end))
        return found
    except KafkaError as exc:
        raise broker_unreachable(bootstrap, exc) from exc
    finally:
        with contextlib.suppress(KafkaError):
            await consumer.stop()
        with contextlib.suppress(KafkaError):
            await admin.close()
