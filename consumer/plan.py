"""Planning (docs/rendering.md, docs/guarantees.md): desired vs recorded -> one action.

Pure code. The dispatcher executes the action and records the outcome.
"""

from __future__ import annotations

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
