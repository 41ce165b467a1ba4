"""Hostile values through the real intake, with Hypothesis (README, 'Operations':
bad input never stops the worker).

Arbitrary JSON values (huge and non-finite numbers, floats, unicode with
NUL and lone surrogates, deep nesting, extreme dates, times and offsets)
go into every field of otherwise valid events, published to a real broker
on one partition and consumed by one real worker (real PostgreSQL), with a
valid absence behind them. For every example: the worker is still running,
every hostile record is either recorded or dead-lettered, the absence behind
them is written to the calendar, and every dead letter was caught by
validation itself: never by the database refusing what validation let
through (`refused_by_database`), never by the catch-all (`internal`).
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
import zoneinfo
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from consumer.intake import INTERNAL_REASON, REFUSED_REASON
from consumer.providers.memory import MemoryCalendar
from consumer.settings import Settings
from tests.conftest import Publisher, event, wait_until
from tests.harness import Running, apply, sync_config, worker


@dataclass(frozen=True)
class Raw:
    """A token written into the JSON text as is (json.dumps cannot produce it)."""

    token: str


RAW_TOKENS = [
    "1e400", "-1e400", "1E+99999", "1e-400", "-0.0", "1" + "0" * 5000, "-" + "9" * 4301,
    "9" * 4300, "0." + "0" * 5000 + "1", "123456789012345678901234567890.5e-10",
    "NaN", "Infinity", "-Infinity",
]

_offsets = st.sampled_from(["Z", "z", "+00:00", "-00:00", "+23:59", "-23:59", "+14:00", "-12:00"])
_extreme_dates = st.sampled_from(
    [dt.date.min, dt.date.max, dt.date(1, 1, 2), dt.date(9999, 12, 30)]
)
_dates = st.dates() | _extreme_dates
_date_strings = _dates.map(dt.date.isoformat) | st.sampled_from(
    ["0000-01-01", "2026-02-29", "2026-02-30", "2028-02-29", "10000-01-01", "2026-1-1"]
)
_times = st.builds(
    lambda day, h, m, s, frac, off: f"{day.isoformat()}T{h:02d}:{m:02d}:{s:02d}{frac}{off}",
    _dates, st.integers(0, 23), st.integers(0, 59), st.integers(0, 60),
    st.sampled_from(["", ".5", ".123456", ".1234567890123"]), _offsets,
)
_zones = st.sampled_from(sorted(zoneinfo.available_timezones())) | st.sampled_from(
    ["Europe", "Etc", "Factory", "posixrules", "../../etc/passwd", "Etc/GMT+12", "Etc/GMT-14",
     "UTC", "America/Argentina/ComodRivadavia", "Mars/Olympus_Mons"]
)
_strings = (
    st.text()
    | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
    | st.sampled_from(["\x00", "a\x00b", "\u202e", "<script>x</script>", "\r\n", "", " ",
                       "a@b.c", "jane@acme.com\n", "x" * 5000])
)
_scalars = (
    st.none() | st.booleans() | st.integers()
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([Raw(t) for t in RAW_TOKENS])
    | _strings | _date_strings | _times | _zones
)
_json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(_strings, children, max_size=3),
    max_leaves=12,
) | st.integers(1, 150).map(lambda depth: _nested(depth))


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# every field of a valid event, and unknown members at each level
PATHS: list[tuple[str, ...]] = [
    ("specversion",), ("id",), ("source",), ("type",), ("time",), ("tenant",),
    ("datacontenttype",), ("data",), ("unknown",),
    ("data", "id"), ("data", "version"), ("data", "status"), ("data", "employee"),
    ("data", "account"), ("data", "start"), ("data", "end"), ("data", "unknown"),
    ("data", "employee", "id"), ("data", "employee", "email"),
    ("data", "employee", "calendar_address"), ("data", "employee", "establishment_id"),
    ("data", "employee", "time_zone"), ("data", "employee", "display_name"),
    ("data", "employee", "unknown"),
    ("data", "account", "id"), ("data", "account", "name"),
    ("data", "account", "counted_as_absence"), ("data", "account", "public_reason"),
    ("data", "account", "unknown"),
    ("data", "start", "date"), ("data", "start", "half"),
    ("data", "end", "date"), ("data", "end", "half"),
]

# values that keep the event valid except for the one thing they stress
_TARGETED: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    ("time",): _times,
    ("data", "start", "date"): _date_strings,
    ("data", "end", "date"): _date_strings,
    ("data", "employee", "time_zone"): _zones,
    ("data", "version"): st.integers(min_value=-1, max_value=2**64)
    | st.floats(min_value=0, max_value=2.0**64) | st.sampled_from([Raw(t) for t in RAW_TOKENS]),
}
# unknown members are kept (forward compatibility) and stored: what PostgreSQL must accept
UNKNOWN_MEMBERS = [p for p in PATHS if p[-1] == "unknown"] + [("data", "start", "unknown")]
_non_finite = st.sampled_from(
    [Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-1e999")]
) | st.sampled_from([float("nan"), float("inf"), float("-inf")])
_stored_values = _non_finite | _json_values | st.lists(_non_finite | _scalars, max_size=3)


@st.composite
def mutations(draw: st.DrawFn) -> list[tuple[tuple[str, ...], Any]]:
    changes = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["stored", "targeted", "any"]))
        if kind == "stored":
            changes.append((draw(st.sampled_from(UNKNOWN_MEMBERS)), draw(_stored_values)))
        elif kind == "targeted":
            path = draw(st.sampled_from(sorted(_TARGETED)))
            changes.append((path, draw(_TARGETED[path])))
        else:
            changes.append((draw(st.sampled_from(PATHS)), draw(_json_values)))
    if draw(st.booleans()):  # the same extreme date at both ends: passes the span rules
        day = draw(_extreme_dates | _dates).isoformat()
        changes += [(("data", "start", "date"), day), (("data", "end", "date"), day)]
    return changes


@dataclass(frozen=True)
class Hostile:
    changes: list[tuple[tuple[str, ...], Any]]
    ascii_only: bool


hostile_events = st.builds(Hostile, mutations(), st.booleans())

_ids = itertools.count()


def encode(
    doc: dict[str, Any], changes: list[tuple[tuple[str, ...], Any]], ascii_only: bool
) -> bytes:
    """`doc` with each change applied, as Kafka bytes (raw tokens spliced into the text)."""
    raws: dict[str, str] = {}

    def place(value: Any) -> Any:
        if isinstance(value, Raw):
            marker = f"@@raw-{len(raws)}-4b1d@@"
            raws[marker] = value.token
            return marker
        if isinstance(value, list):
            return [place(v) for v in value]
        if isinstance(value, dict):
            return {k: place(v) for k, v in value.items()}
        return value

    for path, value in changes:
        node: Any = doc
        for part in path[:-1]:
            if not isinstance(node, dict):
                break
            node = node.setdefault(part, {})
        else:
            if isinstance(node, dict):
                node[path[-1]] = place(value)
    text = json.dumps(doc, ensure_ascii=ascii_only)
    for marker, token in raws.items():
        text = text.replace(json.dumps(marker), token)
    return text.encode("utf-8", "surrogatepass")


@dataclass
class Rig:
    settings: Settings
    pool: asyncpg.Pool
    publisher: Publisher
    running: Running
    calendar: MemoryCalendar
    dlq: AIOKafkaConsumer
    dead: dict[int, dict[str, bytes]] = field(default_factory=dict)

    async def read_dlq(self) -> None:
        batch = await self.dlq.getmany(timeout_ms=100)
        for records in batch.values():
            for record in records:
                headers = {k: v for k, v in record.headers}
                self.dead[int(headers["absence-sync-original-offset"])] = headers


@pytest.fixture
async def rig(settings: Settings, pool: asyncpg.Pool, publisher: Publisher) -> AsyncIterator[Rig]:
    await apply(pool, sync_config())
    calendar = MemoryCalendar()
    dlq = AIOKafkaConsumer(
        settings.dlq_topic, bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest", enable_auto_commit=False,
    )
    await dlq.start()
    try:
        async with worker(settings, calendar=calendar) as running:
            yield Rig(settings, pool, publisher, running, calendar, dlq)
            assert not running.task.done(), "the worker stopped"
    finally:
        await dlq.stop()


async def _recorded(pool: asyncpg.Pool, raw: bytes) -> bool:
    """The record's absence is recorded at its version or a newer one."""
    try:
        doc = json.loads(raw)
        tenant, absence_id, version = doc["tenant"], doc["data"]["id"], doc["data"]["version"]
    except (ValueError, KeyError, TypeError):
        return False
    if not (isinstance(tenant, str) and isinstance(absence_id, str)):
        return False
    try:
        stored = await pool.fetchval(
            "SELECT version FROM absences WHERE tenant = $1 AND id = $2", tenant, absence_id
        )
    except (ValueError, asyncpg.DataError):  # a string PostgreSQL cannot even be asked about
        return False
    return stored is not None and isinstance(version, int | float) and stored >= version


