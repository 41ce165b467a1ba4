"""Rendering rules (docs/rendering.md): (absence, configuration) -> desired event.

Pure code: no I/O, no clock. `render` returns None when the configuration's
calendar must not hold an event for the absence (rule 5.1).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from consumer.config import SyncConfig
from consumer.events import Absence

ShowAs = Literal["free", "tentative", "busy", "oof", "workingElsewhere"]
MAX_SUBJECT = 255
_CONTROL = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]"
)
# Other invisible format characters (soft hyphen, BOM, tag characters...) and
# unpaired surrogates are dropped.
_DROPPED_CATEGORIES = ("Cf", "Cs")
_MARK_ESCAPE = re.compile(r"%(25|3A)")


MARK_PREFIX = "absence-sync"


def _mark_part(text: str) -> str:
    return text.replace("%", "%25").replace(":", "%3A")


def _unmark_part(text: str) -> str:
    return _MARK_ESCAPE.sub(lambda m: "%" if m.group(1) == "25" else ":", text)


@dataclass(frozen=True, slots=True)
class Mark:
    """Rule 5.7: identifies an event this engine wrote.

    `value` is `absence-sync:<configuration>:<absence>` with '%' and ':'
    percent-encoded in each part, so one value names exactly one pair
    (configuration "a:b" + absence "c" and configuration "a" + absence "b:c"
    no longer share a mark). Ids without '%' or ':' (the usual case) give the
    same text as the marks written before this encoding, so their events and
    content hashes are unchanged.
    """

    config_id: str
    absence_id: str

    @property
    def value(self) -> str:
        return f"{MARK_PREFIX}:{_mark_part(self.config_id)}:{_mark_part(self.absence_id)}"

    @property
    def legacy_value(self) -> str:
        """The form written before parts were encoded (ambiguous when an id holds ':')."""
        return f"{MARK_PREFIX}:{self.config_id}:{self.absence_id}"

    @property
    def values(self) -> tuple[str, ...]:
        """Every value an event this engine wrote for the pair may carry, current first.

        A provider's `find` matches all of them, so events marked before the
        encoding are still found (and adopted rather than written twice)."""
        current, legacy = self.value, self.legacy_value
        return (current,) if current == legacy else (current, legacy)

    @classmethod
    def parse(cls, value: str) -> Mark | None:
        """The pair a current-form value names, or None for anything else."""
        prefix, sep, rest = value.partition(":")
        if prefix != MARK_PREFIX or not sep or rest.count(":") != 1:
            return None
        config, _, absence = rest.partition(":")
        return cls(_unmark_part(config), _unmark_part(absence))


@dataclass(frozen=True, slots=True)
class DesiredEvent:
    """What the calendar should hold. For all-day events `start`/`end` are
    midnights (end exclusive) in `time_zone`; for timed events they are local
    wall-clock times in `time_zone`."""

    mailbox: str
    subject: str
    show_as: ShowAs
    all_day: bool
    start: dt.datetime
    end: dt.datetime
    time_zone: str
    private: bool
    category: str | None
    mark: Mark

    @property
    def start_date(self) -> dt.date:
        return self.start.date()

    @property
    def end_date(self) -> dt.date:
        return self.end.date()

    def content_hash(self) -> str:
        """Hash of everything a provider writes except the target mailbox."""
        doc = {
            "subject": self.subject,
            "show_as": self.show_as,
            "all_day": self.all_day,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "time_zone": self.time_zone,
            "private": self.private,
            "category": self.category,
            "mark": self.mark.value,
        }
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(raw).hexdigest()

    def utc_bounds(self) -> tuple[dt.datetime, dt.datetime]:
        """Start and end as aware UTC datetimes (wall clock kept on DST days)."""
        from zoneinfo import ZoneInfo

        zone = ZoneInfo(self.time_zone)
        return (
            self.start.replace(tzinfo=zone).astimezone(dt.UTC),
            self.end.replace(tzinfo=zone).astimezone(dt.UTC),
        )


def clean_label(text: str, fallback: str = "Absent") -> str:
    """Hostile-string defence: no control or bidi characters, bounded length."""
    cleaned = _CONTROL.sub(" ", text)
    if not cleaned.isprintable():
        cleaned = "".join(
            c for c in cleaned if unicodedata.category(c) not in _DROPPED_CATEGORIES
        )
    cleaned = " ".join(cleaned.split())[:MAX_SUBJECT].rstrip()
    return cleaned or fallback


def wanted(absence: Absence, config: SyncConfig) -> bool:
    """Rule 5.1."""
    if absence.deleted or absence.employee is None:
        return False
    if absence.status in ("denied", "cancelled"):
        return False
    if absence.status == "pending" and not config.sync_pending:
        return False
    return not (
        config.establishments is not None
        and absence.employee.establishment_id not in config.establishments
    )


def label(absence: Absence, config: SyncConfig) -> str:
    """Rule 5.2."""
    assert absence.account is not None
    hidden = clean_label(config.hidden_label)
    if not config.hide_labels or absence.account.public_reason:
        return clean_label(absence.account.name, fallback=hidden)
    return hidden


def show_as(absence: Absence, config: SyncConfig) -> ShowAs:
    """Rule 5.3."""
    assert absence.account is not None
    if not absence.account.counted_as_absence:
        return config.free_as
    return "tentative" if absence.status == "pending" else config.busy_as


def timing(absence: Absence, config: SyncConfig) -> tuple[bool, dt.datetime, dt.datetime, str]:
    """Rule 5.4: (all_day, start, end, zone), local wall-clock times."""
    assert absence.start is not None and absence.end is not None
    assert absence.employee is not None
    zone = absence.employee.time_zone or config.time_zone
    start, end = absence.start, absence.end
    whole = start.half == "am" and end.half == "pm"
    morning, afternoon = config.morning_span, config.afternoon_span
    if whole and (start.date != end.date or not config.whole_days_as_timed):
        begin = dt.datetime.combine(start.date, dt.time())
        finish = dt.datetime.combine(end.date + dt.timedelta(days=1), dt.time())
        return True, begin, finish, zone
    begin_time = morning.start if start.half == "am" else afternoon.start
    end_time = morning.end if end.half == "am" else afternoon.end
    return (
        False,
        dt.datetime.combine(start.date, begin_time),
        dt.datetime.combine(end.date, end_time),
        zone,
    )


def render(absence: Absence, config: SyncConfig) -> DesiredEvent | None:
    """The event `config`'s calendar should hold for `absence`, or None."""
    if not wanted(absence, config):
        return None
    assert absence.employee is not None
    all_day, start, end, zone = timing(absence, config)
    return DesiredEvent(
        mailbox=absence.employee.target_address,
        subject=label(absence, config),
        show_as=show_as(absence, config),
        all_day=all_day,
        start=start,
        end=end,
        time_zone=zone,
        private=config.private,
        category=(clean_label(config.category, fallback="") or None) if config.category else None,
        mark=Mark(config.id, absence.id),
    )
