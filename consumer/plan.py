"""Planning (docs/rendering.md, docs/guarantees.md): desired vs recorded -> one action.

Pure code. The dispatcher's executor performs the action and records the outcome;
`plan_batch` plans a whole leased batch in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from consumer.render import DesiredEvent


@dataclass(frozen=True, slots=True)
class Recorded:
    """What the mapping table says was last written for a pair."""

    event_id: str | None = None
    mailbox: str | None = None
    applied_hash: str | None = None


@dataclass(frozen=True, slots=True)
class Create:
    desired: DesiredEvent


@dataclass(frozen=True, slots=True)
class Update:
    event_id: str
    desired: DesiredEvent


@dataclass(frozen=True, slots=True)
class Move:
    old_mailbox: str
    old_event_id: str
    desired: DesiredEvent


@dataclass(frozen=True, slots=True)
class Delete:
    mailbox: str
    event_id: str


@dataclass(frozen=True, slots=True)
class Noop:
    pass


Action = Create | Update | Move | Delete | Noop


def plan(desired: DesiredEvent | None, recorded: Recorded, *, force: bool = False) -> Action:
    if desired is None:
        if recorded.event_id and recorded.mailbox:
            return Delete(recorded.mailbox, recorded.event_id)
        return Noop()
    if not recorded.event_id or not recorded.mailbox:
        return Create(desired)
    if recorded.mailbox != desired.mailbox:
        return Move(recorded.mailbox, recorded.event_id, desired)
    if force or recorded.applied_hash != desired.content_hash():
        return Update(recorded.event_id, desired)
    return Noop()


def plan_batch(
    rows: Iterable[tuple[DesiredEvent | None, Recorded, bool]],
) -> list[tuple[DesiredEvent | None, Action]]:
    """`plan` over a batch of (desired, recorded, force) rows, in order; each row
    comes back with its desired event and its action."""
    return [(desired, plan(desired, recorded, force=force)) for desired, recorded, force in rows]