async def _synced(pool: asyncpg.Pool, absence_id: str) -> bool:
    status = await pool.fetchval(
        "SELECT status FROM sync_items WHERE absence_id = $1", absence_id
    )
    return bool(status == "synced")


@hypothesis_settings(
    max_examples=40, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(hostile_events, min_size=1, max_size=4))
@example([Hostile([(("data", "unknown"), Raw("NaN"))], True),
          Hostile([(("data", "employee", "unknown"), [Raw("1e400")])], True)])
@example([Hostile([(("data", "unknown"), Raw("1" + "0" * 5000))], True),
          Hostile([(("time",), "0001-01-01T00:00:00+01:00")], True),
          Hostile([(("time",), "9999-12-31T23:59:59-23:59")], False)])
@example([Hostile([(("data", "unknown"), "a\x00b")], True),
          Hostile([(("data", "account", "name"), "\ud800")], False),
          Hostile([(("data", "employee", "email"), "a@" + "." * 100_000 + " ")], True)])
async def test_hostile_values_are_recorded_or_dead_lettered_and_intake_goes_on(
    rig: Rig, hostile: list[Hostile]
) -> None:
    producer, topic = rig.publisher.producer, rig.settings.topic
    sent: dict[int, bytes] = {}
    for item in hostile:
        n = next(_ids)
        doc = event(f"h-{n}", 1 + n)
        raw = encode(copy.deepcopy(doc), item.changes, item.ascii_only)
        meta = await producer.send_and_wait(topic, value=raw, key=f"h-{n}".encode(), partition=0)
        sent[meta.offset] = raw
    behind = f"behind-{next(_ids)}"
    await producer.send_and_wait(
        topic, value=json.dumps(event(behind, 1)).encode(), key=behind.encode(), partition=0
    )

    await wait_until(lambda: _synced(rig.pool, behind), timeout=60)

    async def accounted() -> bool:
        await rig.read_dlq()
        for offset, raw in sent.items():
            if offset not in rig.dead and not await _recorded(rig.pool, raw):
                return False
        return True

    await wait_until(accounted, timeout=30)
    assert not rig.running.task.done(), "the worker stopped"
    reasons = {rig.dead[o]["absence-sync-reason"].decode() for o in sent if o in rig.dead}
    assert not reasons & {INTERNAL_REASON, REFUSED_REASON}, (
        f"validation let through what only a later guard caught: {reasons}"
    )
    for offset in sent:
        if offset in rig.dead:
            headers = rig.dead[offset]
            assert headers["absence-sync-original-topic"].decode() == topic
            assert headers["absence-sync-original-partition"] == b"0"
    assert rig.running.metrics.internal_errors.labels("intake")._value.get() == 0
    assert rig.running.metrics.internal_errors.labels("dispatch")._value.get() == 0
