"""Targets: the places one (configuration, absence) pair is written to.

A work item (`sync_items`) is keyed by (configuration, absence, target). The
targets are a small closed set of names, listed here and in the CHECK
constraint `sync_items_target_known` (migration 0011):

* `calendar`: the employee's own calendar (rule 5.5), rendered by `render`;
  every configuration has it, and every item written before targets existed
  is one.
* `team`: the configuration's shared team calendar (`team_calendar:`),
  rendered by `render_team` at the team address; only configurations that
  name one have it.

Each target is planned, retried, adopted after a crash and monitored on its
own: the employee's calendar refusing a write never holds back the team
calendar, and the other way round. A target's events carry their own
ownership mark and their own create transaction ids, so the two never adopt
or deduplicate each other's events.

Adding a target: a migration widening the CHECK, and a `TargetSpec` in
`TARGETS` saying which configurations have it (`applies`) and what it holds
for an absence (`render`, `mark`, `address`). Intake, backfill, resync and
the dispatcher then queue and run its items like the others: they read
`sync_configs.targets`, which `config apply` fills from `targets_of`.
A replica leases only items of the targets it knows (`KNOWN`), so a rolling
upgrade that adds one never hands its items to an older replica.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from consumer.config import SyncConfig
from consumer.events import Absence
from consumer.render import DesiredEvent, Mark, render, render_team

CALENDAR: Final = "calendar"
TEAM: Final = "team"


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """What the engine needs to know of one target.

    * `applies(config)`: whether the configuration writes to this target;
    * `render(absence, config)`: the event the target should hold, or None
      (not wanted, or the configuration no longer has the target: then an
      event written before is deleted from the mailbox its item recorded);
    * `mark(config_id, absence_id)`: the ownership mark its events carry;
    * `address(absence, config)`: the mailbox it writes to, or None.
    """

    name: str
    applies: Callable[[SyncConfig], bool]
    render: Callable[[Absence, SyncConfig], DesiredEvent | None]
    mark: Callable[[str, str], Mark]
    address: Callable[[Absence, SyncConfig], str | None]


def _team_address(config: SyncConfig) -> str | None:
    return config.team_calendar.address if config.team_calendar is not None else None


def _render_team(absence: Absence, config: SyncConfig) -> DesiredEvent | None:
    address = _team_address(config)
    return render_team(absence, config, address) if address is not None else None


def _calendar_address(absence: Absence, config: SyncConfig) -> str | None:
    return absence.employee.target_address if absence.employee is not None else None


TARGETS: dict[str, TargetSpec] = {
    CALENDAR: TargetSpec(
        CALENDAR,
        applies=lambda config: True,
        render=render,
        mark=lambda config_id, absence_id: Mark(config_id, absence_id),
        address=_calendar_address,
    ),
    TEAM: TargetSpec(
        TEAM,
        applies=lambda config: config.team_calendar is not None,
        render=_render_team,
        mark=lambda config_id, absence_id: Mark(config_id, absence_id, team=True),
        address=lambda absence, config: _team_address(config),
    ),
}

#: the targets this version runs, in a stable order
KNOWN: tuple[str, ...] = tuple(TARGETS)


def spec(target: str) -> TargetSpec:
    """The spec of a known target; KeyError for another name."""
    return TARGETS[target]


def targets_of(config: SyncConfig) -> list[str]:
    """The targets `config` writes to (always `calendar` first)."""
    return [name for name, target in TARGETS.items() if target.applies(config)]


def transaction_id(config_id: str, absence_id: str, generation: int, target: str = CALENDAR) -> str:
    """The engine's create transaction id: deterministic per (pair, target,
    generation), so a retried create never doubles. The calendar target keeps
    the form it had before targets existed (creates in doubt across an upgrade
    keep their id); other targets add their name."""
    if target == CALENDAR:
        return f"{config_id}/{absence_id}/{generation}"
    return f"{config_id}/{absence_id}/{target}/{generation}"
