"""Health of a sync configuration, from a recent window of write outcomes (pure).

The rules come from how support reads a monitoring view: the pattern of
failures across mailboxes tells the cause.

- Each mailbox counts once, by its latest outcome in the window.
- `failing`: most mailboxes (more than half) fail, with the same cause, and
  that cause lies with the configuration (credentials, rights, consent,
  server address, certificate, a failing server), not with one employee.
- `degraded`: some mailboxes fail (e.g. `mailbox_not_found`: these employees'
  addresses are wrong), or absences stay failed from before the window.
- `ok`: nothing fails and something was written; `idle`: nothing was ever
  written.
- Throttling alone is never a failure: the server only asked us to slow down.

The cause is a sentence that names the fix; `cause_sentence` builds it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from consumer.providers.base import (
    ACCESS_DENIED,
    AUTH_FAILED,
    CONSENT_MISSING,
    INVALID_EVENT,
    MAILBOX_NOT_FOUND,
    PROVIDER_ERROR,
    SERVER_UNREACHABLE,
    THROTTLED,
    TLS_UNTRUSTED_CERTIFICATE,
)

Status = Literal["ok", "degraded", "failing", "idle"]
STATUSES: tuple[Status, ...] = ("ok", "degraded", "failing", "idle")
# causes that lie with one employee or one absence: never "failing" on their own
PER_MAILBOX_CODES = frozenset({MAILBOX_NOT_FOUND, INVALID_EVENT})
MAX_NAMED = 5


@dataclass(frozen=True, slots=True)
class Outcome:
    """One calendar write: its mailbox (None when unknown), success, error code."""

    mailbox: str | None
    ok: bool
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Health:
    status: Status
    code: str | None = None  # the cause's error code, when one stands out
    mailboxes: tuple[str, ...] = ()  # the failing mailboxes, sorted
    share: float = 0.0  # failing mailboxes / mailboxes seen in the window
    failed_items: int = 0


def assess(
    outcomes: Sequence[Outcome],
    *,
    failed_items: int = 0,
    ever_written: bool = False,
) -> Health:
    """`outcomes` newest first; `failed_items`: items now in state failed;
    `ever_written`: whether any event was ever written by this configuration."""
    latest: dict[str, Outcome] = {}
    wrote = ever_written
    for outcome in outcomes:
        if not outcome.ok and outcome.code == THROTTLED:
            continue
        wrote = wrote or outcome.ok
        if outcome.mailbox is None:
            if outcome.ok:
                continue  # a delete of an event already forgotten: no mailbox to judge
            key = ""
        else:
            key = outcome.mailbox.strip().lower()
        latest.setdefault(key, outcome)
    failing = {box: o.code or PROVIDER_ERROR for box, o in latest.items() if not o.ok}
    if failing:
        by_code = Counter(failing.values())
        code, count = min(by_code.items(), key=lambda kv: (-kv[1], kv[0]))
        boxes = tuple(sorted(b for b in failing if b))
        share = len(failing) / len(latest)
        if code not in PER_MAILBOX_CODES and count * 2 > len(latest):
            return Health("failing", code, boxes, share, failed_items)
        return Health("degraded", code, boxes, share, failed_items)
    if failed_items:
        return Health("degraded", None, (), 0.0, failed_items)
    return Health("ok" if wrote else "idle", failed_items=failed_items)


def _named(boxes: Sequence[str]) -> str:
    shown = ", ".join(boxes[:MAX_NAMED])
    more = len(boxes) - MAX_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


def consent_sentence(consent_url: str | None) -> str:
    if consent_url:
        return f"An administrator must grant consent: {consent_url}"
    return (
        "An administrator of the customer's Microsoft 365 directory must grant consent "
        "(the worker needs ABSENCE_SYNC_MS_CLIENT_ID to build the consent link)."
    )


def _failing_sentence(code: str, provider: str, every: bool, consent_url: str | None) -> str:
    lead = "Every write fails" if every else "Most writes fail"
    if code == CONSENT_MISSING:
        return consent_sentence(consent_url)
    if code == AUTH_FAILED:
        fix = {
            "microsoft365": "the operator must check the application's client id and secret "
            "(ABSENCE_SYNC_MS_CLIENT_ID, ABSENCE_SYNC_MS_CLIENT_SECRET)",
            "google": "check the service account key of this configuration",
        }.get(provider, "check the service account's user name and password")
        return (f"{lead}: the credentials are refused or cannot be read; {fix} (stored "
                "secrets the worker cannot decrypt: see the failed items' hint).")
    if code == ACCESS_DENIED:
        fix = {
            "microsoft365": "check that the application was granted Calendars.ReadWrite and "
            "that no application access policy excludes these mailboxes",
            "google": "check the service account's domain-wide delegation",
            "caldav": "check the account's write rights on the calendars",
        }.get(provider, "check the server URL or the service account's impersonation rights")
        return f"{lead}: {fix}."
    if code == SERVER_UNREACHABLE:
        return (f"{lead}: the calendar server cannot be reached; check the server URL and "
                "the network path.")
    if code == TLS_UNTRUSTED_CERTIFICATE:
        return (f"{lead}: the server's certificate is not trusted; install a certificate "
                "from a trusted authority or set ABSENCE_SYNC_CA_BUNDLE.")
    return f"{lead} ({code}): the calendar server reports errors; see the failed items."


def cause_sentence(
    health: Health, provider: str, consent_url: str | None = None,
    team_address: str | None = None,
) -> str | None:
    """The sentence shown next to the badge; None when there is nothing to fix.
    `team_address`: the configuration's team calendar, named as such (not as an
    employee) when it is among the failing mailboxes."""
    if health.status == "failing" and health.code is not None:
        return _failing_sentence(health.code, provider, health.share >= 1.0, consent_url)
    if health.status != "degraded":
        return None
    team = team_address.strip().lower() if team_address else None
    if team is not None and team in health.mailboxes and health.code == MAILBOX_NOT_FOUND:
        lead = (f"The team calendar {team} cannot be written (no such mailbox or "
                "calendar): check the configuration's team_calendar.address")
        others = [b for b in health.mailboxes if b != team]
        if not others:
            return lead + "."
        return f"{lead}; check these employees' e-mail addresses: {_named(others)}."
    named = _named(health.mailboxes)
    if health.code == MAILBOX_NOT_FOUND:
        return f"Some mailboxes fail: check these employees' e-mail addresses: {named}."
    if health.code == ACCESS_DENIED:
        return f"Some mailboxes refuse writes: check the rights on these mailboxes: {named}."
    if health.code == INVALID_EVENT:
        return "Some events are rejected by the calendar server: see the failed items."
    if health.code == CONSENT_MISSING:
        return consent_sentence(consent_url)
    if health.code is not None:
        return (f"Some writes fail ({health.code}) for {named or 'some mailboxes'}: "
                "see the failed items.")
    return (f"{health.failed_items} absence(s) could not be written: see the failed items "
            "and retry them once fixed.")
