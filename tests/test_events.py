"""The event contract (docs/events.md): `parse_event` turns bytes into an Absence or
raises InvalidEvent, and never anything else, whatever the bytes are."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.events import Absence, InvalidEvent, parse_event

EXAMPLES = Path(__file__).resolve().parent.parent / "schemas" / "examples"
VALID = sorted((EXAMPLES / "valid").glob("*.json"))
INVALID = sorted((EXAMPLES / "invalid").glob("*.json"))
SEMANTIC = sorted((EXAMPLES / "semantic").glob("*.json"))

# The reason each semantic example must be rejected with (docs/events.md: end before
# start, span over 5 years, unknown zone; plus impossible calendar dates).
SEMANTIC_REASONS = {
    "end-before-start.json": "end_before_start",
    "same-date-pm-to-am.json": "end_before_start",
    "span-over-5-years.json": "span_too_long",
    "unknown-time-zone.json": "unknown_time_zone",
    "impossible-date.json": "invalid_date",
    "impossible-date-leap.json": "invalid_date",
}

UTC = dt.UTC


def base_event() -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "5f0c1f2e-8a3b-4c7d-9e21-0b6a4d2c9f10",
        "source": "https://hr.example.com",
        "type": "absence.upserted",
        "time": "2026-11-23T10:00:00Z",
        "tenant": "acme",
        "datacontenttype": "application/json",
        "data": {
            "id": "abs-1234",
            "version": 3,
            "status": "approved",
            "employee": {
                "id": "emp-42",
                "email": "jane.doe@acme.com",
                "establishment_id": "paris",
                "time_zone": "Europe/Paris",
                "display_name": "Jane Doe",
            },
            "account": {
                "id": "paid-leave",
                "name": "Paid leave",
                "counted_as_absence": True,
                "public_reason": False,
            },
            "start": {"date": "2026-12-01", "half": "am"},
            "end": {"date": "2026-12-03", "half": "pm"},
        },
    }


def with_span(start: tuple[str, str], end: tuple[str, str]) -> dict[str, Any]:
    doc = base_event()
    doc["data"]["start"] = {"date": start[0], "half": start[1]}
    doc["data"]["end"] = {"date": end[0], "half": end[1]}
    return doc


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode("utf-8")


def parse(doc: Any) -> Absence:
    return parse_event(encode(doc)).absence


def reason_of(raw: bytes | None) -> str:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(raw)
    return caught.value.reason


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# --- the published examples ---------------------------------------------------


def test_example_sets_are_populated() -> None:
    assert len(VALID) >= 12 and len(INVALID) >= 20 and len(SEMANTIC) >= 5


@pytest.mark.parametrize("path", VALID, ids=[p.name for p in VALID])
def test_valid_example_parses(path: Path) -> None:
    doc = _load(path)
    event = parse_event(path.read_bytes())
    absence = event.absence
    assert event.event_id == doc.get("id")
    assert event.type == doc["type"]
    assert absence.tenant == doc["tenant"]
    assert absence.id == doc["data"]["id"]
    assert absence.version == doc["data"]["version"]
    assert absence.deleted is (doc["type"] == "absence.deleted")
    if absence.deleted:
        return
    data = doc["data"]
    assert absence.status == data["status"]
    assert absence.employee is not None and absence.account is not None
    assert absence.employee.email == data["employee"]["email"]
    assert absence.employee.establishment_id == data["employee"]["establishment_id"]
    assert absence.employee.calendar_address == data["employee"].get("calendar_address")
    assert absence.employee.time_zone == data["employee"].get("time_zone")
    assert absence.account.name == data["account"]["name"]
    assert absence.account.counted_as_absence is data["account"]["counted_as_absence"]
    assert absence.account.public_reason is data["account"]["public_reason"]
    assert absence.start is not None and absence.end is not None
    assert absence.start.date == dt.date.fromisoformat(data["start"]["date"])
    assert absence.start.half == data["start"]["half"]
    assert absence.end.date == dt.date.fromisoformat(data["end"]["date"])
    assert absence.end.half == data["end"]["half"]


def test_valid_examples_include_deletes() -> None:
    deleted = [p.name for p in VALID if parse_event(p.read_bytes()).absence.deleted]
    assert {"deleted-minimal.json", "deleted-with-full-data.json"} <= set(deleted)


@pytest.mark.parametrize("path", INVALID, ids=[p.name for p in INVALID])
def test_invalid_example_is_a_schema_error(path: Path) -> None:
    assert reason_of(path.read_bytes()) == "schema"


def test_every_semantic_example_has_an_expected_reason() -> None:
    assert sorted(p.name for p in SEMANTIC) == sorted(SEMANTIC_REASONS)


@pytest.mark.parametrize("path", SEMANTIC, ids=[p.name for p in SEMANTIC])
def test_semantic_example_is_rejected_with_its_reason(path: Path) -> None:
    assert reason_of(path.read_bytes()) == SEMANTIC_REASONS[path.name]


# --- hostile bytes: always InvalidEvent ---------------------------------------


def _nested_extra(depth: int) -> bytes:
    """A valid event whose unknown extra field is nested `depth` arrays deep."""
    doc = base_event()
    doc["data"]["junk"] = "@@"
    text = encode(doc)
    return text.replace(b'"@@"', b"[" * depth + b"1" + b"]" * depth)


def _oversized(size: int) -> bytes:
    doc = base_event()
    doc["padding"] = ""
    raw = encode(doc)
    doc["padding"] = "x" * (size - len(raw))
    raw = encode(doc)
    assert len(raw) == size
    return raw


HOSTILE: list[tuple[str, bytes | None, str]] = [
    ("none-value", None, "empty"),
    ("empty-bytes", b"", "malformed_json"),
    ("truncated-json", encode(base_event())[:-7], "malformed_json"),
    ("not-json", b"hello, world", "malformed_json"),
    ("trailing-garbage", encode(base_event()) + b"}", "malformed_json"),
    ("single-quotes", b"{'specversion': '1.0'}", "malformed_json"),
    ("nan-literal", b'{"specversion": NaN', "malformed_json"),
    ("invalid-utf8-sequence", b'{"id": "\xc3\x28"}', "malformed_json"),
    ("lone-continuation-byte", b"\x80\x80\x80", "malformed_json"),
    ("latin1-encoded-event",
     json.dumps(base_event(), ensure_ascii=False).replace("Paid leave", "Congé payé")
     .encode("latin-1"), "malformed_json"),
    ("utf16-encoded-event", json.dumps(base_event()).encode("utf-16"), "malformed_json"),
    ("utf32-encoded-event", json.dumps(base_event()).encode("utf-32"), "malformed_json"),
    ("oversized-1MiB+1", _oversized(1_048_577), "too_large"),
    ("oversized-2MB", _oversized(2_000_000), "too_large"),
    ("json-array-empty", b"[]", "schema"),
    ("json-array-of-event", encode([base_event()]), "schema"),
    ("json-number", b"42", "schema"),
    ("json-null", b"null", "schema"),
    ("json-string", b'"absence.upserted"', "schema"),
    ("json-empty-object", b"{}", "schema"),
    ("deep-arrays-100k", b"[" * 100_000 + b"]" * 100_000, "malformed_json"),
    ("deep-unclosed-arrays-500k", b"[" * 500_000, "malformed_json"),
    ("deep-objects-50k", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "malformed_json"),
    ("deep-extra-field-500", _nested_extra(500), "malformed_json"),
    ("deep-extra-field-5000", _nested_extra(5000), "malformed_json"),
    ("nul-in-account-name",
     encode(base_event()).replace(b"Paid leave", b"Paid\\u0000leave"), "malformed_json"),
    ("nul-in-unknown-key",
     encode(base_event()).replace(b'"tenant"', b'"x\\u0000": 1, "tenant"'), "malformed_json"),
    ("lone-high-surrogate",
     encode(base_event()).replace(b"Paid leave", b"Paid \\ud800leave"), "malformed_json"),
    ("lone-low-surrogate-in-tenant",
     encode(base_event()).replace(b'"acme"', b'"acme\\uDC00"'), "malformed_json"),
]


@pytest.mark.parametrize(
    ("raw", "reason"), [(r, why) for _, r, why in HOSTILE], ids=[i for i, _, _ in HOSTILE]
)
def test_hostile_bytes_raise_invalid_event(raw: bytes | None, reason: str) -> None:
    assert reason_of(raw) == reason


ACCEPTED_EDGES: list[tuple[str, bytes, str]] = [
    ("utf8-bom", b"\xef\xbb\xbf" + encode(base_event()), "Paid leave"),
    ("escaped-surrogate-pair",
     encode(base_event()).replace(b"Paid leave", b"Palm \\ud83c\\udf34"), "Palm \U0001f334"),
    ("literal-backslash-u0000",
     encode(base_event()).replace(b"Paid leave", b"C:\\\\u0000"), "C:\\u0000"),
    ("nested-extra-field-50", _nested_extra(50), "Paid leave"),
    ("just-under-a-megabyte", _oversized(999_000), "Paid leave"),
]


@pytest.mark.parametrize(
    ("raw", "name"), [(r, n) for _, r, n in ACCEPTED_EDGES], ids=[i for i, _, _ in ACCEPTED_EDGES]
)
def test_edge_inputs_that_are_still_valid(raw: bytes, name: str) -> None:
    absence = parse_event(raw).absence
    assert absence.account is not None and absence.account.name == name


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise_anything_but_invalid_event(raw: bytes) -> None:
    with contextlib.suppress(InvalidEvent):
        parse_event(raw)


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(_json_values)
def test_random_json_never_raises_anything_but_invalid_event(value: Any) -> None:
    with pytest.raises(InvalidEvent):
        parse_event(encode(value))


_FIELDS = ["start", "end", "employee", "account", "status", "version", "id"]


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.sampled_from(_FIELDS), _json_values)
def test_random_field_values_never_raise_anything_but_invalid_event(
    field: str, value: Any
) -> None:
    doc = base_event()
    doc["data"][field] = value
    with contextlib.suppress(InvalidEvent):
        parse_event(encode(doc))


# --- semantic rules -----------------------------------------------------------

SPANS: list[tuple[str, tuple[str, str], tuple[str, str], str | None]] = [
    ("same-date-am-to-am", ("2026-12-01", "am"), ("2026-12-01", "am"), None),
    ("same-date-pm-to-pm", ("2026-12-01", "pm"), ("2026-12-01", "pm"), None),
    ("same-date-am-to-pm", ("2026-12-01", "am"), ("2026-12-01", "pm"), None),
    ("same-date-pm-to-am", ("2026-12-01", "pm"), ("2026-12-01", "am"), "end_before_start"),
    ("next-date-pm-to-am", ("2026-12-01", "pm"), ("2026-12-02", "am"), None),
    ("end-one-day-before", ("2026-12-02", "am"), ("2026-12-01", "pm"), "end_before_start"),
    ("exactly-5-years", ("2026-12-01", "am"), ("2031-12-01", "pm"), None),
    ("5-years-plus-1-day", ("2026-12-01", "am"), ("2031-12-02", "am"), "span_too_long"),
    ("5-years-over-two-leap-years", ("2027-03-01", "am"), ("2032-03-01", "pm"), None),
    ("5-years-plus-1-day-leap", ("2027-03-01", "am"), ("2032-03-02", "am"), "span_too_long"),
    ("leap-day-start-5-years", ("2028-02-29", "am"), ("2033-02-28", "pm"), None),
    ("leap-day-start-5-years-plus-1", ("2028-02-29", "am"), ("2033-03-01", "am"),
     "span_too_long"),
    ("ten-years", ("2026-01-01", "am"), ("2036-01-01", "pm"), "span_too_long"),
    ("feb-29-non-leap-year", ("2026-02-28", "am"), ("2026-02-29", "pm"), "invalid_date"),
    ("feb-29-leap-year", ("2028-02-28", "am"), ("2028-02-29", "pm"), None),
    ("april-31", ("2026-04-30", "am"), ("2026-04-31", "pm"), "invalid_date"),
    ("start-impossible", ("2026-02-30", "am"), ("2026-12-01", "pm"), "invalid_date"),
    ("first-representable-date", ("0001-01-01", "am"), ("0001-01-02", "pm"), "invalid_date"),
    ("last-representable-date", ("9999-12-30", "am"), ("9999-12-31", "pm"), "invalid_date"),
    ("far-future-near-max", ("9996-01-01", "am"), ("9999-12-30", "pm"), None),
    ("far-past-near-min", ("0001-01-02", "am"), ("0001-01-03", "pm"), None),
]


@pytest.mark.parametrize(
    ("start", "end", "reason"), [s[1:] for s in SPANS], ids=[s[0] for s in SPANS]
)
def test_span_rules(start: tuple[str, str], end: tuple[str, str], reason: str | None) -> None:
    raw = encode(with_span(start, end))
    if reason is None:
        absence = parse_event(raw).absence
        assert absence.start is not None and absence.end is not None
        assert (absence.start.date.isoformat(), absence.start.half) == start
        assert (absence.end.date.isoformat(), absence.end.half) == end
    else:
        assert reason_of(raw) == reason


ZONES: list[tuple[str, str | None, str | None]] = [
    ("europe-paris", "Europe/Paris", None),
    ("three-levels", "America/Argentina/Buenos_Aires", None),
    ("utc", "UTC", None),
    ("etc-offset", "Etc/GMT-14", None),
    ("null-zone", None, None),
    ("unknown-zone", "Mars/Olympus_Mons", "unknown_time_zone"),
    ("directory-europe", "Europe", "unknown_time_zone"),
    ("directory-america-argentina", "America/Argentina", "unknown_time_zone"),
    ("database-file-not-a-zone", "zone1970", "unknown_time_zone"),
    ("offset-like-name", "UTC+1", "unknown_time_zone"),
]


@pytest.mark.parametrize(("zone", "reason"), [z[1:] for z in ZONES], ids=[z[0] for z in ZONES])
def test_time_zone_rules(zone: str | None, reason: str | None) -> None:
    doc = base_event()
    doc["data"]["employee"]["time_zone"] = zone
    if reason is None:
        absence = parse(doc)
        assert absence.employee is not None and absence.employee.time_zone == zone
    else:
        assert reason_of(encode(doc)) == reason


def test_deleted_event_needs_no_absence_details_and_skips_their_checks() -> None:
    doc = with_span(("2026-12-03", "am"), ("2026-12-01", "pm"))  # end before start
    doc["type"] = "absence.deleted"
    doc["data"]["employee"]["time_zone"] = "Mars/Olympus_Mons"
    absence = parse(doc)
    assert absence == Absence(tenant="acme", id="abs-1234", version=3, deleted=True)


def test_upserted_event_with_partial_data_is_a_schema_error() -> None:
    doc = base_event()
    del doc["data"]["employee"]
    assert reason_of(encode(doc)) == "schema"


# --- forward compatibility ----------------------------------------------------


def test_unknown_extra_fields_are_ignored_everywhere() -> None:
    plain = parse_event(encode(base_event()))
    doc = base_event()
    doc["traceparent"] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    doc["future"] = {"nested": [1, "two", None]}
    doc["data"]["comment"] = "private medical detail"
    doc["data"]["employee"]["department"] = {"id": "sales"}
    doc["data"]["account"]["color"] = "#3366ff"
    doc["data"]["start"]["hours"] = 3.5
    doc["data"]["end"]["minutes"] = None
    extended = parse_event(encode(doc))
    assert extended.absence == plain.absence
    assert extended.time == plain.time
    assert extended.data["comment"] == "private medical detail"  # kept, just not interpreted


def test_key_order_and_whitespace_do_not_matter() -> None:
    doc = base_event()
    reordered = dict(reversed(list(doc.items())))
    pretty = json.dumps(reordered, indent=4, sort_keys=True).encode()
    assert parse_event(pretty).absence == parse(doc)


def test_parse_does_not_depend_on_the_callers_dict() -> None:
    doc = base_event()
    before = copy.deepcopy(doc)
    parse(doc)
    assert doc == before


# --- the `time` attribute -----------------------------------------------------

TIMES: list[tuple[str, str | None, dt.datetime | None]] = [
    ("zulu", "2026-11-23T10:00:00Z", dt.datetime(2026, 11, 23, 10, 0, tzinfo=UTC)),
    ("lowercase-z-and-t", "2026-11-23t10:00:00z", dt.datetime(2026, 11, 23, 10, 0, tzinfo=UTC)),
    ("plus-one-hour-with-fraction", "2026-11-23T11:00:00.123456+01:00",
     dt.datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)),
    ("minus-five-hours", "2026-11-23T05:00:00-05:00",
     dt.datetime(2026, 11, 23, 10, 0, tzinfo=UTC)),
    ("crosses-midnight", "2026-11-24T00:30:00+14:00",
     dt.datetime(2026, 11, 23, 10, 30, tzinfo=UTC)),
    ("seven-fraction-digits", "2026-11-23T10:00:00.1234567Z",
     dt.datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)),
    ("absent", None, None),
]


@pytest.mark.parametrize(("raw", "expected"), [t[1:] for t in TIMES], ids=[t[0] for t in TIMES])
def test_time_is_parsed_as_aware_utc(raw: str | None, expected: dt.datetime | None) -> None:
    doc = base_event()
    if raw is None:
        del doc["time"]
    else:
        doc["time"] = raw
    parsed = parse_event(encode(doc)).time
    assert parsed == expected
    if parsed is not None:
        assert parsed.tzinfo is UTC
        assert parsed.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    "raw",
    ["2026-02-30T10:00:00Z", "2026-11-23T10:00:00", "2026-11-23 10:00:00Z", "yesterday"],
    ids=["impossible-day", "no-offset", "space-separator", "prose"],
)
def test_bad_time_is_rejected(raw: str) -> None:
    doc = base_event()
    doc["time"] = raw
    assert reason_of(encode(doc)) == "schema"


# --- strict numbers, conversions and what a rejection may say ----------------------

_NUMBERS: list[tuple[str, str, str]] = [
    ("nan-in-unknown-member", "NaN", "malformed_json"),
    ("infinity-in-unknown-member", "Infinity", "malformed_json"),
    ("minus-infinity", "-Infinity", "malformed_json"),
    ("float-beyond-double", "1e400", "invalid_event"),
    ("negative-float-beyond-double", "-1.5E+309", "invalid_event"),
    ("integer-of-5000-digits", "9" * 5000, "invalid_event"),
]


@pytest.mark.parametrize(
    ("token", "reason"), [n[1:] for n in _NUMBERS], ids=[n[0] for n in _NUMBERS]
)
def test_numbers_postgresql_could_not_store_are_rejected(token: str, reason: str) -> None:
    raw = encode(base_event()).replace(b'"status"', b'"extra": ' + token.encode() + b', "status"')
    assert reason_of(raw) == reason


def test_numbers_that_fit_are_kept() -> None:
    raw = encode(base_event()).replace(
        b'"status"', b'"tiny": 1e-400, "big": ' + b"9" * 4000 + b', "status"'
    )
    data = parse_event(raw).data
    assert data["tiny"] == 0.0 and data["big"] == int("9" * 4000)


@pytest.mark.parametrize(
    "time", ["0001-01-01T00:00:00+00:01", "0001-01-01T05:00:00+23:59", "9999-12-31T23:59:59-00:01"]
)
def test_times_whose_utc_form_is_out_of_range_are_invalid_events(time: str) -> None:
    doc = base_event()
    doc["time"] = time
    assert reason_of(encode(doc)) == "invalid_event"


def test_extreme_times_that_convert_are_accepted() -> None:
    doc = base_event()
    doc["time"] = "0001-01-01T00:00:00-23:59"
    assert parse_event(encode(doc)).time == dt.datetime(1, 1, 1, 23, 59, tzinfo=UTC)


SECRET = "Zq-private-7731"

_LEAKS: list[tuple[str, tuple[str, ...]]] = [
    ("status", ("data", "status")),
    ("email", ("data", "employee", "email")),
    ("calendar-address", ("data", "employee", "calendar_address")),
    ("time-zone", ("data", "employee", "time_zone")),
    ("start-date", ("data", "start", "date")),
    ("half", ("data", "end", "half")),
    ("time", ("time",)),
    ("tenant-too-long", ("tenant",)),
    ("display-name-too-long", ("data", "employee", "display_name")),
    ("datacontenttype", ("datacontenttype",)),
    ("counted-as-absence", ("data", "account", "counted_as_absence")),
]


@pytest.mark.parametrize("path", [p for _, p in _LEAKS], ids=[i for i, _ in _LEAKS])
def test_a_rejection_names_the_path_never_the_value(path: tuple[str, ...]) -> None:
    doc = base_event()
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = SECRET * 40 if path[-1] in ("tenant", "display_name") else SECRET
    with pytest.raises(InvalidEvent) as caught:
        parse_event(encode(doc))
    assert SECRET not in caught.value.detail
    assert caught.value.detail.startswith("/".join(path)), caught.value.detail


def test_a_semantic_rejection_names_the_path_never_the_value() -> None:
    doc = with_span(("2026-12-05", "am"), ("2026-12-01", "pm"))
    with pytest.raises(InvalidEvent) as caught:
        parse_event(encode(doc))
    assert "2026-12" not in caught.value.detail
    assert caught.value.detail == "data/end is before data/start"
    doc = base_event()
    doc["data"]["employee"]["time_zone"] = "Europe/Zq_Private"
    with pytest.raises(InvalidEvent) as caught:
        parse_event(encode(doc))
    assert "Zq_Private" not in caught.value.detail


def test_an_overlong_string_fails_fast_whatever_the_pattern() -> None:
    """The e-mail pattern backtracks quadratically: 100 000 characters would take
    minutes in the reference validator without the length guard."""
    import time

    doc = base_event()
    doc["data"]["employee"]["email"] = "a@" + "." * 100_000 + " "
    started = time.monotonic()
    assert reason_of(encode(doc)) == "schema"
    assert time.monotonic() - started < 5
