"""Health rules (pure): the pattern of failures across mailboxes names the cause."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.health import Health, Outcome, assess, cause_sentence
from consumer.providers.base import ERROR_CODES


def ok(box: str | None) -> Outcome:
    return Outcome(box, True)


def err(box: str | None, code: str) -> Outcome:
    return Outcome(box, False, code)


BOXES = [f"e{n}@acme.test" for n in range(10)]


@pytest.mark.parametrize(
    ("outcomes", "failed_items", "ever", "status", "code"),
    [
        # nothing at all
        ([], 0, False, "idle", None),
        # throttling alone is not a failure, and writes nothing
        ([err(BOXES[0], "throttled")] * 5, 0, False, "idle", None),
        ([err(b, "throttled") for b in BOXES] + [ok(b) for b in BOXES], 0, False, "ok", None),
        # everything written
        ([ok(b) for b in BOXES], 0, False, "ok", None),
        ([], 0, True, "ok", None),
        # every mailbox fails with one configuration-wide cause
        ([err(b, "consent_missing") for b in BOXES], 10, False, "failing", "consent_missing"),
        ([err(b, "auth_failed") for b in BOXES], 10, True, "failing", "auth_failed"),
        ([err(b, "server_unreachable") for b in BOXES], 0, True, "failing",
         "server_unreachable"),
        # most (7 of 10) fail with the same cause
        ([err(b, "access_denied") for b in BOXES[:7]] + [ok(b) for b in BOXES[7:]], 7, True,
         "failing", "access_denied"),
        # exactly half is not "most"
        ([err(b, "access_denied") for b in BOXES[:5]] + [ok(b) for b in BOXES[5:]], 5, True,
         "degraded", "access_denied"),
        # a few unknown mailboxes: the employees' addresses, not the configuration
        ([err(b, "mailbox_not_found") for b in BOXES[:2]] + [ok(b) for b in BOXES[2:]], 2,
         True, "degraded", "mailbox_not_found"),
        # even when all of them are unknown
        ([err(b, "mailbox_not_found") for b in BOXES], 10, False, "degraded",
         "mailbox_not_found"),
        # mixed causes: none holds most mailboxes
        ([err(b, "auth_failed") for b in BOXES[:4]]
         + [err(b, "tls_untrusted_certificate") for b in BOXES[4:8]]
         + [ok(b) for b in BOXES[8:]], 8, True, "degraded", "auth_failed"),
        # the latest outcome per mailbox counts (newest first): fixed since
        ([ok(b) for b in BOXES] + [err(b, "consent_missing") for b in BOXES], 0, True, "ok",
         None),
        # broken since
        ([err(b, "consent_missing") for b in BOXES] + [ok(b) for b in BOXES], 10, True,
         "failing", "consent_missing"),
        # mailboxes compare case-insensitively
        ([err("Jane@Acme.test", "access_denied"), ok("jane@acme.test")], 1, True, "failing",
         "access_denied"),
        # absences stay failed from before the window
        ([ok(b) for b in BOXES], 3, True, "degraded", None),
        # a failure without a known mailbox still counts; an ok delete without one does not
        ([err(None, "provider_error"), ok(None)], 1, False, "failing", "provider_error"),
    ],
)
def test_rules(outcomes: list[Outcome], failed_items: int, ever: bool, status: str,
               code: str | None) -> None:
    verdict = assess(outcomes, failed_items=failed_items, ever_written=ever)
    assert (verdict.status, verdict.code) == (status, code)


def test_failing_mailboxes_are_named_sorted() -> None:
    verdict = assess([err("b@x", "mailbox_not_found"), err("a@x", "mailbox_not_found"),
                      ok("c@x"), ok("d@x"), ok("e@x")])
    assert verdict.mailboxes == ("a@x", "b@x")
    sentence = cause_sentence(verdict, "exchange")
    assert sentence == "Some mailboxes fail: check these employees' e-mail addresses: a@x, b@x."


@pytest.mark.parametrize(
    ("code", "provider", "share", "expected"),
    [
        ("consent_missing", "microsoft365", 1.0,
         "An administrator must grant consent: https://login.example/consent"),
        ("access_denied", "exchange", 1.0,
         "Every write fails: check the server URL or the service account's impersonation "
         "rights."),
        ("access_denied", "exchange", 0.8,
         "Most writes fail: check the server URL or the service account's impersonation "
         "rights."),
        ("server_unreachable", "caldav", 1.0,
         "Every write fails: the calendar server cannot be reached; check the server URL and "
         "the network path."),
        ("auth_failed", "exchange", 1.0,
         "Every write fails: the credentials are refused or cannot be read; check the service "
         "account's user name and password (stored secrets the worker cannot decrypt: see the "
         "failed items' hint)."),
    ],
)
def test_cause_sentences_name_the_fix(code: str, provider: str, share: float,
                                      expected: str) -> None:
    health = Health("failing", code, (), share, 1)
    assert cause_sentence(health, provider, "https://login.example/consent") == expected


def test_no_cause_when_ok_or_idle() -> None:
    assert cause_sentence(Health("ok"), "caldav") is None
    assert cause_sentence(Health("idle"), "caldav") is None


def test_many_mailboxes_are_summarised() -> None:
    boxes = tuple(f"m{n}@x" for n in range(8))
    sentence = cause_sentence(Health("degraded", "mailbox_not_found", boxes, 0.1, 8), "google")
    assert sentence is not None and sentence.endswith("m4@x and 3 more.")


outcome_lists = st.lists(
    st.builds(
        Outcome,
        st.sampled_from([*BOXES[:4], None]),
        st.booleans(),
        st.sampled_from(ERROR_CODES),
    ).map(lambda o: Outcome(o.mailbox, True) if o.ok else o),
    max_size=30,
)


@given(outcome_lists, outcome_lists, st.integers(0, 5), st.booleans())
def test_throttling_never_changes_the_verdict(
    outcomes: list[Outcome], throttles: list[Outcome], failed: int, ever: bool
) -> None:
    noise = [Outcome(o.mailbox, False, "throttled") for o in throttles]
    mixed = [x for pair in zip(outcomes, noise, strict=False) for x in pair]
    mixed += outcomes[len(noise):] + noise[len(outcomes):]
    assert assess(mixed, failed_items=failed, ever_written=ever) == assess(
        outcomes, failed_items=failed, ever_written=ever
    )


@given(outcome_lists, st.integers(0, 5), st.booleans())
def test_per_employee_causes_never_make_it_failing(
    outcomes: list[Outcome], failed: int, ever: bool
) -> None:
    personal = [
        o if o.ok else Outcome(o.mailbox, False, "mailbox_not_found") for o in outcomes
    ]
    verdict = assess(personal, failed_items=failed, ever_written=ever)
    assert verdict.status != "failing"
    if failed:
        assert verdict.status == "degraded"


def test_a_failing_team_calendar_is_named_as_such() -> None:
    """The team calendar's mailbox is not an employee's: the cause says to check the
    configuration's team address, not the HR system's e-mail addresses."""
    team = "team-paris@acme.com"
    alone = assess([
        Outcome(team, False, "mailbox_not_found"),
        Outcome("jane@acme.com", True),
        Outcome("john@acme.com", True),
    ])
    assert alone.status == "degraded"
    assert cause_sentence(alone, "microsoft365", team_address="Team-Paris@acme.com") == (
        "The team calendar team-paris@acme.com cannot be written (no such mailbox or "
        "calendar): check the configuration's team_calendar.address."
    )
    both = assess([
        Outcome(team, False, "mailbox_not_found"),
        Outcome("ghost@acme.com", False, "mailbox_not_found"),
        Outcome("jane@acme.com", True),
        Outcome("john@acme.com", True),
        Outcome("ann@acme.com", True),
    ])
    sentence = cause_sentence(both, "caldav", team_address=team)
    assert sentence is not None
    assert sentence.startswith("The team calendar team-paris@acme.com cannot be written")
    assert sentence.endswith("check these employees' e-mail addresses: ghost@acme.com.")
    # without a team calendar (or when it is fine) the sentence is the employees' one
    assert cause_sentence(both, "caldav") == (
        "Some mailboxes fail: check these employees' e-mail addresses: "
        "ghost@acme.com, team-paris@acme.com."
    )
