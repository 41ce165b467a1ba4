"""The feed text as pure code: tokens, the window, ETags, and what `icalendar`
reads back from any feed, memoised or not."""

from __future__ import annotations

import dataclasses
import datetime as dt
from zoneinfo import ZoneInfo

import icalendar
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer import feeds, logs
from consumer.config import parse_sync
from consumer.events import Absence
from consumer.render import render, render_team
from tests.test_render import make

STAMP = dt.datetime(2026, 11, 2, 8, 30, tzinfo=dt.UTC)
CONFIG = parse_sync("test", {"id": "acme-feed", "tenant": "acme", "provider": "ics",
                             "category": "Absence", "types": {"remote": {"private": True}}})


def spec(employee: str | None = "jane.doe@acme.com", **changes: object) -> feeds.FeedSpec:
    base = feeds.FeedSpec("f1", "Absences", employee, CONFIG, 3, STAMP)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def key(absence: Absence) -> feeds.FeedKey:
    return feeds.FeedKey(absence.id, absence.version, STAMP)


WINDOW = feeds.Window(dt.date(2026, 1, 1), dt.date(2028, 12, 31))


def test_tokens_have_256_random_bits_and_a_recognisable_prefix() -> None:
    ids, texts = zip(*(feeds.new_feed_token() for _ in range(50)), strict=True)
    assert len(set(texts)) == 50 and len(set(ids)) == 50
    for text in texts:
        assert text.startswith("absfeed_") and len(text) == len("absfeed_") + 43
        assert feeds.looks_like_feed_token(text)
        assert feeds.token_of(f"https://x.example/feeds/{text}.ics") == text
        assert feeds.token_of(f"/feeds/{text}.ics?x=1") == text
        assert feeds.token_of(text) == text
    assert feeds.feed_token_hash("a") == feeds.feed_token_hash("a") != feeds.feed_token_hash("b")
    for bad in ("absfeed_", "absfeed_short", "absync_" + "A" * 43, "absfeed_" + "A" * 42 + "/",
                "absfeed_" + "\u00e9" * 43, "https://x.example/feeds/abc.ics"):
        assert not feeds.looks_like_feed_token(bad) or feeds.token_of(bad) is None, bad


def test_feed_tokens_never_reach_a_log_line() -> None:
    _, token = feeds.new_feed_token()
    line = logs.redact_text(f"GET https://sync.example/feeds/{token}.ics failed")
    assert token not in line and token[len("absfeed_"):][:10] not in line
    assert line == "GET https://sync.example/feeds/[redacted].ics failed"


def test_feed_urls() -> None:
    assert feeds.feed_url("https://sync.example/", "absfeed_x") == (
        "https://sync.example/feeds/absfeed_x.ics")


@pytest.mark.parametrize(
    ("today", "start", "end"),
    [
        (dt.date(2026, 12, 1), dt.date(2026, 9, 2), dt.date(2028, 12, 1)),
        (dt.date(2028, 2, 29), dt.date(2027, 12, 1), dt.date(2030, 2, 28)),
    ],
)
def test_window(today: dt.date, start: dt.date, end: dt.date) -> None:
    window = feeds.Window.around(today)
    assert (window.start, window.end) == (start, end)
    assert window.touches(start - dt.timedelta(days=5), start)
    assert not window.touches(start - dt.timedelta(days=5), start - dt.timedelta(days=1))
    assert window.touches(end, end + dt.timedelta(days=3))
    assert not window.touches(end + dt.timedelta(days=1), end + dt.timedelta(days=3))


@pytest.mark.parametrize(
    ("header", "matches"),
    [('"abc"', True), ('W/"abc"', True), ('"x", "abc"', True), ("*", True), ('"x"', False),
     ("", False), (None, False), ("abc", False)],
)
def test_if_none_match(header: str | None, matches: bool) -> None:
    assert feeds.etag_matches(header, '"abc"') is matches


def test_etag_follows_every_input() -> None:
    base = feeds.etag(spec(), WINDOW, "2:abc")
    assert base == feeds.etag(spec(), WINDOW, "2:abc")
    others = [
        feeds.etag(spec(), WINDOW, "2:abd"),
        feeds.etag(spec(revision=4), WINDOW, "2:abc"),
        feeds.etag(spec(name="Other"), WINDOW, "2:abc"),
        feeds.etag(spec(employee=None), WINDOW, "2:abc"),
        feeds.etag(spec(feed_id="f2"), WINDOW, "2:abc"),
        feeds.etag(spec(), dataclasses.replace(WINDOW, start=dt.date(2026, 1, 2)), "2:abc"),
    ]
    assert len({base, *others}) == 1 + len(others)


@pytest.mark.parametrize(
    ("given_address", "stored"),
    [("Jane.Doe@Acme.com", "jane.doe@acme.com"), ("  a@b.c ", "a@b.c")],
)
def test_employee_addresses(given_address: str, stored: str) -> None:
    assert feeds.normalise_employee(given_address) == stored


@pytest.mark.parametrize("bad", ["", "jane", "@acme.com", "jane@", "ja ne@acme.com",
                                 "x" * 320 + "@a.b"])
def test_bad_employee_addresses(bad: str) -> None:
    with pytest.raises(ValueError, match="not an e-mail address"):
        feeds.normalise_employee(bad)


