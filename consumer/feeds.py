"""iCalendar feeds of `ics` configurations (RFC 5545, written with `icalendar`).

Pure code: the web handler (`consumer.web.feeds`) reads the recorded
absences and the feed's configuration, and this module turns them into the
feed's text. A personal feed holds one employee's events exactly as `render`
makes them (rules 5.1-5.6 with the leave type rules); a team feed holds the
team view of every wanted absence (`render_team`). Only the rendered event
reaches the feed (subject, times, show-as, privacy, category): a leave type
name that the privacy rules hide never appears in it.

A feed's text is a function of its inputs (the feed, the configuration at
its revision, the window's dates, and the absences' ids and versions), so
its ETag is computed from them before anything is rendered: an unchanged
feed is answered 304 after one read of its absences' ids and versions. Each
event's text is memoised by (view, configuration revision, absence version),
so a team feed whose tenant changed one absence renders one event again,
not all of them, and reads only that absence's data.

Feed links are `/feeds/<token>.ics`; the token (`absfeed_` + 256 random
bits) is stored only as its SHA-256, like API tokens.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import icalendar

from consumer.config import ShowAs, SyncConfig
from consumer.events import Absence
from consumer.providers.ics import feed_uid
from consumer.render import DesiredEvent, clean_label, render, render_team

TOKEN_PREFIX = "absfeed_"  # noqa: S105 - a recognisable prefix, not a secret
PRODID = "-//absence-sync//feeds//EN"
#: what a subscribing client is asked to wait between two refreshes
REFRESH = dt.timedelta(minutes=15)
#: the feed holds the absences that overlap [today - WINDOW_BACK, today + WINDOW_AHEAD_YEARS]
WINDOW_BACK = dt.timedelta(days=90)
WINDOW_AHEAD_YEARS = 2
#: part of every ETag: bump when the text of a feed changes for the same inputs
FORMAT_VERSION = "1"
MAX_NAME = 255
#: events kept serialised across requests (a few hundred bytes each)
EVENT_CACHE_SIZE = 50_000

_BUSY_STATUS: dict[ShowAs, str] = {
    "free": "FREE",
    "tentative": "TENTATIVE",
    "busy": "BUSY",
    "oof": "OOF",
    "workingElsewhere": "WORKINGELSEWHERE",
}
_TRANSPARENT: frozenset[ShowAs] = frozenset({"free", "workingElsewhere"})


# --- tokens ----------------------------------------------------------------------


def new_feed_token() -> tuple[str, str]:
    """A fresh (feed id, token text). The id is public (listings, revocation); the
    token is the secret part of the feed's URL."""
    return secrets.token_hex(6), TOKEN_PREFIX + secrets.token_urlsafe(32)


def feed_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def looks_like_feed_token(text: str) -> bool:
    """Cheap shape check before any database look-up."""
    body = text.removeprefix(TOKEN_PREFIX)
    return (
        text.startswith(TOKEN_PREFIX) and 20 <= len(body) <= 100
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in body)
    )


def token_of(text: str) -> str | None:
    """The feed token in a token, a feed path or a feed URL; None when there is none."""
    text = text.strip()
    tail = text.rsplit("/", 1)[-1].split("?", 1)[0].split("#", 1)[0]
    tail = tail.removesuffix(".ics")
    return tail if looks_like_feed_token(tail) else None


def feed_url(base: str, token: str) -> str:
    return f"{base.rstrip('/')}/feeds/{token}.ics"


def clean_name(name: str | None) -> str | None:
    """A feed name as stored: cleaned like labels, None when nothing visible is left."""
    return clean_label(name or "", fallback="")[:MAX_NAME] or None


def feed_name(name: str | None, *, employee: str | None, config_id: str) -> str:
    """The calendar name a client shows: the one given, else a default."""
    fallback = f"Absences of {employee}" if employee else f"Team absences ({config_id})"
    return clean_label(name or "", fallback=clean_label(fallback))[:MAX_NAME]


def normalise_employee(email: str) -> str:
    """An employee e-mail as feeds match it (trimmed, lower case); ValueError when it
    is not an address."""
    address = email.strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in address) or (
        len(address) > 320
    ):
        raise ValueError(f"{email!r} is not an e-mail address")
    return address


# --- the window ------------------------------------------------------------------------


def _add_years(day: dt.date, years: int) -> dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


