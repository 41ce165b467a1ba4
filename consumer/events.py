"""The absence event contract (SPEC section 3): parsing and validation.

`parse_event` is the only way raw Kafka bytes become an `Absence`: JSON
Schema first (`schemas/absence-event.v1.json`), then the semantic checks a
schema cannot express. Anything wrong raises `InvalidEvent` with a short
machine reason (used as the dead-letter header) and a readable detail.
"""

from __future__ import annotations

import datetime as dt
import json
import zoneinfo
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from jsonschema import Draft202012Validator

Half = Literal["am", "pm"]
UPSERTED = "absence.upserted"
DELETED = "absence.deleted"
MAX_EVENT_BYTES = 1_000_000
MAX_SPAN_DAYS = 5 * 366


class InvalidEvent(Exception):
    """An event that breaks the contract; it goes to the dead-letter topic."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class HalfDay:
    date: dt.date
    half: Half

    def __le__(self, other: HalfDay) -> bool:
        return (self.date, self.half) <= (other.date, other.half)


@dataclass(frozen=True, slots=True)
class Employee:
    id: str
    email: str
    establishment_id: str | None = None
    calendar_address: str | None = None
    time_zone: str | None = None
    display_name: str | None = None

    @property
    def target_address(self) -> str:
        """Rule 5.5: the calendar override when given, else the e-mail."""
        return (self.calendar_address or self.email).strip().lower()


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    counted_as_absence: bool = True
    public_reason: bool = False


@dataclass(frozen=True, slots=True)
class Absence:
    """The latest known state of one absence of one tenant."""

    tenant: str
    id: str
    version: int
    deleted: bool
    status: str | None = None
    employee: Employee | None = None
    account: Account | None = None
    start: HalfDay | None = None
    end: HalfDay | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """A validated CloudEvent carrying an absence."""

    event_id: str
    type: str
    time: dt.datetime | None
    absence: Absence
    data: dict[str, Any]


def _schema_path() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "schemas", here / "schemas"):
        path = candidate / "absence-event.v1.json"
        if path.is_file():
            return path
    return Path(str(resources.files("consumer") / "schemas" / "absence-event.v1.json"))


@cache
def validator() -> Draft202012Validator:
    schema = json.loads(_schema_path().read_text(encoding="utf-8"))
    return Draft202012Validator(schema)


def _half(raw: dict[str, Any]) -> HalfDay:
    try:
        day = dt.date.fromisoformat(raw["date"])
    except ValueError as exc:
        raise InvalidEvent("invalid_date", f"{raw['date']!r} is not a calendar date") from exc
    half: Half = "am" if raw["half"] == "am" else "pm"
    return HalfDay(day, half)


def _zone(name: str | None) -> str | None:
    if not name:
        return None
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidEvent("unknown_time_zone", f"unknown IANA time zone {name!r}") from exc
    return name


def _time(raw: object) -> dt.datetime | None:
    if not isinstance(raw, str):
        return None
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise InvalidEvent("schema", f"time {raw!r} is not an RFC 3339 timestamp") from exc
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def absence_from_data(tenant: str, deleted: bool, data: dict[str, Any]) -> Absence:
    """Build an `Absence` from already schema-valid `data`, with semantic checks."""
    if deleted:
        return Absence(tenant=tenant, id=data["id"], version=int(data["version"]), deleted=True)
    emp = data["employee"]
    acc = data["account"]
    start, end = _half(data["start"]), _half(data["end"])
    if not start <= end:
        raise InvalidEvent(
            "end_before_start",
            f"end {end.date} {end.half} is before start {start.date} {start.half}",
        )
    if (end.date - start.date).days > MAX_SPAN_DAYS or (
        end.date > _add_years(start.date, 5)
    ):
        raise InvalidEvent("span_too_long", "an absence may not span more than 5 years")
    employee = Employee(
        id=emp["id"],
        email=emp["email"],
        establishment_id=emp.get("establishment_id"),
        calendar_address=emp.get("calendar_address") or None,
        time_zone=_zone(emp.get("time_zone")),
        display_name=emp.get("display_name"),
    )
    account = Account(
        id=acc["id"],
        name=acc["name"],
        counted_as_absence=bool(acc.get("counted_as_absence", True)),
        public_reason=bool(acc.get("public_reason", False)),
    )
    return Absence(
        tenant=tenant,
        id=data["id"],
        version=int(data["version"]),
        deleted=False,
        status=data["status"],
        employee=employee,
        account=account,
        start=start,
        end=end,
    )


def _add_years(day: dt.date, years: int) -> dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


def parse_event(raw: bytes | None) -> Event:
    """Parse and validate one Kafka message value."""
    if raw is None:
        raise InvalidEvent("empty", "the message has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("too_large", f"the message has {len(raw)} bytes")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent("malformed_json", str(exc)[:300]) from exc
    errors = sorted(validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(root)"
        raise InvalidEvent("schema", f"{where}: {first.message[:300]}")
    deleted = doc["type"] == DELETED
    absence = absence_from_data(doc["tenant"], deleted, doc["data"])
    return Event(
        event_id=doc["id"],
        type=doc["type"],
        time=_time(doc.get("time")),
        absence=absence,
        data=doc["data"],
    )
