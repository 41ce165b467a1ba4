"""plan() (docs/rendering.md, docs/guarantees.md): desired vs recorded -> exactly one action."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest

from consumer.config import SyncConfig
from consumer.events import Absence, absence_from_data
from consumer.plan import Action, Create, Delete, Move, Noop, Recorded, Update, plan
from consumer.render import DesiredEvent, Mark, render

MAILBOX = "jane.doe@acme.com"
OTHER_MAILBOX = "jane@acme.onmicrosoft.com"


def desired_event(**changes: Any) -> DesiredEvent:
    base = DesiredEvent(
        mailbox=MAILBOX,
        subject="Absent",
        show_as="busy",
        all_day=True,
        start=dt.datetime(2026, 12, 1),
        end=dt.datetime(2026, 12, 4),
        time_zone="Europe/Paris",
        private=False,
        category=None,
        mark=Mark("acme-o365", "abs-1234"),
    )
    return dataclasses.replace(base, **changes)


DESIRED = desired_event()
SAME_HASH = DESIRED.content_hash()
OLD_HASH = desired_event(subject="Paid leave").content_hash()
assert OLD_HASH != SAME_HASH

# id, desired (None = not wanted), recorded, force, expected action
PLAN_CASES: list[tuple[str, DesiredEvent | None, Recorded, bool, Action]] = [
    ("unwanted-nothing-recorded", None, Recorded(), False, Noop()),
    ("unwanted-recorded-event", None, Recorded("evt-1", MAILBOX, SAME_HASH), False,
     Delete(MAILBOX, "evt-1")),
    ("unwanted-recorded-event-other-mailbox", None, Recorded("evt-1", OTHER_MAILBOX, OLD_HASH),
     False, Delete(OTHER_MAILBOX, "evt-1")),
    ("unwanted-recorded-without-hash", None, Recorded("evt-1", MAILBOX, None), False,
     Delete(MAILBOX, "evt-1")),
    ("unwanted-only-stale-hash", None, Recorded(None, None, OLD_HASH), False, Noop()),
    ("unwanted-forced-nothing-recorded", None, Recorded(), True, Noop()),
    ("unwanted-forced-recorded", None, Recorded("evt-1", MAILBOX, SAME_HASH), True,
     Delete(MAILBOX, "evt-1")),
    ("create-nothing-recorded", DESIRED, Recorded(), False, Create(DESIRED)),
    ("create-after-a-delete-left-a-hash", DESIRED, Recorded(None, None, SAME_HASH), False,
     Create(DESIRED)),
    ("create-forced", DESIRED, Recorded(), True, Create(DESIRED)),
    # An event id without its mailbox cannot be addressed: write afresh, delete nothing.
    ("create-when-recorded-mailbox-unknown", DESIRED, Recorded("evt-1", None, SAME_HASH), False,
     Create(DESIRED)),
    ("unwanted-recorded-mailbox-unknown", None, Recorded("evt-1", None, SAME_HASH), False,
     Noop()),
    ("noop-hash-equal", DESIRED, Recorded("evt-1", MAILBOX, SAME_HASH), False, Noop()),
    ("update-hash-differs", DESIRED, Recorded("evt-1", MAILBOX, OLD_HASH), False,
     Update("evt-1", DESIRED)),
    ("update-no-hash-recorded", DESIRED, Recorded("evt-1", MAILBOX, None), False,
     Update("evt-1", DESIRED)),
    ("update-forced-hash-equal", DESIRED, Recorded("evt-1", MAILBOX, SAME_HASH), True,
     Update("evt-1", DESIRED)),
    ("update-forced-hash-differs", DESIRED, Recorded("evt-1", MAILBOX, OLD_HASH), True,
     Update("evt-1", DESIRED)),
    ("move-mailbox-changed-hash-equal", DESIRED, Recorded("evt-1", OTHER_MAILBOX, SAME_HASH),
     False, Move(OTHER_MAILBOX, "evt-1", DESIRED)),
    ("move-mailbox-changed-hash-differs", DESIRED, Recorded("evt-1", OTHER_MAILBOX, OLD_HASH),
     False, Move(OTHER_MAILBOX, "evt-1", DESIRED)),
    ("move-forced", DESIRED, Recorded("evt-1", OTHER_MAILBOX, SAME_HASH), True,
     Move(OTHER_MAILBOX, "evt-1", DESIRED)),
]


@pytest.mark.parametrize(
    ("desired", "recorded", "force", "expected"), [c[1:] for c in PLAN_CASES],
    ids=[c[0] for c in PLAN_CASES],
)
def test_plan(
    desired: DesiredEvent | None, recorded: Recorded, force: bool, expected: Action
) -> None:
    assert plan(desired, recorded, force=force) == expected


def test_force_defaults_to_false() -> None:
    assert plan(DESIRED, Recorded("evt-1", MAILBOX, SAME_HASH)) == Noop()


def test_plan_after_a_write_is_a_noop() -> None:
    """What the dispatcher records after executing an action makes the next plan a no-op."""
    first = plan(DESIRED, Recorded())
    assert isinstance(first, Create)
    recorded = Recorded("evt-1", first.desired.mailbox, first.desired.content_hash())
    assert plan(DESIRED, recorded) == Noop()
    moved = dataclasses.replace(DESIRED, mailbox=OTHER_MAILBOX)
    action = plan(moved, recorded)
    assert action == Move(MAILBOX, "evt-1", moved)
    after_move = Recorded("evt-2", moved.mailbox, moved.content_hash())
    assert plan(moved, after_move) == Noop()


# --- coalescing (docs/guarantees.md): three quick changes -> one write of the latest state ------


def _absence(version: int, *, name: str, end: str) -> Absence:
    data = {
        "id": "abs-1234",
        "version": version,
        "status": "approved",
        "employee": {"id": "emp-42", "email": MAILBOX, "establishment_id": "paris",
                     "time_zone": "Europe/Paris"},
        "account": {"id": "leave", "name": name, "counted_as_absence": True,
                    "public_reason": False},
        "start": {"date": "2026-12-01", "half": "am"},
        "end": {"date": end, "half": "pm"},
    }
    return absence_from_data("acme", False, data)


VERSIONS = [
    _absence(1, name="Paid leave", end="2026-12-03"),
    _absence(2, name="Unpaid leave", end="2026-12-04"),
    _absence(3, name="Parental leave", end="2026-12-10"),
]
CONFIG = SyncConfig(id="acme-o365", tenant="acme", provider="microsoft365", hide_labels=False)


@pytest.mark.parametrize("already_written", [False, True], ids=["never-written", "written-v0"])
def test_three_quick_changes_give_one_write_of_the_latest_state(already_written: bool) -> None:
    renders = [render(a, CONFIG) for a in VERSIONS]
    assert len({d.content_hash() for d in renders if d is not None}) == 3
    latest = max(VERSIONS, key=lambda a: a.version)  # only the latest state is kept
    desired = render(latest, CONFIG)
    assert desired is not None
    if already_written:
        v0 = render(_absence(0, name="Paid leave", end="2026-12-02"), CONFIG)
        assert v0 is not None
        recorded = Recorded("evt-1", v0.mailbox, v0.content_hash())
    else:
        recorded = Recorded()
    action = plan(desired, recorded)
    expected: Action = Update("evt-1", desired) if already_written else Create(desired)
    assert action == expected
    assert isinstance(action, Create | Update)
    written = action.desired
    assert written.subject == "Parental leave"
    assert written.end == dt.datetime(2026, 12, 11)
    assert written == renders[2]  # exactly the third version's rendering
    # Once written, none of the three versions causes another write of the same state.
    after = Recorded("evt-1", written.mailbox, written.content_hash())
    assert plan(desired, after) == Noop()


def test_a_change_that_comes_back_needs_no_write() -> None:
    """v1 written, v2 changes, v3 restores v1's content before dispatch: nothing to write."""
    v1 = render(_absence(1, name="Paid leave", end="2026-12-03"), CONFIG)
    v3 = render(_absence(3, name="Paid leave", end="2026-12-03"), CONFIG)
    assert v1 is not None and v3 is not None
    assert plan(v3, Recorded("evt-1", v1.mailbox, v1.content_hash())) == Noop()
