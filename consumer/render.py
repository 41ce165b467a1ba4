"""Rendering rules (docs/rendering.md): (absence, configuration) -> desired event.

Pure code: no I/O, no clock. `render` returns None when the configuration's
calendar must not hold an event for the absence (rule 5.1). A configuration's
per leave type rules (`types:`, keyed by `account.id`) take part in every
rule. `render_team` is the team view of the same absence (one shared
calendar, or a configuration's feed): same wanted set and timing, subject
"{name}: {label}", always free, never private, with its own mark.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass

from consumer.config import ShowAs as ShowAs  # re-exported: providers name it from here
from consumer.config import SyncConfig, TypeRule
from consumer.events import Absence

MAX_SUBJECT = 255
#: longest employee name kept in a team subject, so the label always fits
MAX_TEAM_NAME = 120
#: show-as values that block no time: a pending absence never shows busier
_NOT_BLOCKING: tuple[ShowAs, ...] = ("free", "workingElsewhere")
_CONTROL = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u061c\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]"
)
# Other invisible format characters (soft hyphen, BOM, tag characters...) and
# unpaired surrogates are dropped.
_DROPPED_CATEGORIES = ("Cf", "Cs")
_MARK_ESCAPE = re.compile(r"%(25|3A)")


MARK_PREFIX = "absence-sync"
#: prefix of the marks of team events, distinct from the employee event's
TEAM_MARK_PREFIX = "absence-sync-team"
# json.dumps' own string quoting (ASCII-only), for `DesiredEvent.content_hash`
_quote = json.encoder.encode_basestring_ascii


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

    A team event (`team=True`) is marked `absence-sync-team:<configuration>:<absence>`:
    the employee's event and the team event of one pair never share a mark.
    """

    config_id: str
    absence_id: str
    team: bool = False

    @property
    def prefix(self) -> str:
        return TEAM_MARK_PREFIX if self.team else MARK_PREFIX

    @property
    def value(self) -> str:
        return f"{self.prefix}:{_mark_part(self.config_id)}:{_mark_part(self.absence_id)}"

    @property
    def legacy_value(self) -> str:
        """The form written before parts were encoded (ambiguous when an id holds ':').
        Team marks postdate the encoding: theirs is the current form."""
        if self.team:
            return self.value
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
        if prefix not in (MARK_PREFIX, TEAM_MARK_PREFIX) or not sep or rest.count(":") != 1:
            return None
        config, _, absence = rest.partition(":")
        return cls(_unmark_part(config), _unmark_part(absence), prefix == TEAM_MARK_PREFIX)


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
        """Hash of everything a provider writes except the target mailbox: SHA-256 of
        the compact, key-sorted JSON of those fields (the text `json.dumps` gives,
        spelt out because it is computed for every event; tests compare the two)."""
        text = _quote
        raw = (
            f'{{"all_day":{"true" if self.all_day else "false"},'
            f'"category":{"null" if self.category is None else text(self.category)},'
            f'"end":{text(self.end.isoformat())},"mark":{text(self.mark.value)},'
            f'"private":{"true" if self.private else "false"},'
            f'"show_as":{text(self.show_as)},"start":{text(self.start.isoformat())},'
            f'"subject":{text(self.subject)},"time_zone":{text(self.time_zone)}}}'
        )
        return hashlib.sha256(raw.encode()).hexdigest()

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


def type_rule(absence: Absence, config: SyncConfig) -> TypeRule | None:
    """The configuration's rule for the absence's leave type (`account.id`), if any."""
    if absence.account is None or not config.types:
        return None
    return config.types.get(absence.account.id)


def wanted(absence: Absence, config: SyncConfig) -> bool:
    """Rule 5.1, with the leave type's `skip` and `sync_pending`."""
    if absence.deleted or absence.employee is None:
        return False
    if absence.status in ("denied", "cancelled"):
        return False
    rule = type_rule(absence, config)
    if rule is not None and rule.skip:
        return False
    sync_pending = config.sync_pending
    if rule is not None and rule.sync_pending is not None:
        sync_pending = rule.sync_pending
    if absence.status == "pending" and not sync_pending:
        return False
    return not (
        config.establishments is not None
        and absence.employee.establishment_id not in config.establishments
    )


def label(absence: Absence, config: SyncConfig) -> str:
    """Rule 5.2; a leave type's `label` is the subject whatever `hide_labels` says."""
    assert absence.account is not None
    hidden = clean_label(config.hidden_label)
    rule = type_rule(absence, config)
    if rule is not None and rule.label is not None:
        return clean_label(rule.label, fallback=hidden)
    if not config.hide_labels or absence.account.public_reason:
        return clean_label(absence.account.name, fallback=hidden)
    return hidden


def show_as(absence: Absence, config: SyncConfig) -> ShowAs:
    """Rule 5.3 with the leave type's `show_as`.

    The approved show-as is the type's override, else `busy_as` for counted
    absences and `free_as` for the others. A pending absence shows
    `tentative`, unless the approved show-as blocks no time (`free`,
    `workingElsewhere`): then it shows that, never busier than its approval."""
    assert absence.account is not None
    rule = type_rule(absence, config)
    approved: ShowAs
    if rule is not None and rule.show_as is not None:
        approved = rule.show_as
    elif absence.account.counted_as_absence:
        approved = config.busy_as
    else:
        approved = config.free_as
    if absence.status == "pending" and approved not in _NOT_BLOCKING:
        return "tentative"
    return approved


def private(absence: Absence, config: SyncConfig) -> bool:
    """Rule 5.6: `private`, the leave type's value first."""
    rule = type_rule(absence, config)
    if rule is not None and rule.private is not None:
        return rule.private
    return config.private


def _clean_category(category: str | None) -> str | None:
    return (clean_label(category, fallback="") or None) if category else None


def category(absence: Absence, config: SyncConfig) -> str | None:
    """Rule 5.6: `category`, the leave type's value first (`""`: none for the type)."""
    rule = type_rule(absence, config)
    if rule is not None and rule.category is not None:
        return _clean_category(rule.category)
    return _clean_category(config.category)


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
        private=private(absence, config),
        category=category(absence, config),
        mark=Mark(config.id, absence.id),
    )


def team_name(absence: Absence) -> str:
    """The employee as a team calendar names them: `display_name`, else the
    e-mail's local part (cleaned like labels, at most `MAX_TEAM_NAME` characters)."""
    assert absence.employee is not None
    local = clean_label(absence.employee.email.strip().rsplit("@", 1)[0], fallback="?")
    name = clean_label(absence.employee.display_name or "", fallback=local)
    return name[:MAX_TEAM_NAME].rstrip()


def render_team(absence: Absence, config: SyncConfig, mailbox: str) -> DesiredEvent | None:
    """The event a team view of `config` (a shared calendar at `mailbox`, or the
    configuration's feed) holds for `absence`, or None.

    Wanted exactly when the employee's event is (rule 5.1 with the type
    rules); subject "{name}: {label}" with the label after the privacy
    rules; the employee event's timing; always free, so it blocks nobody;
    never private; the configuration's own category; a team mark."""
    if not wanted(absence, config):
        return None
    all_day, start, end, zone = timing(absence, config)
    return DesiredEvent(
        mailbox=mailbox,
        subject=clean_label(f"{team_name(absence)}: {label(absence, config)}"),
        show_as="free",
        all_day=all_day,
        start=start,
        end=end,
        time_zone=zone,
        private=False,
        category=_clean_category(config.category),
        mark=Mark(config.id, absence.id, team=True),
    )
