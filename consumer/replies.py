"""Automatic out-of-office replies (`auto_reply:`): the pure rules.

No I/O, no clock (callers pass `now`). What is settled here:

* `AutoReply`: the configuration option, with its placeholders checked when a
  configuration is loaded (anything in braces but the five placeholders is a
  configuration error);
* `reply_wanted`: which absences get a reply (only approved ones that the
  configuration wants, of the listed leave types, by default the counted ones);
* `desired_reply`: the one reply a mailbox should hold: the earliest group of
  adjacent wanted absences (no working half-day between them) that has not
  ended, scheduled from the start of its first half-day to the end of its last
  one in the employee's zone, with its messages rendered;
* `plan_reply`: never clobber the employee: the mailbox's current setting,
  what we last wrote and what we want -> Write, Disable, Keep or UserReply.

A reply is "ours" when its digest equals the digest of what the server
returned right after our last write (servers normalise the HTML we send),
or, while a write of ours may have landed without being recorded (a crash
between the call and its record), when its text fingerprint equals the
fingerprint of that write (`ReplyRecord.intent`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator

from consumer.events import Absence, HalfDay

Audience = Literal["none", "known", "all"]
AUDIENCES: tuple[str, ...] = ("none", "known", "all")
Status = Literal["disabled", "scheduled", "always"]
PLACEHOLDERS: tuple[str, ...] = (
    "first_name", "display_name", "start_date", "end_date", "return_date",
)
DEFAULT_SUBJECT = "Out of office"
MAX_MESSAGE = 8000
_BRACED = re.compile(r"\{([^{}]*)\}")
_TAG = re.compile(r"<[^>]*>")
_SAMPLE_DAY = dt.date(2026, 12, 31)


def check_template(text: str) -> str:
    """`text` if every `{...}` in it is a known placeholder; ValueError naming
    the first unknown one and the expected form otherwise."""
    for match in _BRACED.finditer(text):
        if match.group(1) not in PLACEHOLDERS:
            expected = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
            raise ValueError(
                f"unknown placeholder {match.group(0)!r}; expected one of {expected}"
            )
    return text


def fill(template: str, values: dict[str, str]) -> str:
    """`template` with its placeholders replaced (checked templates only)."""
    return _BRACED.sub(lambda m: values[m.group(1)], template)


class AutoReply(BaseModel):
    """The `auto_reply:` option of a configuration.

    `internal` is the message for colleagues; `external` the one for people
    outside the organisation (default: `internal`); `audience` who outside
    gets it (`none`, `known` contacts, `all`); `types` the leave types
    (`account.id`) that get a reply (default: counted absences);
    `date_format` a strftime pattern for the dates (default ISO
    `YYYY-MM-DD`); `subject` the subject of a Gmail reply."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    internal: str = Field(min_length=1, max_length=MAX_MESSAGE)
    external: str | None = Field(default=None, min_length=1, max_length=MAX_MESSAGE)
    audience: Audience = "all"
    types: list[str] | None = None
    date_format: str | None = Field(default=None, min_length=1, max_length=100)
    subject: str = Field(default=DEFAULT_SUBJECT, min_length=1, max_length=255)

    @field_validator("internal", "external", "subject")
    @classmethod
    def _check_placeholders(cls, value: str | None) -> str | None:
        return None if value is None else check_template(value)

    @field_validator("audience", mode="before")
    @classmethod
    def _check_audience(cls, value: Any) -> Any:
        if value not in AUDIENCES:
            raise ValueError(f"must be one of {', '.join(AUDIENCES)}, got {value!r}")
        return value

    @field_validator("types", mode="before")
    @classmethod
    def _check_types(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list | tuple) or not value:
            raise ValueError("must be a non-empty list of leave type ids (account.id)")
        out: list[str] = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, str | int) or not str(item).strip():
                raise ValueError(f"{item!r} is not a leave type id (account.id)")
            out.append(str(item))
        return out

    @field_validator("date_format")
    @classmethod
    def _check_date_format(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            sample = _SAMPLE_DAY.strftime(value)
        except ValueError as exc:
            raise ValueError(f"is not a strftime pattern (e.g. '%d/%m/%Y'): {exc}") from exc
        if "%" not in value or not sample.strip():
            raise ValueError("must be a strftime pattern with a date directive (e.g. '%d/%m/%Y')")
        return value

    @property
    def external_text(self) -> str:
        return self.internal if self.external is None else self.external


# --------------------------------------------------------------------------- settings


def _text(message: str) -> str:
    """What a reader sees of a message: tags removed, entities decoded, blanks
    collapsed (servers rewrite the HTML they store, not the text)."""
    return " ".join(html.unescape(_TAG.sub(" ", message)).split())


@dataclass(frozen=True, slots=True)
class ReplySetting:
    """A mailbox's automatic reply, as every provider reads and writes it.

    `start`/`end` are aware UTC datetimes (for `scheduled`); `audience` is who
    outside the organisation gets `external`; `subject` is Gmail's alone."""

    status: Status
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    internal: str = ""
    external: str = ""
    audience: Audience = "none"
    subject: str = ""
    #: the zone the schedule is written in (the employee's); not part of digests,
    #: which compare instants
    zone: str | None = None

    def _fields(self, text: bool) -> dict[str, Any]:
        def when(moment: dt.datetime | None) -> str | None:
            if moment is None:
                return None
            return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat()

        scheduled = self.status == "scheduled"
        norm = _text if text else (lambda s: s)
        return {
            "status": self.status,
            "start": when(self.start) if scheduled else None,
            "end": when(self.end) if scheduled else None,
            "internal": norm(self.internal),
            "external": norm(self.external),
            "audience": self.audience,
            "subject": norm(self.subject),
        }

    def digest(self) -> str:
        """SHA-256 of every field exactly as given (what "ours" compares)."""
        raw = json.dumps(self._fields(False), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(raw.encode()).hexdigest()

    def fingerprint(self) -> str:
        """SHA-256 of the fields as a reader sees them (text of the messages,
        times to the second): equal for what we sent and what a server that
        rewrites HTML stores."""
        raw = json.dumps(self._fields(True), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(raw.encode()).hexdigest()

    def active(self, now: dt.datetime) -> bool:
        """Whether it replies now or later: enabled, or scheduled and not yet over."""
        if self.status == "always":
            return True
        if self.status == "scheduled":
            return self.end is None or self.end > now
        return False


DISABLED = ReplySetting("disabled")


# --------------------------------------------------------------------------- which reply


def reply_wanted(absence: Absence, config: Any) -> bool:
    """Whether `absence` gets an automatic reply under `config` (a SyncConfig):
    it has `auto_reply`, wants the absence (rule 5.1 with the type rules), the
    absence is approved, and its leave type is listed in `auto_reply.types`
    (by default: counted as an absence)."""
    from consumer.render import wanted

    option: AutoReply | None = getattr(config, "auto_reply", None)
    if option is None or absence.status != "approved" or absence.account is None:
        return False
    if absence.start is None or absence.end is None or not wanted(absence, config):
        return False
    if option.types is None:
        return absence.account.counted_as_absence
    return absence.account.id in option.types


def _ordinal(half: HalfDay) -> int:
    return half.date.toordinal() * 2 + (0 if half.half == "am" else 1)


def _half_of(ordinal: int) -> HalfDay:
    return HalfDay(dt.date.fromordinal(ordinal // 2), "am" if ordinal % 2 == 0 else "pm")


def _working(ordinal: int) -> bool:
    return dt.date.fromordinal(ordinal // 2).weekday() < 5


def adjacent(end: HalfDay, start: HalfDay) -> bool:
    """Whether an absence starting at `start` continues one ending at `end`:
    it overlaps or follows it with no working (Monday to Friday) half-day
    between them."""
    return all(not _working(o) for o in range(_ordinal(end) + 1, _ordinal(start)))


def return_date(end: HalfDay) -> dt.date:
    """The first working day after the last half-day `end`: an absence ending
    on a morning returns the same afternoon (the same date, on a working day)."""
    ordinal = _ordinal(end) + 1
    while not _working(ordinal):
        ordinal += 1
    return dt.date.fromordinal(ordinal // 2)


def span(absence: Absence, config: Any) -> tuple[dt.datetime, dt.datetime]:
    """Local wall-clock bounds of an absence's reply: rule 5.4 times, local
    midnight to midnight for whole days (whatever `whole_days_as_timed` says)."""
    assert absence.start is not None and absence.end is not None
    start, end = absence.start, absence.end
    if start.half == "am":
        begin = dt.datetime.combine(start.date, dt.time()) if end.half == "pm" else \
            dt.datetime.combine(start.date, config.morning_span.start)
    else:
        begin = dt.datetime.combine(start.date, config.afternoon_span.start)
    if end.half == "pm":
        finish = dt.datetime.combine(end.date + dt.timedelta(days=1), dt.time()) \
            if start.half == "am" else dt.datetime.combine(end.date, config.afternoon_span.end)
    else:
        finish = dt.datetime.combine(end.date, config.morning_span.end)
    return begin, finish


def _utc(local: dt.datetime, zone: str) -> dt.datetime:
    return local.replace(tzinfo=ZoneInfo(zone)).astimezone(dt.UTC)


@dataclass(frozen=True, slots=True)
class DesiredReply:
    """The reply a mailbox should hold: for the absences `absence_ids` (one
    group of adjacent absences), `setting` scheduled from `start` to `end`
    (local wall clock in `time_zone`)."""

    mailbox: str
    absence_ids: tuple[str, ...]
    start: dt.datetime
    end: dt.datetime
    time_zone: str
    first: HalfDay
    last: HalfDay
    setting: ReplySetting
    #: when a later group takes over (the end of this one), if there is one
    next_group_at: dt.datetime | None = None

    def content_hash(self) -> str:
        """What we want to write; unchanged -> no write."""
        return self.setting.digest()


@dataclass(frozen=True, slots=True)
class _Group:
    absences: list[Absence]
    first: HalfDay
    last: HalfDay
    start_utc: dt.datetime
    end_utc: dt.datetime
    start: dt.datetime
    end: dt.datetime
    zone: str


def _groups(absences: list[Absence], config: Any) -> list[_Group]:
    """Wanted absences, sorted and merged where adjacent."""
    ordered = sorted(absences, key=lambda a: (_ordinal(a.start), _ordinal(a.end), a.id))  # type: ignore[arg-type]
    groups: list[_Group] = []
    for absence in ordered:
        assert absence.start is not None and absence.end is not None
        assert absence.employee is not None
        zone = absence.employee.time_zone or config.time_zone
        begin, finish = span(absence, config)
        begin_utc, finish_utc = _utc(begin, zone), _utc(finish, zone)
        if groups and adjacent(groups[-1].last, absence.start):
            last = groups[-1]
            later = _ordinal(absence.end) > _ordinal(last.last)
            groups[-1] = replace(
                last,
                absences=[*last.absences, absence],
                last=absence.end if later else last.last,
                end_utc=max(last.end_utc, finish_utc),
                end=finish if finish_utc > last.end_utc else last.end,
            )
            continue
        groups.append(_Group([absence], absence.start, absence.end, begin_utc, finish_utc,
                             begin, finish, zone))
    return groups


def names(absence: Absence) -> tuple[str, str]:
    """(first_name, display_name): the first word of `display_name`, else the
    e-mail's local part; the display name, else that local part."""
    from consumer.render import clean_label

    assert absence.employee is not None
    local = clean_label(absence.employee.email.strip().rsplit("@", 1)[0], fallback="")
    display = clean_label(absence.employee.display_name or "", fallback="") or local
    return (display.split()[0] if display else ""), display


def _date_text(day: dt.date, pattern: str | None) -> str:
    return day.isoformat() if pattern is None else day.strftime(pattern)


def messages(
    option: AutoReply, absence: Absence, first: HalfDay, last: HalfDay, *, html_values: bool,
) -> tuple[str, str, str]:
    """(internal, external, subject) with the placeholders filled; values are
    HTML-escaped when the messages are HTML (`html_values`), the templates are
    the administrator's and go as written."""
    first_name, display = names(absence)
    values = {
        "first_name": first_name,
        "display_name": display,
        "start_date": _date_text(first.date, option.date_format),
        "end_date": _date_text(last.date, option.date_format),
        "return_date": _date_text(return_date(last), option.date_format),
    }
    if html_values:
        values = {k: html.escape(v, quote=False) for k, v in values.items()}
    return (fill(option.internal, values), fill(option.external_text, values),
            fill(option.subject, {k: html.unescape(v) for k, v in values.items()}))


def desired_reply(
    absences: Iterable[Absence], config: Any, mailbox: str, now: dt.datetime,
    *, html_values: bool = True, with_subject: bool = False,
) -> DesiredReply | None:
    """The reply `mailbox` should hold under `config`, given the latest known
    state of the absences that may target it (others are ignored), at `now`
    (aware). None: no reply of ours should be active there. `html_values`: the
    provider's messages are HTML; `with_subject`: it keeps a subject (Gmail)."""
    option: AutoReply | None = getattr(config, "auto_reply", None)
    if option is None:
        return None
    mine = [
        a for a in absences
        if reply_wanted(a, config) and a.employee is not None
        and a.employee.target_address == mailbox
    ]
    groups = [g for g in _groups(mine, config) if g.end_utc > now]
    if not groups:
        return None
    group = groups[0]
    newest = max(group.absences, key=lambda a: (a.version, a.id))
    internal, external, subject = messages(option, newest, group.first, group.last,
                                           html_values=html_values)
    setting = ReplySetting(
        "scheduled", group.start_utc, group.end_utc, internal, external, option.audience,
        subject if with_subject else "", group.zone,
    )
    return DesiredReply(
        mailbox=mailbox,
        absence_ids=tuple(a.id for a in group.absences),
        start=group.start,
        end=group.end,
        time_zone=group.zone,
        first=group.first,
        last=group.last,
        setting=setting,
        next_group_at=group.end_utc if len(groups) > 1 else None,
    )


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class ReplyRecord:
    """What we last did to a mailbox's reply (one row per configuration and
    mailbox): the digest read back after our write, the hash of what we wanted
    then, and, while a write may have landed unrecorded, its fingerprint."""

    readback: str | None = None
    applied_hash: str | None = None
    intent: str | None = None


@dataclass(frozen=True, slots=True)
class WriteReply:
    desired: DesiredReply


@dataclass(frozen=True, slots=True)
class DisableReply:
    pass


@dataclass(frozen=True, slots=True)
class KeepReply:
    """Ours and already what we want: nothing to write."""


@dataclass(frozen=True, slots=True)
class UserReply:
    """The employee's own reply is there: left alone."""


@dataclass(frozen=True, slots=True)
class NoReply:
    """Nothing of ours is wanted and nothing of ours is there."""


ReplyAction = WriteReply | DisableReply | KeepReply | UserReply | NoReply


def is_ours(current: ReplySetting, record: ReplyRecord | None) -> bool:
    if record is None:
        return False
    if record.readback is not None and current.digest() == record.readback:
        return True
    return record.intent is not None and current.fingerprint() == record.intent


def plan_reply(
    current: ReplySetting, desired: DesiredReply | None, record: ReplyRecord | None,
    now: dt.datetime, *, force: bool = False,
) -> ReplyAction:
    """What to do with a mailbox's reply. We write only over a reply that is
    disabled, over (a scheduled one already over), or ours; an active reply
    that is not ours is the employee's and stays as it is."""
    ours = is_ours(current, record)
    if desired is None:
        if ours and current.status != "disabled":
            return DisableReply()
        return UserReply() if current.active(now) and not ours else NoReply()
    if ours:
        settled = (
            record is not None and record.intent is None
            and record.applied_hash == desired.content_hash()
        )
        return KeepReply() if settled and not force else WriteReply(desired)
    if not current.active(now):
        return WriteReply(desired)
    return UserReply()