@dataclass(frozen=True, slots=True)
class Window:
    """Dates (inclusive) an absence must touch to be in a feed."""

    start: dt.date
    end: dt.date

    @classmethod
    def around(cls, today: dt.date) -> Window:
        return cls(today - WINDOW_BACK, _add_years(today, WINDOW_AHEAD_YEARS))

    def touches(self, first: dt.date, last: dt.date) -> bool:
        """Whether an absence from `first` to `last` (dates, inclusive) is in the feed."""
        return last >= self.start and first <= self.end


# --- what a feed is ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeedSpec:
    """One feed: personal (`employee` set) or the configuration's team feed."""

    feed_id: str
    name: str
    employee: str | None
    config: SyncConfig
    revision: int
    config_updated_at: dt.datetime

    @property
    def team(self) -> bool:
        return self.employee is None


@dataclass(frozen=True, slots=True)
class FeedKey:
    """A recorded absence as the feed's index read gives it: enough to find its
    event in the memo without reading (or parsing) the absence itself."""

    id: str
    version: int
    received_at: dt.datetime


def etag(spec: FeedSpec, window: Window, fingerprint: str) -> str:
    """The feed's entity tag from its inputs (`fingerprint`: the absences' ids and
    versions); a strong tag, quoted."""
    parts = [
        FORMAT_VERSION, spec.feed_id, spec.name, spec.employee or "", spec.config.id,
        str(spec.revision), window.start.isoformat(), window.end.isoformat(), fingerprint,
    ]
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return f'"{digest[:40]}"'


def etag_matches(header: str | None, tag: str) -> bool:
    """RFC 9110 If-None-Match: `*` or any listed tag equal under weak comparison."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    return any(
        candidate.strip().removeprefix("W/") == tag for candidate in header.split(",")
    )


# --- events ---------------------------------------------------------------------------


def desired_event(spec: FeedSpec, absence: Absence) -> DesiredEvent | None:
    """What the feed shows for `absence`: the team view, or the employee's own event
    when the absence is the feed employee's (by e-mail, whatever its calendar address)."""
    if spec.team:
        return render_team(absence, spec.config, mailbox="")
    if absence.employee is None or absence.employee.email.strip().lower() != spec.employee:
        return None
    return render(absence, spec.config)


def _stamp(received_at: dt.datetime, config_updated_at: dt.datetime) -> dt.datetime:
    latest = max(received_at, config_updated_at).astimezone(dt.UTC)
    return latest.replace(microsecond=0)


def vevent(
    desired: DesiredEvent, *, pending: bool, sequence: int, stamp: dt.datetime
) -> icalendar.Event:
    """One quiet event (no alarm, attendee, organizer or description)."""
    event = icalendar.Event()
    event.add("UID", feed_uid(desired.mark))
    event.add("DTSTAMP", stamp)
    event.add("LAST-MODIFIED", stamp)
    event.add("SEQUENCE", sequence)
    event.add("SUMMARY", desired.subject)
    if desired.all_day:
        event.add("DTSTART", desired.start.date())
        event.add("DTEND", desired.end.date())  # exclusive: the day after the last day
    else:
        zone = ZoneInfo(desired.time_zone)
        event.add("DTSTART", desired.start.replace(tzinfo=zone))
        event.add("DTEND", desired.end.replace(tzinfo=zone))
    event.add("TRANSP", "TRANSPARENT" if desired.show_as in _TRANSPARENT else "OPAQUE")
    event.add("STATUS", "TENTATIVE" if pending else "CONFIRMED")
    event.add("CLASS", "PRIVATE" if desired.private else "PUBLIC")
    if desired.category:
        event.add("CATEGORIES", [desired.category])
    event.add("X-MICROSOFT-CDO-BUSYSTATUS", _BUSY_STATUS[desired.show_as])
    event.add("X-MICROSOFT-CDO-ALLDAYEVENT", "TRUE" if desired.all_day else "FALSE")
    return event


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One event of a feed, serialised, with what the window, ordering and time
    zones need."""

    span: tuple[dt.date, dt.date]  # the absence's first and last dates
    order: tuple[dt.datetime, str]
    zone: str | None  # the zone of a timed event that needs a VTIMEZONE
    first: dt.date
    last: dt.date
    text: bytes


class _EventCache:
    """Bounded, thread-safe memo of serialised events (least recently used go first).
    A value of None records that the feed holds no event for that absence version."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[object, ...], FeedEvent | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> tuple[bool, FeedEvent | None]:
        with self._lock:
            if key not in self._items:
                return False, None
            self._items.move_to_end(key)
            return True, self._items[key]

    def put(self, key: tuple[object, ...], value: FeedEvent | None) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


EVENTS = _EventCache(EVENT_CACHE_SIZE)


