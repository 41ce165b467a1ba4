"""Automatic replies (`auto_reply:`): the pure rules, as tables and properties.

Expected values are written from the rules (placeholders, return date,
schedule, one reply per mailbox, adjacent absences merged, never clobber),
never computed by the code under test.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.config import ConfigError, SyncConfig, load_file
from consumer.events import Absence, HalfDay, absence_from_data
from consumer.replies import (
    DISABLED,
    AutoReply,
    DesiredReply,
    DisableReply,
    KeepReply,
    NoReply,
    ReplyRecord,
    ReplySetting,
    UserReply,
    WriteReply,
    adjacent,
    desired_reply,
    plan_reply,
    reply_wanted,
    return_date,
)

UTC = dt.UTC
MAILBOX = "jane.doe@acme.com"
NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=UTC)  # a Friday


def config(**reply: Any) -> SyncConfig:
    option = {"internal": "{first_name} is away until {return_date}.", **reply}
    return SyncConfig(id="acme-o365", tenant="acme", provider="microsoft365",
                      provider_settings={"tenant_id": "t"}, auto_reply=option)


def absence(
    start: tuple[str, str], end: tuple[str, str], *, absence_id: str = "abs-1",
    status: str = "approved", account: str = "paid-leave", counted: bool = True,
    display_name: str | None = "Jane Doe", time_zone: str | None = "Europe/Paris",
    email: str = MAILBOX, version: int = 1,
) -> Absence:
    return absence_from_data("acme", False, {
        "id": absence_id, "version": version, "status": status,
        "employee": {"id": "emp-42", "email": email, "establishment_id": "paris",
                     "time_zone": time_zone, "display_name": display_name},
        "account": {"id": account, "name": "Paid leave", "counted_as_absence": counted},
        "start": {"date": start[0], "half": start[1]},
        "end": {"date": end[0], "half": end[1]},
    })


def one(absences: list[Absence], cfg: SyncConfig | None = None,
        now: dt.datetime = NOW) -> DesiredReply | None:
    return desired_reply(absences, cfg or config(), MAILBOX, now)


# --- configuration -------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "{first_name}", "{display_name}", "{start_date}", "{end_date}", "{return_date}",
    "Back on {return_date}, {display_name}.", "no placeholder at all",
])
def test_known_placeholders_are_accepted(text: str) -> None:
    assert config(internal=text).auto_reply is not None


@pytest.mark.parametrize(("text", "shown"), [
    ("Back {tomorrow}", "{tomorrow}"), ("{}", "{}"), ("{ first_name }", "{ first_name }"),
    ("{First_Name}", "{First_Name}"), ("{return_date:%d}", "{return_date:%d}"),
])
def test_unknown_placeholder_is_a_configuration_error_naming_file_id_and_field(
    tmp_path: Path, text: str, shown: str,
) -> None:
    path = tmp_path / "syncs.yaml"
    path.write_text(
        "syncs:\n  - id: acme-o365\n    tenant: acme\n    provider: microsoft365\n"
        "    microsoft365: {tenant_id: t}\n    auto_reply:\n"
        f"      internal: ok\n      external: {text!r}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_file(path)
    message = str(info.value)
    assert str(path) in message and "'acme-o365'" in message
    assert "auto_reply.external" in message and shown in message
    assert "{first_name}" in message  # the expected form


@pytest.mark.parametrize(("field", "value", "words"), [
    ("audience", "everyone", "none, known, all"),
    ("date_format", "dd/mm/yyyy", "strftime"),
    ("types", [], "leave type"),
    ("colour", "red", "colour"),
])
def test_bad_auto_reply_fields_are_refused(field: str, value: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        config(**{field: value})


def test_auto_reply_needs_a_mailbox_provider() -> None:
    with pytest.raises(ValueError, match="auto_reply"):
        SyncConfig(id="c", tenant="acme", provider="caldav",
                   provider_settings={"url": "https://dav.example.com/{email}/"},
                   secrets={"password": "x"}, auto_reply={"internal": "away"})


def test_configurations_without_auto_reply_keep_their_render_hash_fields() -> None:
    plain = SyncConfig(id="c", tenant="acme", provider="microsoft365",
                       provider_settings={"tenant_id": "t"})
    assert "auto_reply" not in plain.render_dict()
    assert "auto_reply" not in plain.public_dict()
    assert config().render_dict()["auto_reply"]["internal"].startswith("{first_name}")


# --- which absences get a reply -------------------------------------------------


@pytest.mark.parametrize(("status", "counted", "account", "types", "expected"), [
    ("approved", True, "paid-leave", None, True),
    ("pending", True, "paid-leave", None, False),
    ("denied", True, "paid-leave", None, False),
    ("cancelled", True, "paid-leave", None, False),
    ("approved", False, "remote", None, False),          # default: counted absences
    ("approved", False, "remote", ["remote"], True),     # listed types only
    ("approved", True, "paid-leave", ["sick-leave"], False),
])
def test_reply_wanted(status: str, counted: bool, account: str, types: list[str] | None,
                      expected: bool) -> None:
    cfg = config(types=types) if types is not None else config()
    item = absence(("2026-12-01", "am"), ("2026-12-01", "pm"), status=status,
                   counted=counted, account=account)
    assert reply_wanted(item, cfg) is expected


def test_no_option_no_reply() -> None:
    plain = SyncConfig(id="c", tenant="acme", provider="microsoft365",
                       provider_settings={"tenant_id": "t"})
    assert desired_reply([absence(("2026-12-01", "am"), ("2026-12-01", "pm"))], plain,
                         MAILBOX, NOW) is None


# --- return date and adjacency ------------------------------------------------------


@pytest.mark.parametrize(("end", "expected"), [
    (("2026-12-02", "pm"), "2026-12-03"),   # Wednesday afternoon -> Thursday
    (("2026-12-02", "am"), "2026-12-02"),   # Wednesday morning -> the same afternoon
    (("2026-12-04", "pm"), "2026-12-07"),   # Friday afternoon -> Monday
    (("2026-12-04", "am"), "2026-12-04"),   # Friday morning -> Friday afternoon
    (("2026-12-05", "am"), "2026-12-07"),   # Saturday morning -> Monday
    (("2026-12-06", "pm"), "2026-12-07"),   # Sunday -> Monday
])
def test_return_date(end: tuple[str, str], expected: str) -> None:
    half = HalfDay(dt.date.fromisoformat(end[0]), end[1])  # type: ignore[arg-type]
    assert return_date(half) == dt.date.fromisoformat(expected)


@pytest.mark.parametrize(("end", "start", "expected"), [
    (("2026-12-04", "pm"), ("2026-12-07", "am"), True),   # Friday -> Monday: weekend only
    (("2026-12-03", "pm"), ("2026-12-04", "am"), True),   # next morning
    (("2026-12-03", "am"), ("2026-12-03", "pm"), True),   # same afternoon
    (("2026-12-03", "pm"), ("2026-12-04", "pm"), False),  # Friday morning worked
    (("2026-12-04", "am"), ("2026-12-07", "am"), False),  # Friday afternoon worked
    (("2026-12-03", "pm"), ("2026-12-02", "am"), True),   # overlapping
])
def test_adjacent(end: tuple[str, str], start: tuple[str, str], expected: bool) -> None:
    e = HalfDay(dt.date.fromisoformat(end[0]), end[1])  # type: ignore[arg-type]
    s = HalfDay(dt.date.fromisoformat(start[0]), start[1])  # type: ignore[arg-type]
    assert adjacent(e, s) is expected


# --- schedule and messages ----------------------------------------------------------


def test_whole_days_are_scheduled_local_midnight_to_midnight() -> None:
    reply = one([absence(("2026-12-01", "am"), ("2026-12-03", "pm"))])
    assert reply is not None
    assert reply.setting.status == "scheduled"
    # Paris is UTC+1 in December
    assert reply.setting.start == dt.datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
    assert reply.setting.end == dt.datetime(2026, 12, 3, 23, 0, tzinfo=UTC)
    assert reply.setting.internal == "Jane is away until 2026-12-04."


def test_a_single_whole_day_is_midnight_to_midnight_even_when_events_are_timed() -> None:
    cfg = config()
    cfg = cfg.model_copy(update={"whole_days_as_timed": True})
    reply = one([absence(("2026-12-01", "am"), ("2026-12-01", "pm"))], cfg)
    assert reply is not None
    assert (reply.start, reply.end) == (dt.datetime(2026, 12, 1), dt.datetime(2026, 12, 2))


@pytest.mark.parametrize(("start", "end", "local_start", "local_end"), [
    (("2026-12-01", "am"), ("2026-12-01", "am"), "2026-12-01T09:00", "2026-12-01T12:30"),
    (("2026-12-01", "pm"), ("2026-12-02", "pm"), "2026-12-01T13:30", "2026-12-02T18:00"),
    (("2026-12-01", "am"), ("2026-12-02", "am"), "2026-12-01T09:00", "2026-12-02T12:30"),
])
def test_half_days_use_the_configured_times(
    start: tuple[str, str], end: tuple[str, str], local_start: str, local_end: str,
) -> None:
    reply = one([absence(start, end)])
    assert reply is not None
    assert reply.start == dt.datetime.fromisoformat(local_start)
    assert reply.end == dt.datetime.fromisoformat(local_end)
    assert reply.time_zone == "Europe/Paris"


def test_zone_falls_back_to_the_configuration() -> None:
    cfg = config().model_copy(update={"time_zone": "America/New_York"})
    reply = one([absence(("2026-12-01", "am"), ("2026-12-01", "am"), time_zone=None)], cfg)
    assert reply is not None
    assert reply.setting.start == dt.datetime(2026, 12, 1, 14, 0, tzinfo=UTC)


def test_placeholders_and_date_format() -> None:
    cfg = config(
        internal="{first_name}|{display_name}|{start_date}|{end_date}|{return_date}",
        external="Out until {return_date}", date_format="%d/%m/%Y", audience="known",
    )
    reply = one([absence(("2026-12-03", "pm"), ("2026-12-04", "pm"))], cfg)
    assert reply is not None
    assert reply.setting.internal == "Jane|Jane Doe|03/12/2026|04/12/2026|07/12/2026"
    assert reply.setting.external == "Out until 07/12/2026"
    assert reply.setting.audience == "known"


def test_names_fall_back_to_the_local_part_and_are_escaped_in_html() -> None:
    cfg = config(internal="{first_name}/{display_name}")
    reply = one([absence(("2026-12-01", "am"), ("2026-12-01", "pm"), display_name=None)], cfg)
    assert reply is not None and reply.setting.internal == "jane.doe/jane.doe"
    hostile = one([absence(("2026-12-01", "am"), ("2026-12-01", "pm"),
                           display_name="<b>Jo</b> & Co")], cfg)
    assert hostile is not None
    assert hostile.setting.internal == "&lt;b&gt;Jo&lt;/b&gt;/&lt;b&gt;Jo&lt;/b&gt; &amp; Co"


def test_external_defaults_to_internal() -> None:
    reply = one([absence(("2026-12-01", "am"), ("2026-12-01", "pm"))])
    assert reply is not None and reply.setting.external == reply.setting.internal


# --- one reply per mailbox -----------------------------------------------------------


def test_the_earliest_absence_not_ended_holds_the_mailbox() -> None:
    past = absence(("2026-11-16", "am"), ("2026-11-17", "pm"), absence_id="past")
    later = absence(("2026-12-14", "am"), ("2026-12-15", "pm"), absence_id="later")
    soon = absence(("2026-12-01", "am"), ("2026-12-02", "pm"), absence_id="soon")
    reply = one([later, past, soon])
    assert reply is not None and reply.absence_ids == ("soon",)
    assert reply.next_group_at == dt.datetime(2026, 12, 2, 23, 0, tzinfo=UTC)
    # once "soon" is over, "later" takes the mailbox
    after = one([later, past, soon], now=dt.datetime(2026, 12, 3, 8, tzinfo=UTC))
    assert after is not None and after.absence_ids == ("later",)
    assert after.next_group_at is None


def test_adjacent_absences_share_one_reply_covering_them_all() -> None:
    week = absence(("2026-11-30", "am"), ("2026-12-04", "pm"), absence_id="week")
    monday = absence(("2026-12-07", "am"), ("2026-12-07", "am"), absence_id="monday",
                     account="sick-leave", version=5)
    cfg = config(internal="{start_date} to {end_date}, back {return_date}")
    reply = one([monday, week], cfg)
    assert reply is not None
    assert reply.absence_ids == ("week", "monday")
    assert reply.setting.start == dt.datetime(2026, 11, 29, 23, 0, tzinfo=UTC)
    assert reply.setting.end == dt.datetime(2026, 12, 7, 11, 30, tzinfo=UTC)  # 12:30 Paris
    assert reply.setting.internal == "2026-11-30 to 2026-12-07, back 2026-12-07"


def test_a_working_half_day_between_keeps_replies_apart() -> None:
    a = absence(("2026-12-01", "am"), ("2026-12-02", "am"), absence_id="a")
    b = absence(("2026-12-03", "am"), ("2026-12-03", "pm"), absence_id="b")
    reply = one([a, b])
    assert reply is not None and reply.absence_ids == ("a",)


def test_other_mailboxes_and_unwanted_absences_are_ignored() -> None:
    other = absence(("2026-12-01", "am"), ("2026-12-01", "pm"), email="joe@acme.com")
    pending = absence(("2026-12-01", "am"), ("2026-12-01", "pm"), status="pending")
    assert one([other, pending]) is None


def test_an_ended_absence_wants_no_reply() -> None:
    done = absence(("2026-11-16", "am"), ("2026-11-17", "pm"))
    assert one([done]) is None


# --- never clobber ---------------------------------------------------------------------


def _desired() -> DesiredReply:
    reply = one([absence(("2026-12-01", "am"), ("2026-12-01", "pm"))])
    assert reply is not None
    return reply


def _as_stored(setting: ReplySetting) -> ReplySetting:
    """What a server that rewrites HTML holds after our write."""
    return ReplySetting(setting.status, setting.start, setting.end,
                        f"<html><body><div>{setting.internal}</div></body></html>",
                        f"<html><body><div>{setting.external}</div></body></html>",
                        setting.audience)


USER = ReplySetting("always", internal="<p>Gone fishing</p>", external="Gone fishing",
                    audience="all")


def test_plan_table() -> None:
    desired = _desired()
    stored = _as_stored(desired.setting)
    ours = ReplyRecord(stored.digest(), desired.content_hash())
    stale = ReplyRecord(stored.digest(), "an older wish")
    expired_user = ReplySetting("scheduled", NOW - dt.timedelta(days=9),
                                NOW - dt.timedelta(days=2), "old", "old", "all")
    rows: list[tuple[ReplySetting, DesiredReply | None, ReplyRecord | None, type]] = [
        (DISABLED, desired, None, WriteReply),
        (expired_user, desired, None, WriteReply),
        (stored, desired, ours, KeepReply),
        (stored, desired, stale, WriteReply),           # moved: reschedule ours
        (USER, desired, ours, UserReply),               # the employee's own reply
        (stored, desired, None, UserReply),             # no record: not provably ours
        (stored, None, ours, DisableReply),             # cancelled: disable ours
        (USER, None, ours, UserReply),                  # cancelled: theirs stays
        (DISABLED, None, ours, NoReply),
        (DISABLED, None, None, NoReply),
    ]
    for current, wish, record, expected in rows:
        assert type(plan_reply(current, wish, record, NOW)) is expected, (current, record)


def test_a_write_in_doubt_is_adopted_by_its_text() -> None:
    """A crash between our write and its record: the setting the server holds
    matches the intent's fingerprint (its HTML rewritten), so it is ours."""
    desired = _desired()
    record = ReplyRecord(None, None, intent=desired.setting.fingerprint())
    stored = _as_stored(desired.setting)
    assert type(plan_reply(stored, desired, record, NOW)) is WriteReply
    assert type(plan_reply(stored, None, record, NOW)) is DisableReply
    edited = ReplySetting(stored.status, stored.start, stored.end, "<p>Mine now</p>",
                          stored.external, stored.audience)
    assert type(plan_reply(edited, desired, record, NOW)) is UserReply


