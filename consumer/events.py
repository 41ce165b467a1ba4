"""The absence event contract (docs/events.md): parsing and validation.

`parse_event` is the only way raw Kafka bytes become an `Absence`: strict
JSON (no `NaN`, `Infinity` or numbers beyond the double range), JSON Schema
(`schemas/absence-event.v1.json`), then the semantic checks a schema cannot
express. On the hot path a record is parsed once (orjson) and validated once
(jsonschema-rs, compiled from the same schema); the Python `json` module and
the reference validator (jsonschema) only judge and explain what the fast
path refuses, so they decide every rejection. Anything wrong raises
`InvalidEvent` with a short machine reason (used as the dead-letter header)
and a readable detail that names the failing JSON path, never the offending
value (an event carries personal data). No other exception escapes
`parse_event` for any input bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import zoneinfo
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jsonschema_rs
import orjson
from jsonschema import Draft202012Validator, ValidationError, validators

Half = Literal["am", "pm"]
UPSERTED = "absence.upserted"
DELETED = "absence.deleted"
MAX_EVENT_BYTES = 1_000_000
MAX_SPAN_DAYS = 5 * 366
MAX_DEPTH = 100
# Rendering needs the day after the end date and UTC conversions of local
# midnights: the two extreme representable dates cannot be rendered.
_FIRST_DATE = dt.date.min + dt.timedelta(days=1)
_LAST_DATE = dt.date.max - dt.timedelta(days=1)
# A JSON escape for NUL or a UTF-16 surrogate: PostgreSQL (jsonb, text) stores neither.
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
# orjson reads integers beyond 64 bits as floats: such documents take the
# reference parser, which keeps them exact (digits inside strings only cost time)
_LONG_INTEGER = re.compile(rb"[0-9]{19}")
# Every string the schema matches against a pattern has a maxLength of at most
# 2048; some patterns backtrack quadratically, so longer input is not matched.
_MAX_PATTERN_INPUT = 4096
# reasons of InvalidEvent that callers may rely on
INVALID_EVENT = "invalid_event"
MALFORMED_JSON = "malformed_json"


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
    """A validated CloudEvent carrying an absence. `event_id` (the CloudEvent
    `id`) is None for an `absence.deleted` event that leaves it out: a delete
    needs only `type`, `tenant`, `data.id` and `data.version`."""

    event_id: str | None
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
def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(_schema_path().read_text(encoding="utf-8"))
    return schema


_PATTERN = Draft202012Validator.VALIDATORS["pattern"]


def _bounded_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Any:
    """The `pattern` keyword, except on strings too long for any patterned field
    (a pattern such as the e-mail's backtracks quadratically on them)."""
    if isinstance(instance, str) and len(instance) > _MAX_PATTERN_INPUT:
        yield ValidationError(f"is longer than {_MAX_PATTERN_INPUT} characters")
        return
    yield from _PATTERN(validator, pattern, instance, schema)


_ReferenceValidator = validators.extend(Draft202012Validator, {"pattern": _bounded_pattern})


@cache
def validator() -> Draft202012Validator:
    """The reference validator: the judge, and the source of error messages."""
    checker: Draft202012Validator = _ReferenceValidator(_schema())
    return checker


#: The characters Python's `\\s` matches in a str pattern (`str.isspace`), which the
#: reference validator applies; the fast validator's regex engine gets them spelt out.
PYTHON_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_SPACE_SET = "".join(f"\\x{{{ord(c):x}}}" for c in PYTHON_WHITESPACE)


def python_pattern(pattern: str) -> str:
    """`pattern` (Python `re` semantics, as the reference validator reads it) for the
    fast validator's regex engine: `\\s` and `\\S` as Python's whitespace, and a final
    `$` that, like Python's, also matches before one trailing newline."""
    out: list[str] = []
    in_class = False
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            escaped = pattern[index + 1]
            if escaped == "s":
                out.append(_SPACE_SET if in_class else f"[{_SPACE_SET}]")
            elif escaped == "S":
                if in_class:
                    raise ValueError(f"\\S inside a character class: {pattern!r}")
                out.append(f"[^{_SPACE_SET}]")
            else:
                out.append(pattern[index : index + 2])
            index += 2
            continue
        if char == "[" and not in_class:
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        elif char == "$" and not in_class and index == len(pattern) - 1:
            out.append("\\n?$")
            index += 1
            continue
        out.append(char)
        index += 1
    return "".join(out)


def _python_patterns(node: Any) -> Any:
    if isinstance(node, list):
        return [_python_patterns(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {
        key: python_pattern(value) if key == "pattern" and isinstance(value, str)
        else _python_patterns(value)
        for key, value in node.items()
    }


@cache
def _fast_check() -> Any:
    """`is_valid(doc)` of a compiled validator (jsonschema-rs), some 10 times faster
    than the fastjsonschema check it replaces and 100 times faster than
    `validator()`, for the hot path. It never accepts what the reference refuses
    (tests/test_schema_fast.py): when it refuses, the reference judges."""
    return jsonschema_rs.validator_for(_python_patterns(_schema())).is_valid


def _schema_error(doc: Any) -> str | None:
    try:
        if _fast_check()(doc):
            return None
    except (ValueError, TypeError, OverflowError):
        pass  # a value the fast validator cannot take (an integer beyond 64 bits)
    # the slow, reference validator judges and explains what the fast one refused
    errors = sorted(validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    first = errors[0]
    where = "/".join(str(p) for p in first.absolute_path) or "(root)"
    return f"{where}: {_explain(first)}"


def _explain(error: ValidationError) -> str:
    """What the failing schema rule wants, from the schema only: jsonschema's own
    messages quote the instance, which may be personal data."""
    keyword, expected = error.validator, error.validator_value
    if keyword == "required":
        present = error.instance if isinstance(error.instance, dict) else {}
        missing = [name for name in expected if name not in present]
        return f"required member {missing[0]!r} is missing" if missing else "a member is missing"
    if keyword == "type":
        return f"must be of type {expected}"
    if keyword in ("enum", "const"):
        allowed = expected if keyword == "enum" else [expected]
        return "must be one of " + ", ".join(json.dumps(v) for v in allowed)
    if keyword in ("minLength", "maxLength", "minimum", "maximum"):
        return f"breaks {keyword} {expected}"
    if keyword == "pattern":
        return "does not have the expected form"
    if keyword == "not":
        return "holds a forbidden character (e.g. a line break)"
    return f"breaks the {keyword!r} rule"


def _half(raw: dict[str, Any], where: str) -> HalfDay:
    try:
        day = dt.date.fromisoformat(raw["date"])
    except ValueError as exc:
        raise InvalidEvent("invalid_date", f"{where}/date: not a calendar date") from exc
    if not _FIRST_DATE <= day <= _LAST_DATE:
        raise InvalidEvent("invalid_date", f"{where}/date: outside the supported range")
    half: Half = "am" if raw["half"] == "am" else "pm"
    return HalfDay(day, half)


def _zone(name: str | None) -> str | None:
    if not name:
        return None
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # OSError: a name such as "Europe" that is a directory of the zone database
        raise InvalidEvent(
            "unknown_time_zone", "data/employee/time_zone: not a known IANA time zone"
        ) from exc
    return name


def _time(raw: object) -> dt.datetime | None:
    if not isinstance(raw, str):
        return None
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise InvalidEvent("schema", "time: not an RFC 3339 timestamp") from exc
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except (ValueError, OverflowError) as exc:
        # e.g. 0001-01-01T00:00:00+01:00: its UTC form is before year 1
        raise InvalidEvent(INVALID_EVENT, "time: outside the representable range") from exc


def absence_from_data(tenant: str, deleted: bool, data: dict[str, Any]) -> Absence:
    """Build an `Absence` from already schema-valid `data`, with semantic checks."""
    if deleted:
        return Absence(tenant=tenant, id=data["id"], version=int(data["version"]), deleted=True)
    emp = data["employee"]
    acc = data["account"]
    start, end = _half(data["start"], "data/start"), _half(data["end"], "data/end")
    if not start <= end:
        raise InvalidEvent("end_before_start", "data/end is before data/start")
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
    except ValueError:
        if day.year + years > dt.MAXYEAR:
            return dt.date.max
        return day.replace(year=day.year + years, day=28)  # 29 February


def parse_event(raw: bytes | None) -> Event:
    """Parse and validate one Kafka message value."""
    if raw is None:
        raise InvalidEvent("empty", "the message has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("too_large", f"the message has {len(raw)} bytes")
    doc = _fast_parse(raw)
    if doc is _REFUSED:
        doc = _reference_parse(raw)
    if _may_nest_deeply(raw) and _too_deep(doc):
        raise InvalidEvent("malformed_json", f"the document is nested deeper than {MAX_DEPTH}")
    if _SUSPECT_ESCAPE.search(raw) and _unstorable(doc):
        raise InvalidEvent("malformed_json", "a string holds NUL or an unpaired surrogate")
    error = _schema_error(doc)
    if error is not None:
        raise InvalidEvent("schema", error)
    deleted = doc["type"] == DELETED
    try:
        absence = absence_from_data(doc["tenant"], deleted, doc["data"])
    except (ValueError, OverflowError) as exc:
        raise InvalidEvent(INVALID_EVENT, "data: a value is outside what can be handled") from exc
    return Event(
        event_id=doc.get("id"),
        type=doc["type"],
        time=_time(doc.get("time")),
        absence=absence,
        data=doc["data"],
    )


_REFUSED = object()


def _fast_parse(raw: bytes) -> Any:
    """orjson's reading of `raw`, or `_REFUSED` for anything it refuses (bad JSON,
    `NaN`, a BOM, a lone surrogate, deep nesting) or could read inexactly (an
    integer beyond 64 bits): those go to the reference parser, which decides."""
    if _LONG_INTEGER.search(raw):
        return _REFUSED
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _REFUSED


def _reference_parse(raw: bytes) -> Any:
    """The standard library's strict reading of `raw`, raising `InvalidEvent`."""
    try:
        # JSON between systems is UTF-8 (RFC 8259); json.loads(bytes) would also take UTF-16/32.
        text = raw.decode("utf-8-sig")
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # the messages give a position and at most one byte, never content
        raise InvalidEvent(MALFORMED_JSON, str(exc)[:300]) from exc
    except _NotJSON as exc:
        raise InvalidEvent(MALFORMED_JSON, str(exc)) from exc
    except _OutOfRange as exc:
        raise InvalidEvent(INVALID_EVENT, str(exc)) from exc
    except ValueError as exc:
        # int(): a literal beyond sys.get_int_max_str_digits() digits
        raise InvalidEvent(INVALID_EVENT, "an integer has too many digits") from exc
    except RecursionError as exc:
        raise InvalidEvent(MALFORMED_JSON, "the document is nested too deeply") from exc


def _may_nest_deeply(raw: bytes) -> bool:
    """Whether `raw` holds enough brackets to nest deeper than MAX_DEPTH (the walk
    of `_too_deep` is skipped for the usual few-bracket event)."""
    return raw.count(b"{") + raw.count(b"[") > MAX_DEPTH


class _NotJSON(ValueError):
    """`NaN`, `Infinity` or `-Infinity`: accepted by Python's json module, not JSON."""


class _OutOfRange(ValueError):
    """A number such as 1e400 that has no finite double (PostgreSQL's jsonb refuses it)."""


def _reject_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _OutOfRange("a number is beyond the range of a double")
    return value


def _too_deep(doc: object) -> bool:
    """Nesting deeper than MAX_DEPTH (junk that later recursive code could choke on)."""
    stack: list[tuple[object, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            if depth >= MAX_DEPTH:
                return True
            stack.extend((child, depth + 1) for child in node)
    return False


def _unstorable(doc: object) -> bool:
    """A key or string value holding NUL or an unpaired surrogate."""
    stack: list[object] = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            if "\x00" in node:
                return True
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False