def _memo_key(spec: FeedSpec, key: FeedKey) -> tuple[object, ...]:
    # everything the text depends on; the times tell a configuration or absence
    # recreated under the same id (revision and version start again) from the old one
    return (spec.team, spec.employee, spec.config.id, spec.revision, spec.config_updated_at,
            key.id, key.version, key.received_at)


def lookup(
    spec: FeedSpec, keys: Iterable[FeedKey]
) -> tuple[dict[str, FeedEvent | None], list[FeedKey]]:
    """(what the memo holds for these absences, by id; the keys it lacks). Only the
    absences it lacks need reading and rendering."""
    known: dict[str, FeedEvent | None] = {}
    missing: list[FeedKey] = []
    for key in keys:
        found, value = EVENTS.get(_memo_key(spec, key))
        if found:
            known[key.id] = value
        else:
            missing.append(key)
    return known, missing


def _rendered(spec: FeedSpec, key: FeedKey, absence: Absence) -> FeedEvent | None:
    desired = None if absence.deleted else desired_event(spec, absence)
    rendered = None
    if desired is not None:
        assert absence.start is not None and absence.end is not None
        text = vevent(
            desired,
            pending=absence.status == "pending",
            sequence=absence.version + spec.revision,
            stamp=_stamp(key.received_at, spec.config_updated_at),
        ).to_ical()
        timed_zone = None if desired.all_day or desired.time_zone == "UTC" else desired.time_zone
        rendered = FeedEvent(
            (absence.start.date, absence.end.date),
            (desired.utc_bounds()[0], desired.mark.absence_id), timed_zone,
            desired.start_date, desired.end_date, text,
        )
    EVENTS.put(_memo_key(spec, key), rendered)
    return rendered


@functools.lru_cache(maxsize=256)
def _timezone_text(zone: str, first_year: int, last_year: int) -> bytes:
    """A VTIMEZONE for `zone` covering the years `first_year` to `last_year`."""
    component = icalendar.Timezone.from_tzid(
        zone, first_date=dt.date(first_year, 1, 1), last_date=dt.date(last_year + 1, 1, 1)
    )
    text: bytes = component.to_ical()
    return text


def _calendar_head(spec: FeedSpec) -> bytes:
    calendar = icalendar.Calendar.new(
        prodid=PRODID, calscale="GREGORIAN", method="PUBLISH", name=spec.name,
        uid=f"{spec.feed_id}@absence-sync",
    )
    calendar.add("REFRESH-INTERVAL", icalendar.vDuration(REFRESH),
                 parameters={"VALUE": "DURATION"})
    calendar.add("X-PUBLISHED-TTL", icalendar.vDuration(REFRESH))
    text: bytes = calendar.to_ical()
    end = b"END:VCALENDAR\r\n"
    assert text.endswith(end)
    return text[: -len(end)]


def build(
    spec: FeedSpec,
    keys: Iterable[FeedKey],
    known: Mapping[str, FeedEvent | None],
    absences: Mapping[str, Absence],
    window: Window,
) -> bytes:
    """The feed's text: the events of `keys` that touch the window, ordered by start
    then absence id, and a VTIMEZONE for every zone of a timed event (UTC times end
    in Z instead). An event comes from `known` (see `lookup`), else is rendered
    from `absences`; a key with neither (an absence that no longer parses) is left out."""
    events: list[FeedEvent] = []
    for key in keys:
        if key.id in known:
            rendered = known[key.id]
        elif key.id in absences:
            rendered = _rendered(spec, key, absences[key.id])
        else:
            continue
        if rendered is not None and window.touches(*rendered.span):
            events.append(rendered)
    events.sort(key=lambda e: e.order)
    years: dict[str, tuple[int, int]] = {}
    for event in events:
        if event.zone is not None:
            first, last = years.get(event.zone, (event.first.year, event.last.year))
            years[event.zone] = (min(first, event.first.year), max(last, event.last.year))
    parts = [_calendar_head(spec)]
    parts += [_timezone_text(zone, *years[zone]) for zone in sorted(years)]
    parts += [event.text for event in events]
    parts.append(b"END:VCALENDAR\r\n")
    return b"".join(parts)


def render_feed(
    spec: FeedSpec, items: Iterable[tuple[FeedKey, Absence]], window: Window
) -> bytes:
    """`build` for absences at hand (tests, tools): looks up the memo, renders the rest."""
    pairs = list(items)
    known, _ = lookup(spec, [key for key, _ in pairs])
    return build(spec, [key for key, _ in pairs], known,
                 {key.id: absence for key, absence in pairs}, window)
