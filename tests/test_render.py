"""Rendering rules (docs/rendering.md) as tables.

Expected values are written from the spec text, never computed by the code
under test. Absences are built from event-shaped dicts through
`absence_from_data` / `parse_event`, configurations directly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.config import SyncConfig
from consumer.events import Absence, absence_from_data, parse_event
from consumer.plan import Delete, Move, Noop, Recorded, Update, plan
from consumer.render import DesiredEvent, Mark, clean_label, label, render, show_as, wanted

UTC = dt.UTC
CONFIG_ID = "acme-o365"
EMAIL = "jane.doe@acme.com"
OVERRIDE = "jane@acme.onmicrosoft.com"


# --- builders -------------------------------------------------------------------


def absence_data(
    *,
    absence_id: str = "abs-1234",
    version: int = 3,
    status: str = "approved",
    email: str = EMAIL,
    calendar_address: str | None = None,
    establishment: str = "paris",
    time_zone: str | None = "Europe/Paris",
    display_name: str | None = "Jane Doe",
    name: str = "Paid leave",
    counted: bool = True,
    public_reason: bool = False,
    start: tuple[str, str] = ("2026-12-01", "am"),
    end: tuple[str, str] = ("2026-12-03", "pm"),
) -> dict[str, Any]:
    employee: dict[str, Any] = {
        "id": "emp-42",
        "email": email,
        "establishment_id": establishment,
        "time_zone": time_zone,
        "display_name": display_name,
    }
    if calendar_address is not None:
        employee["calendar_address"] = calendar_address
    return {
        "id": absence_id,
        "version": version,
        "status": status,
        "employee": employee,
        "account": {
            "id": "paid-leave",
            "name": name,
            "counted_as_absence": counted,
            "public_reason": public_reason,
        },
        "start": {"date": start[0], "half": start[1]},
        "end": {"date": end[0], "half": end[1]},
    }


def make(*, deleted: bool = False, **fields: Any) -> Absence:
    return absence_from_data("acme", deleted, absence_data(**fields))


def from_event(event_type: str, **fields: Any) -> Absence:
    doc = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "https://hr.example.com",
        "type": event_type,
        "tenant": "acme",
        "data": absence_data(**fields),
    }
    return parse_event(json.dumps(doc).encode()).absence


def config(**fields: Any) -> SyncConfig:
    return SyncConfig(id=CONFIG_ID, tenant="acme", provider="microsoft365", **fields)


def must_render(absence: Absence, cfg: SyncConfig) -> DesiredEvent:
    desired = render(absence, cfg)
    assert desired is not None
    return desired


def local(day: str, hhmm: str = "00:00") -> dt.datetime:
    return dt.datetime.combine(dt.date.fromisoformat(day), dt.time.fromisoformat(hhmm))


def utc(day: str, hhmm: str) -> dt.datetime:
    return local(day, hhmm).replace(tzinfo=UTC)


# --- rule 5.2: label ------------------------------------------------------------

LABEL_CASES = list(itertools.product([True, False], [True, False], [None, "Out of office"]))


def _label_id(case: tuple[bool, bool, str | None]) -> str:
    hide, public, hidden = case
    return f"hide_labels={hide}-public_reason={public}-hidden_label={hidden or 'default'}"


@pytest.mark.parametrize(
    ("hide_labels", "public_reason", "hidden_label"), LABEL_CASES,
    ids=[_label_id(c) for c in LABEL_CASES],
)
def test_label(hide_labels: bool, public_reason: bool, hidden_label: str | None) -> None:
    # Spec: account name if hide_labels is false or public_reason is true; else hidden_label.
    shown = (not hide_labels) or public_reason
    expected = "Paid leave" if shown else (hidden_label or "Absent")
    extra = {"hidden_label": hidden_label} if hidden_label else {}
    cfg = config(hide_labels=hide_labels, **extra)
    absence = make(public_reason=public_reason)
    assert label(absence, cfg) == expected
    assert must_render(absence, cfg).subject == expected


def test_default_configuration_hides_labels() -> None:
    assert must_render(make(name="Sick leave"), config()).subject == "Absent"


# --- rule 5.3: show-as ----------------------------------------------------------

# The spec table, symbolically: (counted, status) -> what to show.
SHOW_AS_TABLE = {
    (True, "approved"): "busy_as",
    (True, "pending"): "tentative",
    (False, "approved"): "free_as",
    (False, "pending"): "free_as",
}
SHOW_AS_CASES = list(
    itertools.product([True, False], ["pending", "approved"], ["busy", "oof"],
                      ["free", "workingElsewhere"])
)


@pytest.mark.parametrize(
    ("counted", "status", "busy_as", "free_as"), SHOW_AS_CASES,
    ids=[f"counted={c}-{s}-busy_as={b}-free_as={f}" for c, s, b, f in SHOW_AS_CASES],
)
def test_show_as(counted: bool, status: str, busy_as: str, free_as: str) -> None:
    symbol = SHOW_AS_TABLE[(counted, status)]
    expected = {"busy_as": busy_as, "free_as": free_as, "tentative": "tentative"}[symbol]
    cfg = config(busy_as=busy_as, free_as=free_as)
    absence = make(counted=counted, status=status)
    assert show_as(absence, cfg) == expected
    assert must_render(absence, cfg).show_as == expected


# --- rule 5.1: wanted -----------------------------------------------------------

SCOPES: dict[str, list[str] | None] = {
    "in-scope": ["lyon", "paris"],
    "out-of-scope": ["lyon", "nantes"],
    "all-establishments": None,
}
WANTED_CASES = list(
    itertools.product(["absence.upserted", "absence.deleted"],
                      ["pending", "approved", "denied", "cancelled"], [True, False], SCOPES)
)


@pytest.mark.parametrize(
    ("event_type", "status", "sync_pending", "scope"), WANTED_CASES,
    ids=[f"{t.split('.')[1]}-{s}-sync_pending={p}-{sc}" for t, s, p, sc in WANTED_CASES],
)
def test_wanted(event_type: str, status: str, sync_pending: bool, scope: str) -> None:
    expected = not (
        event_type == "absence.deleted"
        or status in ("denied", "cancelled")
        or (status == "pending" and not sync_pending)
        or scope == "out-of-scope"
    )
    absence = from_event(event_type, status=status, establishment="paris")
    cfg = config(sync_pending=sync_pending, establishments=SCOPES[scope])
    assert wanted(absence, cfg) is expected
    desired = render(absence, cfg)
    assert (desired is not None) is expected
    if desired is not None:
        assert desired.mark == Mark(CONFIG_ID, "abs-1234")


@pytest.mark.parametrize(
    ("status", "expected"), [("pending", False), ("approved", True)], ids=["pending", "approved"]
)
def test_sync_pending_false(status: str, expected: bool) -> None:
    assert (render(make(status=status), config(sync_pending=False)) is not None) is expected


@pytest.mark.parametrize("status", ["denied", "cancelled"])
def test_denied_and_cancelled_render_nothing(status: str) -> None:
    assert render(make(status=status), config()) is None


def test_deleted_renders_nothing() -> None:
    assert render(make(deleted=True), config()) is None
    # Even if a deleted absence still carried its details, deletion wins.
    assert render(dataclasses.replace(make(), deleted=True), config()) is None


def test_empty_establishment_list_puts_nothing_in_scope() -> None:
    # Resolved ambiguity: only an absent list means "all"; an explicit [] scopes to none.
    assert render(make(), config(establishments=[])) is None


# --- rule 5.1 over versions: leaving the wanted set deletes -----------------------

LEAVES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "moves-out-of-scope": ({"establishment": "lyon"}, {"establishments": ["paris"]}),
    "cancelled": ({"status": "cancelled"}, {}),
    "denied": ({"status": "denied"}, {}),
    "back-to-pending-without-sync-pending": ({"status": "pending"}, {"sync_pending": False}),
    "deleted": ({"deleted": True}, {}),
}


@pytest.mark.parametrize(("later", "cfg_fields"), LEAVES.values(), ids=list(LEAVES))
def test_absence_leaving_the_wanted_set_is_deleted(
    later: dict[str, Any], cfg_fields: dict[str, Any]
) -> None:
    cfg = config(**cfg_fields)
    first = must_render(make(version=1, establishment="paris", status="approved"), cfg)
    recorded = Recorded("evt-1", first.mailbox, first.content_hash())
    assert plan(first, recorded) == Noop()
    second = render(make(version=2, **{"establishment": "paris", **later}), cfg)
    assert second is None
    assert plan(second, recorded) == Delete(EMAIL, "evt-1")


# --- rule 5.4: timing -----------------------------------------------------------

def _span(text: str) -> tuple[dt.time, dt.time]:
    a, b = text.split("-")
    return dt.time.fromisoformat(a), dt.time.fromisoformat(b)


def spec_timing(
    start: tuple[str, str], end: tuple[str, str], timed: bool, morning: str, afternoon: str
) -> tuple[bool, dt.datetime, dt.datetime]:
    """Section 5.4 read independently: (all_day, start, end) in local wall-clock time."""
    (d1, h1), (d2, h2) = start, end
    day1, day2 = dt.date.fromisoformat(d1), dt.date.fromisoformat(d2)
    am, pm = _span(morning), _span(afternoon)
    whole_days = h1 == "am" and h2 == "pm"
    if whole_days and (day1 != day2 or not timed):
        return (True, dt.datetime.combine(day1, dt.time()),
                dt.datetime.combine(day2 + dt.timedelta(days=1), dt.time()))
    return (
        False,
        dt.datetime.combine(day1, am[0] if h1 == "am" else pm[0]),
        dt.datetime.combine(day2, am[1] if h2 == "am" else pm[1]),
    )


SPANS = {"default-spans": ("09:00-12:30", "13:30-18:00"),
         "custom-spans": ("08:15-12:00", "14:00-17:45")}
HALVES = [("am", "pm"), ("am", "am"), ("pm", "pm"), ("pm", "am")]
DATES = {"single-date": ("2026-12-01", "2026-12-01"), "several-dates": ("2026-12-01", "2026-12-03")}
TIMING_CASES = [
    (halves, dates, timed, spans)
    for halves, dates, timed, spans in itertools.product(HALVES, DATES, [False, True], SPANS)
    if not (halves == ("pm", "am") and dates == "single-date")  # that one is invalid
]


@pytest.mark.parametrize(
    ("halves", "dates", "timed", "spans"), TIMING_CASES,
    ids=[f"{h[0]}-to-{h[1]}-{d}-whole_days_as_timed={t}-{s}" for h, d, t, s in TIMING_CASES],
)
def test_timing_product(halves: tuple[str, str], dates: str, timed: bool, spans: str) -> None:
    morning, afternoon = SPANS[spans]
    d1, d2 = DATES[dates]
    start, end = (d1, halves[0]), (d2, halves[1])
    desired = must_render(
        make(start=start, end=end),
        config(whole_days_as_timed=timed, morning=morning, afternoon=afternoon),
    )
    assert (desired.all_day, desired.start, desired.end) == spec_timing(
        start, end, timed, morning, afternoon
    )


# The same rule as literal rows, so the product above cannot share a mistake with the code.
TIMING_LITERAL: list[tuple[str, tuple[str, str], tuple[str, str], bool, bool, str, str]] = [
    ("whole-days-several-dates", ("2026-12-01", "am"), ("2026-12-03", "pm"), False,
     True, "2026-12-01 00:00", "2026-12-04 00:00"),
    ("whole-days-several-dates-timed-flag-ignored", ("2026-12-01", "am"), ("2026-12-03", "pm"),
     True, True, "2026-12-01 00:00", "2026-12-04 00:00"),
    ("whole-days-across-month-and-year-end", ("2026-12-30", "am"), ("2026-12-31", "pm"), False,
     True, "2026-12-30 00:00", "2027-01-01 00:00"),
    ("single-whole-day-all-day", ("2026-12-01", "am"), ("2026-12-01", "pm"), False,
     True, "2026-12-01 00:00", "2026-12-02 00:00"),
    ("single-whole-day-timed", ("2026-12-01", "am"), ("2026-12-01", "pm"), True,
     False, "2026-12-01 09:00", "2026-12-01 18:00"),
    ("morning-only", ("2026-12-01", "am"), ("2026-12-01", "am"), False,
     False, "2026-12-01 09:00", "2026-12-01 12:30"),
    ("afternoon-only", ("2026-12-01", "pm"), ("2026-12-01", "pm"), False,
     False, "2026-12-01 13:30", "2026-12-01 18:00"),
    ("afternoon-to-next-morning", ("2026-12-01", "pm"), ("2026-12-02", "am"), False,
     False, "2026-12-01 13:30", "2026-12-02 12:30"),
    ("morning-to-morning-several-dates", ("2026-12-01", "am"), ("2026-12-03", "am"), False,
     False, "2026-12-01 09:00", "2026-12-03 12:30"),
    ("afternoon-to-afternoon-several-dates", ("2026-12-01", "pm"), ("2026-12-03", "pm"), True,
     False, "2026-12-01 13:30", "2026-12-03 18:00"),
]


@pytest.mark.parametrize(
    ("start", "end", "timed", "all_day", "begin", "finish"),
    [row[1:] for row in TIMING_LITERAL], ids=[row[0] for row in TIMING_LITERAL],
)
def test_timing_literal(
    start: tuple[str, str], end: tuple[str, str], timed: bool, all_day: bool,
    begin: str, finish: str,
) -> None:
    desired = must_render(make(start=start, end=end), config(whole_days_as_timed=timed))
    assert desired.all_day is all_day
    assert desired.start == local(*begin.split())
    assert desired.end == local(*finish.split())


def test_custom_spans_literal() -> None:
    cfg = config(morning="07:30-11:45", afternoon="12:15-16:00", whole_days_as_timed=True)
    single = must_render(make(start=("2026-12-01", "am"), end=("2026-12-01", "pm")), cfg)
    assert single.start == local("2026-12-01", "07:30")
    assert single.end == local("2026-12-01", "16:00")
    half = must_render(make(start=("2026-12-01", "pm"), end=("2026-12-02", "am")), cfg)
    assert half.start == local("2026-12-01", "12:15")
    assert half.end == local("2026-12-02", "11:45")


# --- rule 5.4: zones and daylight saving ----------------------------------------

ZONE_CASES: list[tuple[str, str | None, str | None, str, str, str]] = [
    # id, employee zone, config zone (None = default), expected zone, UTC start, UTC end
    ("employee-zone-wins", "America/New_York", "Europe/Paris",
     "America/New_York", "2026-12-01 18:30", "2026-12-01 23:00"),
    ("employee-zone-with-default-config", "Asia/Tokyo", None,
     "Asia/Tokyo", "2026-12-01 04:30", "2026-12-01 09:00"),
    ("config-zone-when-employee-gives-none", None, "Europe/Paris",
     "Europe/Paris", "2026-12-01 12:30", "2026-12-01 17:00"),
    ("utc-default", None, None, "UTC", "2026-12-01 13:30", "2026-12-01 18:00"),
]


@pytest.mark.parametrize(
    ("employee_zone", "config_zone", "zone", "utc_start", "utc_end"),
    [c[1:] for c in ZONE_CASES], ids=[c[0] for c in ZONE_CASES],
)
def test_zone(
    employee_zone: str | None, config_zone: str | None, zone: str, utc_start: str, utc_end: str
) -> None:
    cfg = config(**({"time_zone": config_zone} if config_zone else {}))
    afternoon = make(time_zone=employee_zone, start=("2026-12-01", "pm"), end=("2026-12-01", "pm"))
    desired = must_render(afternoon, cfg)
    assert desired.time_zone == zone
    assert desired.start == local("2026-12-01", "13:30")
    assert desired.end == local("2026-12-01", "18:00")
    assert desired.utc_bounds() == (utc(*utc_start.split()), utc(*utc_end.split()))


DST_CASES = [
    ("day-before-spring-forward", "2026-03-28", "08:00", "17:00"),
    ("spring-forward-day", "2026-03-29", "07:00", "16:00"),
    ("day-after-spring-forward", "2026-03-30", "07:00", "16:00"),
    ("day-before-fall-back", "2026-10-24", "07:00", "16:00"),
    ("fall-back-day", "2026-10-25", "08:00", "17:00"),
]


@pytest.mark.parametrize(
    ("day", "utc_start", "utc_end"), [c[1:] for c in DST_CASES], ids=[c[0] for c in DST_CASES]
)
@pytest.mark.parametrize("zone_from", ["employee", "config"])
def test_daylight_saving_keeps_wall_clock(
    zone_from: str, day: str, utc_start: str, utc_end: str
) -> None:
    cfg = config(whole_days_as_timed=True, morning="09:00-12:30", afternoon="13:30-18:00",
                 **({"time_zone": "Europe/Paris"} if zone_from == "config" else {}))
    absence = make(time_zone="Europe/Paris" if zone_from == "employee" else None,
                   start=(day, "am"), end=(day, "pm"))
    desired = must_render(absence, cfg)
    assert desired.time_zone == "Europe/Paris"
    assert (desired.start, desired.end) == (local(day, "09:00"), local(day, "18:00"))
    assert desired.utc_bounds() == (utc(day, utc_start), utc(day, utc_end))


def test_all_day_event_across_a_daylight_saving_change() -> None:
    desired = must_render(make(start=("2026-03-28", "am"), end=("2026-03-29", "pm")), config())
    assert desired.all_day
    assert (desired.start, desired.end) == (local("2026-03-28"), local("2026-03-30"))
    assert desired.utc_bounds() == (utc("2026-03-27", "23:00"), utc("2026-03-29", "22:00"))


@pytest.mark.parametrize(
    ("zone", "start", "end", "afternoon"),
    [
        ("Etc/GMT+12", ("9999-12-30", "am"), ("9999-12-30", "pm"), "13:30-23:59"),
        ("Etc/GMT+12", ("9999-12-29", "pm"), ("9999-12-30", "pm"), "13:30-23:59"),
        ("Pacific/Kiritimati", ("0001-01-02", "am"), ("0001-01-02", "pm"), "13:30-18:00"),
        ("Pacific/Kiritimati", ("0001-01-02", "am"), ("0001-01-02", "am"), "13:30-18:00"),
    ],
    ids=["last-date-all-day-utc-12", "last-date-timed-utc-12", "first-date-all-day-utc+14",
         "first-date-morning-utc+14"],
)
def test_extreme_dates_render_without_overflow(
    zone: str, start: tuple[str, str], end: tuple[str, str], afternoon: str
) -> None:
    desired = must_render(make(time_zone=zone, start=start, end=end), config(afternoon=afternoon))
    begin, finish = desired.utc_bounds()
    assert begin < finish
    assert len(desired.content_hash()) == 64


# --- rule 5.5: target calendar --------------------------------------------------

MAILBOX_CASES = [
    ("email", None, EMAIL),
    ("calendar-address-override", OVERRIDE, OVERRIDE),
]


@pytest.mark.parametrize(
    ("calendar_address", "mailbox"), [c[1:] for c in MAILBOX_CASES],
    ids=[c[0] for c in MAILBOX_CASES],
)
def test_mailbox(calendar_address: str | None, mailbox: str) -> None:
    assert must_render(make(calendar_address=calendar_address), config()).mailbox == mailbox


def test_calendar_address_override_through_parse_event() -> None:
    absence = from_event("absence.upserted", calendar_address=OVERRIDE)
    assert must_render(absence, config()).mailbox == OVERRIDE


ADDRESS_CHANGES = [
    ("email-to-override", None, OVERRIDE, EMAIL, OVERRIDE),
    ("override-to-email", OVERRIDE, None, OVERRIDE, EMAIL),
    ("override-to-other-override", OVERRIDE, "jane.d@acme.fr", OVERRIDE, "jane.d@acme.fr"),
]


@pytest.mark.parametrize(
    ("before", "after", "old_mailbox", "new_mailbox"), [c[1:] for c in ADDRESS_CHANGES],
    ids=[c[0] for c in ADDRESS_CHANGES],
)
def test_address_change_moves_the_event(
    before: str | None, after: str | None, old_mailbox: str, new_mailbox: str
) -> None:
    cfg = config()
    first = must_render(make(version=1, calendar_address=before), cfg)
    assert first.mailbox == old_mailbox
    recorded = Recorded("evt-1", first.mailbox, first.content_hash())
    second = must_render(make(version=2, calendar_address=after), cfg)
    assert second.mailbox == new_mailbox
    assert second.content_hash() == first.content_hash()  # only the mailbox changed
    assert plan(second, recorded) == Move(old_mailbox, "evt-1", second)


def test_address_case_change_is_not_a_move() -> None:
    # Addresses are compared case-insensitively: a re-capitalised e-mail is the same mailbox.
    cfg = config()
    first = must_render(make(version=1, email="Jane.Doe@ACME.com"), cfg)
    recorded = Recorded("evt-1", first.mailbox, first.content_hash())
    second = must_render(make(version=2, email="jane.doe@acme.com"), cfg)
    assert plan(second, recorded) == Noop()


# --- rule 5.6: quiet events, private and category -------------------------------

PRIVACY_CASES = list(itertools.product([False, True], [None, "Absences RH"]))


@pytest.mark.parametrize(
    ("private", "category"), PRIVACY_CASES,
    ids=[f"private={p}-category={c or 'none'}" for p, c in PRIVACY_CASES],
)
def test_private_and_category(private: bool, category: str | None) -> None:
    desired = must_render(make(), config(private=private, category=category))
    assert desired.private is private
    assert desired.category == category


@pytest.mark.parametrize(
    ("category", "expected"),
    [("", None), ("  \n\t ", None), ("\u202e\u200b", None), ("\u202eHR\x00 leave\n", "HR leave")],
    ids=["empty", "blank", "only-invisible", "hostile"],
)
def test_category_is_cleaned(category: str, expected: str | None) -> None:
    assert must_render(make(), config(category=category)).category == expected


def test_no_hr_text_reaches_the_event() -> None:
    data = absence_data(display_name="Dr. Who: chemotherapy", name="Medical leave")
    data["comment"] = "surgery follow-up"
    absence = absence_from_data("acme", False, data)
    desired = must_render(absence, config())
    text = repr(desired)
    for secret in ("chemotherapy", "surgery", "Medical leave"):
        assert secret not in text
    names = {f.name for f in dataclasses.fields(DesiredEvent)}
    assert not names & {"body", "description", "attendees", "reminder", "organizer"}


def test_ownership_mark() -> None:
    desired = must_render(make(absence_id="abs-77"), config())
    assert desired.mark == Mark(CONFIG_ID, "abs-77")
    assert desired.mark.value == f"absence-sync:{CONFIG_ID}:abs-77"


def test_marks_of_ids_holding_colons_do_not_collide() -> None:
    """Written as plain `absence-sync:{config}:{absence}`, these two were one mark."""
    left, right = Mark("acme:o365", "abs-1"), Mark("acme", "o365:abs-1")
    assert left.legacy_value == right.legacy_value  # the old, ambiguous form
    assert left.value != right.value
    assert left.value == "absence-sync:acme%3Ao365:abs-1"
    assert right.value == "absence-sync:acme:o365%3Aabs-1"
    assert Mark("cfg", "50%:x").value == "absence-sync:cfg:50%25%3Ax"


def test_marks_without_colons_keep_their_old_text() -> None:
    """Events written before the encoding keep their content hash and their mark."""
    mark = Mark("acme-o365", "abs-1234")
    assert mark.value == mark.legacy_value == "absence-sync:acme-o365:abs-1234"
    assert mark.values == (mark.value,)
    odd = Mark("acme-o365", "abs:1")
    assert odd.values == ("absence-sync:acme-o365:abs%3A1", "absence-sync:acme-o365:abs:1")


_ID_TEXT = st.text(alphabet=st.sampled_from(":%3Aa25-\u00e9"), max_size=8)


@given(_ID_TEXT, _ID_TEXT, _ID_TEXT, _ID_TEXT)
def test_mark_values_are_injective(a: str, b: str, c: str, d: str) -> None:
    first, second = Mark(a, b), Mark(c, d)
    assert (first.value == second.value) == (first == second)
    assert Mark.parse(first.value) == first


@given(st.text(max_size=40), st.text(max_size=40))
def test_mark_round_trips(config_id: str, absence_id: str) -> None:
    mark = Mark(config_id, absence_id)
    assert Mark.parse(mark.value) == mark
    assert mark.value in mark.values and mark.legacy_value in mark.values


# --- hostile labels --------------------------------------------------------------

FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
HOSTILE_LABELS: list[tuple[str, str, str]] = [
    ("newlines-and-tabs", "Paid\nleave\t(2026)\r\n", "Paid leave (2026)"),
    ("nul-bell-escape", "\x00Paid\x07 leave\x1b[31m", "Paid leave [31m"),
    ("c1-controls", "Paid\x85leave\x9b\x7f", "Paid leave"),
    ("right-to-left-override", "\u202eevael diaP", "evael diaP"),
    ("all-embeddings-and-overrides", "\u202aA\u202bB\u202cC\u202dD\u202eE", "A B C D E"),
    ("bidi-isolates", "\u2066A\u2067B\u2068C\u2069", "A B C"),
    ("bidi-marks", "A\u200eB\u200fC\u061cD", "A B C D"),
    ("zero-width", "Paid\u200bleave\u200c\u200d", "Paid leave"),
    ("line-paragraph-separators", "Paid\u2028leave\u2029", "Paid leave"),
    ("bom-and-soft-hyphen", "\ufeffUr\u00adlaub", "Urlaub"),
    ("invisible-tag-characters", "Paid leave\U000e0041\U000e0042\U000e007f", "Paid leave"),
    ("lone-surrogate", "Paid \ud800leave", "Paid leave"),
    ("exotic-spaces", "Paid\u00a0leave\u3000now", "Paid leave now"),
    ("only-invisible-falls-back", "\x00\n\u202e\u200b", "Absent"),
    ("10k-chars", "A" * 10_000, "A" * 255),
    ("10k-words", "word " * 2_000, ("word " * 51).rstrip()),
    ("10k-controls-then-text", "\x01" * 10_000 + "Paid leave", "Paid leave"),
    ("unicode-text-kept", "Congé payé 🌴 日本語 إجازة", "Congé payé 🌴 日本語 إجازة"),
    ("markup-kept-as-plain-text", "<b>Paid</b> & leave", "<b>Paid</b> & leave"),
]


def _assert_clean(text: str) -> None:
    assert 0 < len(text) <= 255
    assert text == text.strip() and "  " not in text
    assert not [c for c in text if unicodedata.category(c) in FORBIDDEN_CATEGORIES]


@pytest.mark.parametrize(
    ("name", "expected"), [c[1:] for c in HOSTILE_LABELS], ids=[c[0] for c in HOSTILE_LABELS]
)
def test_hostile_account_name(name: str, expected: str) -> None:
    subject = must_render(make(name=name), config(hide_labels=False)).subject
    assert subject == expected
    _assert_clean(subject)


@pytest.mark.parametrize(
    ("name", "expected"), [c[1:] for c in HOSTILE_LABELS], ids=[c[0] for c in HOSTILE_LABELS]
)
def test_clean_label(name: str, expected: str) -> None:
    assert clean_label(name) == expected


def test_unreadable_public_name_falls_back_to_the_hidden_label() -> None:
    cfg = config(hide_labels=True, hidden_label="Away")
    absence = make(name="\u202e\u200b\n", public_reason=True)
    assert must_render(absence, cfg).subject == "Away"


def test_hostile_hidden_label_is_cleaned() -> None:
    subject = must_render(make(), config(hidden_label="\u202eAway\r\nfrom desk\x00")).subject
    assert subject == "Away from desk"
    _assert_clean(subject)


def test_hidden_label_never_leaks_the_hostile_name() -> None:
    desired = must_render(make(name="\u202eSecret\nreason" * 1000), config(hide_labels=True))
    assert desired.subject == "Absent"


# --- content hash ----------------------------------------------------------------

def _base_desired() -> DesiredEvent:
    return must_render(make(start=("2026-12-01", "pm"), end=("2026-12-02", "am")), config())


HASH_CHANGES: dict[str, dict[str, Any]] = {
    "subject": {"subject": "Other"},
    "show_as": {"show_as": "oof"},
    "all_day": {"all_day": True},
    "start": {"start": local("2026-12-01", "14:30")},
    "end": {"end": local("2026-12-02", "11:30")},
    "start-date-only": {"start": local("2026-11-30", "13:30")},
    "time_zone": {"time_zone": "Europe/London"},
    "private": {"private": True},
    "category": {"category": "HR"},
    "mark-config": {"mark": Mark("other-config", "abs-1234")},
    "mark-absence": {"mark": Mark(CONFIG_ID, "abs-9999")},
}


@pytest.mark.parametrize("change", HASH_CHANGES.values(), ids=list(HASH_CHANGES))
def test_content_hash_changes_with_every_written_field(change: dict[str, Any]) -> None:
    base = _base_desired()
    changed = dataclasses.replace(base, **change)
    assert changed != base
    assert changed.content_hash() != base.content_hash()


def test_content_hash_ignores_the_mailbox() -> None:
    base = _base_desired()
    assert dataclasses.replace(base, mailbox="other@acme.com").content_hash() == base.content_hash()


def test_content_hash_is_stable() -> None:
    assert _base_desired().content_hash() == _base_desired().content_hash()


HALF_DAY = {"start": ("2026-12-01", "pm"), "end": ("2026-12-01", "pm")}
SINGLE_DAY = {"start": ("2026-12-01", "am"), "end": ("2026-12-01", "pm")}
RENDER_CHANGES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], bool]] = [
    # id, absence fields, config before, config after, hash changes
    ("hide_labels", {}, {}, {"hide_labels": False}, True),
    ("hidden_label", {}, {}, {"hidden_label": "Away"}, True),
    ("whole_days_as_timed", SINGLE_DAY, {}, {"whole_days_as_timed": True}, True),
    ("morning", {"start": ("2026-12-01", "am"), "end": ("2026-12-01", "am")}, {},
     {"morning": "08:00-12:00"}, True),
    ("afternoon", HALF_DAY, {}, {"afternoon": "14:00-17:00"}, True),
    ("config-zone", {"time_zone": None}, {}, {"time_zone": "Europe/Paris"}, True),
    ("busy_as", {}, {}, {"busy_as": "oof"}, True),
    ("free_as", {"counted": False}, {}, {"free_as": "workingElsewhere"}, True),
    ("private", {}, {}, {"private": True}, True),
    ("category", {}, {}, {"category": "HR"}, True),
    ("config-zone-overridden-by-employee", {}, {}, {"time_zone": "Asia/Tokyo"}, False),
    ("timed-flag-on-several-days", {}, {}, {"whole_days_as_timed": True}, False),
    ("spans-on-all-day-event", {}, {}, {"morning": "08:00-12:00"}, False),
    ("establishment-list-still-in-scope", {}, {}, {"establishments": ["paris", "lyon"]}, False),
    ("sync_pending-for-approved", {}, {}, {"sync_pending": False}, False),
    ("free_as-for-counted", {}, {}, {"free_as": "workingElsewhere"}, False),
    ("hidden_label-when-shown", {}, {"hide_labels": False},
     {"hide_labels": False, "hidden_label": "Away"}, False),
]


@pytest.mark.parametrize(
    ("fields", "before", "after", "changes"), [c[1:] for c in RENDER_CHANGES],
    ids=[c[0] for c in RENDER_CHANGES],
)
def test_configuration_change_and_content_hash(
    fields: dict[str, Any], before: dict[str, Any], after: dict[str, Any], changes: bool
) -> None:
    absence = make(**fields)
    old = must_render(absence, config(**before))
    new = must_render(absence, config(**after))
    assert (new.content_hash() != old.content_hash()) is changes


ABSENCE_CHANGES: list[tuple[str, dict[str, Any], bool]] = [
    ("version-only", {"version": 4}, False),
    ("display-name", {"display_name": "Jane D."}, False),
    ("hidden-account-name", {"name": "Sick leave"}, False),
    ("status-pending", {"status": "pending"}, True),
    ("counted", {"counted": False}, True),
    ("public-reason", {"public_reason": True}, True),
    ("end-date", {"end": ("2026-12-04", "pm")}, True),
    ("end-half", {"end": ("2026-12-03", "am")}, True),
    ("employee-zone", {"time_zone": "Europe/London"}, True),
    ("calendar-address", {"calendar_address": OVERRIDE}, False),
]


@pytest.mark.parametrize(
    ("change", "changes"), [c[1:] for c in ABSENCE_CHANGES], ids=[c[0] for c in ABSENCE_CHANGES]
)
def test_absence_change_and_content_hash(change: dict[str, Any], changes: bool) -> None:
    cfg = config()
    old = must_render(make(), cfg)
    new = must_render(make(**change), cfg)
    assert (new.content_hash() != old.content_hash()) is changes
    recorded = Recorded("evt-1", old.mailbox, old.content_hash())
    action = plan(new, recorded)
    if new.mailbox != old.mailbox:
        assert action == Move(old.mailbox, "evt-1", new)
    elif changes:
        assert action == Update("evt-1", new)
    else:
        assert action == Noop()


def _reference_hash(event: DesiredEvent) -> str:
    """The content hash as first defined: SHA-256 of json.dumps of the fields."""
    import hashlib
    import json

    doc = {
        "subject": event.subject, "show_as": event.show_as, "all_day": event.all_day,
        "start": event.start.isoformat(), "end": event.end.isoformat(),
        "time_zone": event.time_zone, "private": event.private, "category": event.category,
        "mark": event.mark.value,
    }
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()


@given(
    subject=st.text(max_size=40), category=st.none() | st.text(max_size=20),
    absence_id=st.text(min_size=1, max_size=20), all_day=st.booleans(),
    private=st.booleans(),
)
def test_content_hash_is_unchanged_by_its_fast_spelling(
    subject: str, category: str | None, absence_id: str, all_day: bool, private: bool
) -> None:
    """Hashes recorded by earlier versions must still match: else every event
    would be rewritten once after an upgrade."""
    event = DesiredEvent(
        "a@example.com", subject, "busy", all_day, dt.datetime(2026, 12, 1, 9),
        dt.datetime(2026, 12, 1, 12, 30), "Europe/Paris", private, category,
        Mark("cfg:1", absence_id),
    )
    assert event.content_hash() == _reference_hash(event)
