"""Per leave type rules (`types:`) and the team view, as tables.

Expected values are written from the rules' text (docs/rendering.md, "Per
leave type rules" and "The team view"), never computed by the code under
test. Absences come from event-shaped dicts (`tests/test_render.py`
builders), configurations from `parse_sync`, as a file would give them.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.config import ConfigError, SyncConfig, parse_sync
from consumer.events import Absence, Account
from consumer.plan import Create, Delete, Noop, Recorded, Update, plan
from consumer.render import Mark, render, render_team
from consumer.store import _render_hash
from tests.test_render import make

TYPE = "training"
OTHER = "paid-leave"


def with_type(absence: Absence, account_id: str = TYPE, **account: Any) -> Absence:
    assert absence.account is not None
    fields = {"id": account_id, **account}
    return dataclasses.replace(absence, account=dataclasses.replace(absence.account, **fields))


def absence(*, account_id: str = TYPE, name: str = "Training", **fields: Any) -> Absence:
    return with_type(make(name=name, **fields), account_id)


def config(types: dict[str, Any] | None = None, **fields: Any) -> SyncConfig:
    raw: dict[str, Any] = {"id": "acme-o365", "tenant": "acme", "provider": "microsoft365",
                           **fields}
    if types is not None:
        raw["types"] = types
    return parse_sync("test", raw)


# --- skip and sync_pending (rule 5.1) ----------------------------------------------------

# status, configuration sync_pending, type sync_pending, type skip -> wanted
WANTED = [
    ("approved", True, None, False, True),
    ("approved", True, None, True, False),
    ("pending", True, None, True, False),
    ("pending", True, False, False, False),
    ("pending", False, True, False, True),
    ("pending", False, None, False, False),
    ("approved", False, False, False, True),
    ("denied", True, True, False, False),
    ("cancelled", True, True, False, False),
]


@pytest.mark.parametrize(("status", "cfg_pending", "type_pending", "skip", "holds"), WANTED)
def test_skip_and_sync_pending(
    status: str, cfg_pending: bool, type_pending: bool | None, skip: bool, holds: bool
) -> None:
    rule: dict[str, Any] = {"skip": skip}
    if type_pending is not None:
        rule["sync_pending"] = type_pending
    cfg = config({TYPE: rule}, sync_pending=cfg_pending)
    assert (render(absence(status=status), cfg) is not None) is holds
    # the team view wants exactly the same absences
    assert (render_team(absence(status=status), cfg, "team@acme.com") is not None) is holds


def test_rules_of_one_type_leave_other_types_alone() -> None:
    cfg = config({TYPE: {"skip": True, "sync_pending": False}}, sync_pending=True)
    assert render(absence(account_id=OTHER), cfg) is not None
    assert render(absence(account_id=OTHER, status="pending"), cfg) is not None
    assert render(absence(), cfg) is None


def test_type_ids_are_matched_exactly() -> None:
    cfg = config({"Training": {"skip": True}})
    assert render(absence(account_id="training"), cfg) is not None
    assert render(absence(account_id="Training"), cfg) is None


def test_skip_still_respects_the_establishment_scope_and_deletions() -> None:
    cfg = config({TYPE: {"skip": False}}, establishments=["lyon"])
    assert render(absence(), cfg) is None  # paris is out of scope, skip false or not
    assert render(make(deleted=True), config({OTHER: {"sync_pending": True}})) is None


def test_skipped_type_deletes_the_event_written_before() -> None:
    before = render(absence(), config())
    assert before is not None
    written = Recorded("evt-1", before.mailbox, before.content_hash())
    assert plan(render(absence(), config()), written) == Noop()
    assert plan(render(absence(), config({TYPE: {"skip": True}})), written) == Delete(
        before.mailbox, "evt-1"
    )
    assert plan(render(absence(), config({TYPE: {"skip": True}})), Recorded()) == Noop()


# --- label (rule 5.2) ----------------------------------------------------------------------

# hide_labels, public_reason, type label -> subject (account.name is "Sick leave")
LABELS = [
    (True, False, None, "Absent"),
    (True, False, "Training day", "Training day"),
    (False, False, "Training day", "Training day"),
    (True, True, "Training day", "Training day"),
    (False, False, None, "Sick leave"),
    (True, True, None, "Sick leave"),
]


@pytest.mark.parametrize(("hide", "public", "type_label", "subject"), LABELS)
def test_label(hide: bool, public: bool, type_label: str | None, subject: str) -> None:
    types = {TYPE: {"label": type_label}} if type_label is not None else {TYPE: {}}
    cfg = config(types, hide_labels=hide)
    event = render(absence(name="Sick leave", public_reason=public), cfg)
    assert event is not None and event.subject == subject


def test_label_with_a_custom_hidden_label() -> None:
    cfg = config({OTHER: {"label": "Holiday"}}, hidden_label="Away")
    assert render(absence(name="Sick leave"), cfg).subject == "Away"  # type: ignore[union-attr]
    assert render(absence(account_id=OTHER), cfg).subject == "Holiday"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("given_label", "stored"),
    [
        ("Training\u202e day", "Training day"),
        ("  Training\n\tday  ", "Training day"),
        ("<b>Training</b>", "<b>Training</b>"),
        ("Formation \u00e0 Lyon", "Formation \u00e0 Lyon"),
    ],
)
def test_type_labels_are_cleaned_like_account_names(given_label: str, stored: str) -> None:
    cfg = config({TYPE: {"label": given_label}})
    assert cfg.types[TYPE].label == stored
    assert render(absence(), cfg).subject == stored  # type: ignore[union-attr]


# --- show-as (rule 5.3) ---------------------------------------------------------------------

# counted, status, type show_as, (busy_as, free_as) -> show-as
SHOW_AS_LITERAL = [
    (True, "approved", "free", ("busy", "free"), "free"),
    (True, "pending", "free", ("busy", "free"), "free"),
    (True, "approved", "workingElsewhere", ("busy", "free"), "workingElsewhere"),
    (True, "pending", "workingElsewhere", ("busy", "free"), "workingElsewhere"),
    (True, "approved", "oof", ("busy", "free"), "oof"),
    (True, "pending", "oof", ("busy", "free"), "tentative"),
    (False, "approved", "busy", ("busy", "free"), "busy"),
    (False, "pending", "busy", ("busy", "free"), "tentative"),
    (False, "approved", "tentative", ("busy", "free"), "tentative"),
    (False, "pending", "tentative", ("busy", "free"), "tentative"),
    (True, "approved", "busy", ("oof", "workingElsewhere"), "busy"),
    (False, "approved", "free", ("oof", "workingElsewhere"), "free"),
    (False, "pending", "free", ("oof", "workingElsewhere"), "free"),
    (True, "approved", None, ("oof", "workingElsewhere"), "oof"),
    (True, "pending", None, ("oof", "workingElsewhere"), "tentative"),
    (False, "pending", None, ("oof", "workingElsewhere"), "workingElsewhere"),
    (False, "approved", None, ("busy", "free"), "free"),
]


@pytest.mark.parametrize(("counted", "status", "override", "options", "expected"),
                         SHOW_AS_LITERAL)
def test_show_as_literal(
    counted: bool, status: str, override: str | None, options: tuple[str, str], expected: str
) -> None:
    types = {TYPE: {"show_as": override}} if override else {}
    cfg = config(types, busy_as=options[0], free_as=options[1])
    event = render(absence(counted=counted, status=status), cfg)
    assert event is not None and event.show_as == expected


def _spec_show_as(counted: bool, status: str, override: str | None, busy_as: str,
                  free_as: str) -> str:
    """The rule, read from its text: the approved show-as is the type's, else busy_as
    (counted) or free_as (not counted); pending is tentative unless that approved
    show-as is free or workingElsewhere."""
    approved = override or (busy_as if counted else free_as)
    if status == "approved":
        return approved
    return approved if approved in ("free", "workingElsewhere") else "tentative"


SHOW_AS_ALL = list(itertools.product(
    [True, False], ["approved", "pending"],
    [None, "free", "tentative", "busy", "oof", "workingElsewhere"],
    [("busy", "free"), ("oof", "workingElsewhere"), ("busy", "workingElsewhere")],
))


@pytest.mark.parametrize(("counted", "status", "override", "options"), SHOW_AS_ALL)
def test_show_as_every_combination(
    counted: bool, status: str, override: str | None, options: tuple[str, str]
) -> None:
    types = {TYPE: {"show_as": override}} if override else None
    cfg = config(types, busy_as=options[0], free_as=options[1])
    event = render(absence(counted=counted, status=status), cfg)
    assert event is not None
    assert event.show_as == _spec_show_as(counted, status, override, *options)
    if override is None:  # without an override this is exactly the configuration-wide rule
        assert event.show_as == render(absence(counted=counted, status=status),
                                       config(busy_as=options[0], free_as=options[1])
                                       ).show_as  # type: ignore[union-attr]


def test_pending_is_never_busier_than_approved() -> None:
    rank = {"free": 0, "workingElsewhere": 0, "tentative": 1, "busy": 2, "oof": 2}
    for counted, _, override, options in SHOW_AS_ALL:
        types = {TYPE: {"show_as": override}} if override else None
        cfg = config(types, busy_as=options[0], free_as=options[1])
        pending = render(absence(counted=counted, status="pending"), cfg)
        approved = render(absence(counted=counted, status="approved"), cfg)
        assert pending is not None and approved is not None
        assert rank[pending.show_as] <= rank[approved.show_as]


# --- private and category (rule 5.6) -------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg_private", "type_private", "expected"),
    [(False, None, False), (False, True, True), (True, False, False), (True, None, True)],
)
def test_private(cfg_private: bool, type_private: bool | None, expected: bool) -> None:
    rule = {"private": type_private} if type_private is not None else {}
    event = render(absence(), config({TYPE: rule}, private=cfg_private))
    assert event is not None and event.private is expected


@pytest.mark.parametrize(
    ("cfg_category", "type_category", "expected"),
    [
        (None, None, None),
        ("Absence", None, "Absence"),
        ("Absence", "Training", "Training"),
        ("Absence", "", None),
        (None, "Training", "Training"),
        ("Absence", " Trai\u00adning\n", "Training"),
    ],
)
def test_category(cfg_category: str | None, type_category: str | None,
                  expected: str | None) -> None:
    rule = {"category": type_category} if type_category is not None else {}
    fields = {"category": cfg_category} if cfg_category is not None else {}
    event = render(absence(), config({TYPE: rule}, **fields))
    assert event is not None and event.category == expected


def test_a_full_rule_set_as_in_the_documentation() -> None:
    cfg = config({
        "sick-leave": {"skip": True},
        "training": {"label": "Training", "show_as": "free"},
        "remote": {"show_as": "workingElsewhere", "sync_pending": False, "private": False},
    }, private=True, category="Absence")
    assert render(absence(account_id="sick-leave"), cfg) is None
    training = render(absence(name="Internal course", counted=True), cfg)
    assert training is not None
    assert (training.subject, training.show_as, training.private, training.category) == (
        "Training", "free", True, "Absence")
    remote = render(absence(account_id="remote", name="Remote", counted=False), cfg)
    assert remote is not None
    assert (remote.subject, remote.show_as, remote.private) == (
        "Absent", "workingElsewhere", False)
    assert render(absence(account_id="remote", status="pending"), cfg) is None
    paid = render(absence(account_id=OTHER, status="pending"), cfg)
    assert paid is not None and (paid.show_as, paid.private) == ("tentative", True)


# --- the render hash: a change of the rules re-renders ------------------------------------


def test_types_are_part_of_the_render_hash() -> None:
    plain = config()
    assert "types" not in plain.render_dict()  # unchanged hash for configurations without
    with_rule = config({TYPE: {"label": "Course"}})
    other_rule = config({TYPE: {"label": "Course", "private": True}})
    hashes = {_render_hash(c) for c in (plain, with_rule, other_rule)}
    assert len(hashes) == 3
    assert _render_hash(config({TYPE: {"label": "Course"}})) == _render_hash(with_rule)


def test_a_changed_rule_changes_the_written_event() -> None:
    before = render(absence(), config())
    after = render(absence(), config({TYPE: {"label": "Course", "show_as": "free"}}))
    assert before is not None and after is not None
    written = Recorded("evt-1", before.mailbox, before.content_hash())
    assert plan(after, written) == Update("evt-1", after)
    assert plan(render(absence(), config()), Recorded()) == Create(before)


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("types", "fragment"),
    [
        ({TYPE: {"skp": True}}, "field 'types.training': unknown field 'skp'; did you mean "
                                "'skip'?"),
        ({TYPE: {"show": "free"}}, "did you mean 'show_as'?"),
        ({TYPE: {"colour": "red"}}, "unknown field 'colour' (a leave type rule accepts: skip,"),
        ({TYPE: {"show_as": "away"}}, "field 'types.training.show_as': must be one of free, "
                                      "tentative, busy, oof, workingElsewhere, got 'away'"),
        ({TYPE: {"show_as": "Busy"}}, "got 'Busy'"),
        ({TYPE: {"label": "x" * 256}}, "field 'types.training.label': must be at most 255 "
                                       "characters long (256 given)"),
        ({TYPE: {"label": "\u202e\x00 \n"}}, "field 'types.training.label': must hold "
                                             "visible text"),
        ({TYPE: {"label": ""}}, "field 'types.training.label'"),
        ({TYPE: {"skip": "maybe"}}, "field 'types.training.skip'"),
        ({TYPE: {"private": [True]}}, "field 'types.training.private'"),
        ({TYPE: {"category": "c" * 256}}, "field 'types.training.category'"),
        ({TYPE: None}, "field 'types.training': must be a mapping of rules"),
        ({TYPE: "skip"}, "field 'types.training': must be a mapping of rules"),
        (["training"], "field 'types': must be a mapping of leave type ids"),
        ({"": {"skip": True}}, "is not a leave type id"),
        ({"x" * 501: {"skip": True}}, "is not a leave type id"),
    ],
)
def test_bad_rules_are_refused_with_a_clear_message(types: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config(types)
    assert fragment in str(refused.value)
    assert str(refused.value).startswith("test: field 'types")


def test_numeric_type_ids_are_read_as_text() -> None:
    cfg = config({42: {"skip": True}})
    assert list(cfg.types) == ["42"]
    assert render(absence(account_id="42"), cfg) is None


def test_rules_are_stored_as_given() -> None:
    cfg = config({TYPE: {"skip": False, "label": "Course", "category": ""},
                  OTHER: {"show_as": "oof", "private": None}})
    assert cfg.public_dict()["types"] == {TYPE: {"label": "Course", "category": ""},
                                          OTHER: {"show_as": "oof"}}
    assert "types" not in config().public_dict()
    # what is stored loads back to the same configuration
    again = SyncConfig(**{k: v for k, v in cfg.public_dict().items() if k != "secrets"})
    assert again == cfg


# --- the team view --------------------------------------------------------------------------

TEAM = "team-paris@acme.com"


@pytest.mark.parametrize(
    ("display_name", "hide", "public", "rule", "subject"),
    [
        ("Jane Doe", True, False, {}, "Jane Doe: Absent"),
        ("Jane Doe", False, False, {}, "Jane Doe: Training"),
        ("Jane Doe", True, True, {}, "Jane Doe: Training"),
        ("Jane Doe", True, False, {"label": "Course"}, "Jane Doe: Course"),
        (None, True, False, {}, "jane.doe: Absent"),
        ("   ", True, False, {}, "jane.doe: Absent"),
        ("Jane\u202e\nDoe", True, False, {}, "Jane Doe: Absent"),
    ],
)
def test_team_subject(display_name: str | None, hide: bool, public: bool,
                      rule: dict[str, Any], subject: str) -> None:
    cfg = config({TYPE: rule}, hide_labels=hide)
    event = render_team(absence(display_name=display_name, public_reason=public), cfg, TEAM)
    assert event is not None and event.subject == subject


def test_team_subject_keeps_the_label_after_a_long_name() -> None:
    event = render_team(absence(display_name="N" * 500), config(), TEAM)
    assert event is not None and event.subject.endswith(": Absent")
    assert len(event.subject) <= 255


@pytest.mark.parametrize(
    ("counted", "status", "rule", "cfg_fields"),
    [
        (True, "approved", {}, {"busy_as": "oof"}),
        (True, "pending", {}, {}),
        (False, "approved", {"show_as": "busy", "private": True, "category": "Course"},
         {"private": True, "category": "Absence"}),
        (True, "approved", {"show_as": "oof"}, {"private": True}),
    ],
)
def test_team_events_are_free_public_with_the_configuration_category(
    counted: bool, status: str, rule: dict[str, Any], cfg_fields: dict[str, Any]
) -> None:
    cfg = config({TYPE: rule}, **cfg_fields)
    own = render(absence(counted=counted, status=status), cfg)
    team = render_team(absence(counted=counted, status=status), cfg, TEAM)
    assert own is not None and team is not None
    assert (team.show_as, team.private) == ("free", False)
    assert team.category == cfg_fields.get("category")
    assert team.mailbox == TEAM
    # the employee event's timing
    assert (team.all_day, team.start, team.end, team.time_zone) == (
        own.all_day, own.start, own.end, own.time_zone)


def test_team_mark_is_distinct_from_the_employee_mark() -> None:
    cfg = config()
    own, team = render(absence(), cfg), render_team(absence(), cfg, TEAM)
    assert own is not None and team is not None
    assert team.mark == Mark("acme-o365", "abs-1234", team=True)
    assert team.mark.value == "absence-sync-team:acme-o365:abs-1234"
    assert own.mark.value == "absence-sync:acme-o365:abs-1234"
    assert set(team.mark.values).isdisjoint(own.mark.values)
    assert Mark.parse(team.mark.value) == team.mark
    assert Mark.parse(own.mark.value) == own.mark
    assert team.content_hash() != own.content_hash()


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_team_marks_round_trip(config_id: str, absence_id: str) -> None:
    mark = Mark(config_id, absence_id, team=True)
    assert Mark.parse(mark.value) == mark
    assert mark.value != Mark(config_id, absence_id).value


def test_employee_marks_are_unchanged_by_the_team_flag() -> None:
    mark = Mark("acme:o365", "abs-1")
    assert mark.value == "absence-sync:acme%3Ao365:abs-1"
    assert mark.values == (mark.value, "absence-sync:acme:o365:abs-1")


def test_hidden_name_never_reaches_the_team_subject() -> None:
    cfg = config()
    secret = "Psychiatric leave"
    event = render_team(with_type(make(name=secret), TYPE, name=secret), cfg, TEAM)
    assert event is not None and "Psychiatric" not in event.subject


def test_team_view_of_an_absence_without_account_rules() -> None:
    acc = Account("x", "X")
    plain = dataclasses.replace(make(), account=acc)
    assert render_team(plain, config({TYPE: {"skip": True}}), TEAM) is not None