def test_force_rewrites_ours() -> None:
    desired = _desired()
    stored = _as_stored(desired.setting)
    ours = ReplyRecord(stored.digest(), desired.content_hash())
    assert type(plan_reply(stored, desired, ours, NOW, force=True)) is WriteReply


# --- properties ---------------------------------------------------------------------------

_days = st.integers(min_value=0, max_value=40)
_halves = st.sampled_from(["am", "pm"])


@st.composite
def absences(draw: st.DrawFn) -> list[Absence]:
    out: list[Absence] = []
    for index in range(draw(st.integers(min_value=0, max_value=5))):
        first = draw(_days)
        length = draw(st.integers(min_value=0, max_value=6))
        start = (dt.date(2026, 11, 16) + dt.timedelta(days=first))
        end = start + dt.timedelta(days=length)
        h1, h2 = draw(_halves), draw(_halves)
        if length == 0 and (h1, h2) == ("pm", "am"):
            h1, h2 = "am", "pm"
        out.append(absence((start.isoformat(), h1), (end.isoformat(), h2),
                           absence_id=f"a{index}",
                           status=draw(st.sampled_from(["approved", "approved", "pending"]))))
    return out


@given(absences(), st.integers(min_value=0, max_value=50 * 24))
def test_the_reply_covers_now_or_later_and_only_wanted_absences(
    items: list[Absence], hours: int,
) -> None:
    now = dt.datetime(2026, 11, 16, tzinfo=UTC) + dt.timedelta(hours=hours)
    reply = desired_reply(items, config(), MAILBOX, now)
    approved = [a for a in items if a.status == "approved"]
    if reply is None:
        return
    assert reply.setting.start is not None and reply.setting.end is not None
    assert reply.setting.end > now and reply.setting.start < reply.setting.end
    assert set(reply.absence_ids) <= {a.id for a in approved}
    # no wanted absence outside the group ends before it (it would be earlier)
    # while not over yet
    group = set(reply.absence_ids)
    for other in approved:
        if other.id in group:
            continue
        assert other.end is not None
        assert not adjacent(reply.last, other.start) or other.start.date < reply.first.date  # type: ignore[arg-type]
    assert return_date(reply.last) > reply.last.date or reply.last.half == "am"
    assert return_date(reply.last).weekday() < 5


@given(absences(), st.integers(min_value=0, max_value=50 * 24))
def test_order_of_absences_does_not_matter(items: list[Absence], hours: int) -> None:
    now = dt.datetime(2026, 11, 16, tzinfo=UTC) + dt.timedelta(hours=hours)
    assert desired_reply(items, config(), MAILBOX, now) == desired_reply(
        list(reversed(items)), config(), MAILBOX, now)


@given(st.text(max_size=200))
def test_any_text_without_braces_is_a_valid_template(text: str) -> None:
    text = text.replace("{", "").replace("}", "")
    if text.strip():
        assert AutoReply(internal=text).internal == text


@given(st.text(alphabet=st.characters(blacklist_characters="{}", blacklist_categories=("Cs",)),
               min_size=1, max_size=30))
def test_any_unknown_name_in_braces_is_refused(name: str) -> None:
    if name in ("first_name", "display_name", "start_date", "end_date", "return_date"):
        return
    with pytest.raises(ValueError, match="unknown placeholder"):
        AutoReply(internal=f"Hello {{{name}}}")