def test_names() -> None:
    assert feeds.feed_name(None, employee="jane@acme.com", config_id="c") == (
        "Absences of jane@acme.com")
    assert feeds.feed_name(None, employee=None, config_id="c") == "Team absences (c)"
    assert feeds.feed_name("Équipe\u202e\nParis", employee=None, config_id="c") == (
        "Équipe Paris")
    assert feeds.clean_name(" \u202e ") is None


def test_memoised_text_is_the_rendered_text() -> None:
    absences = [
        make(absence_id="a1"),
        make(absence_id="a2", status="pending", start=("2026-12-04", "pm"),
             end=("2026-12-04", "pm")),
        make(absence_id="a3", email="john@acme.com"),
    ]
    items = [(key(a), a) for a in absences]
    feeds.EVENTS.clear()
    fresh = feeds.render_feed(spec(), items, WINDOW)
    assert len(feeds.EVENTS) == 3  # one memo entry per absence, None for John's
    memoised = feeds.render_feed(spec(), items, WINDOW)
    assert memoised == fresh
    # nothing parsed at all: the memo alone gives the feed
    known, missing = feeds.lookup(spec(), [k for k, _ in items])
    assert missing == []
    assert feeds.build(spec(), [k for k, _ in items], known, {}, WINDOW) == fresh
    # a new version is rendered again
    newer = dataclasses.replace(absences[0], version=2, status="cancelled")
    changed = feeds.render_feed(spec(), [(key(newer), newer), *items[1:]], WINDOW)
    assert changed.count(b"BEGIN:VEVENT") == 1


def test_a_small_memo_evicts_but_never_loses_an_event(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feeds, "EVENTS", feeds._EventCache(2))
    absences = [make(absence_id=f"a{n}", start=("2026-12-01", "am"), end=("2026-12-01", "am"))
                for n in range(5)]
    items = [(key(a), a) for a in absences]
    text = feeds.render_feed(spec(), items, WINDOW)
    assert text.count(b"BEGIN:VEVENT") == 5
    assert len(feeds.EVENTS) == 2
    assert feeds.render_feed(spec(), items, WINDOW) == text


_zones = st.sampled_from(["Europe/Paris", "America/New_York", "Asia/Kolkata", None,
                          "Australia/Lord_Howe"])
_halves = st.sampled_from(["am", "pm"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 900), st.integers(0, 20), _halves, _halves, _zones,
                       st.sampled_from(["approved", "pending", "denied"]),
                       st.sampled_from(["paid", "remote"]), st.booleans()),
             max_size=8),
    st.booleans(),
)
def test_any_feed_reads_back_as_rendered(
    rows: list[tuple[int, int, str, str, str | None, str, str, bool]], team: bool
) -> None:
    absences = []
    for n, (offset, length, first, last, zone, status, account, named) in enumerate(rows):
        start = dt.date(2026, 1, 1) + dt.timedelta(days=offset)
        end = start + dt.timedelta(days=length)
        if length == 0 and (first, last) == ("pm", "am"):
            last = "pm"
        absence = make(absence_id=f"a{n}", status=status, time_zone=zone,
                       display_name="Jane Doe" if named else None,
                       start=(start.isoformat(), first), end=(end.isoformat(), last))
        assert absence.account is not None
        absences.append(dataclasses.replace(
            absence, account=dataclasses.replace(absence.account, id=account)))
    the_spec = spec(employee=None) if team else spec()
    feeds.EVENTS.clear()  # the examples reuse ids, versions and times with other content
    text = feeds.render_feed(the_spec, [(key(a), a) for a in absences], WINDOW)
    calendar = icalendar.Calendar.from_ical(text)
    assert str(calendar["X-WR-CALNAME"]) == "Absences"
    read = {str(e["UID"]): e for e in calendar.walk("VEVENT")}
    expected = {}
    for absence in absences:
        desired = (render_team(absence, CONFIG, "") if team else render(absence, CONFIG))
        assert absence.end is not None and absence.start is not None
        if desired is not None and WINDOW.touches(absence.start.date, absence.end.date):
            expected[f"{desired.mark.value}@absence-sync"] = (absence, desired)
    assert set(read) == set(expected)
    for uid, (absence, desired) in expected.items():
        event = read[uid]
        assert str(event["SUMMARY"]) == desired.subject
        assert int(event["SEQUENCE"]) == absence.version + the_spec.revision
        assert str(event["STATUS"]) == ("TENTATIVE" if absence.status == "pending"
                                        else "CONFIRMED")
        assert str(event["CLASS"]) == ("PRIVATE" if desired.private else "PUBLIC")
        if desired.all_day:
            assert event.decoded("DTSTART") == desired.start.date()
            assert event.decoded("DTEND") == desired.end.date()
        else:
            zone = ZoneInfo(desired.time_zone)
            assert event.decoded("DTSTART") == desired.start.replace(tzinfo=zone)
            assert event.decoded("DTEND") == desired.end.replace(tzinfo=zone)
    zones = {str(z["TZID"]) for z in calendar.walk("VTIMEZONE")}
    assert zones == {d.time_zone for _, d in expected.values()
                     if not d.all_day and d.time_zone != "UTC"}
