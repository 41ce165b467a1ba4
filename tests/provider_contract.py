"""The contract every `Provider` must pass (one interface, one contract).

A test module subclasses `ProviderContract` and defines two fixtures:
`provider` (a ready `Provider`) and `mailbox` (an address that exists in
the calendar behind it, fresh for each test), plus `missing_mailbox`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest

from consumer.providers.base import MAILBOX_NOT_FOUND, EventGone, Provider, ProviderError
from consumer.render import DesiredEvent, Mark
from consumer.targets import TEAM, transaction_id


def desired(mailbox: str, absence_id: str = "abs-1", **changes: object) -> DesiredEvent:
    base: dict[str, object] = {
        "mailbox": mailbox,
        "subject": "Absent",
        "show_as": "busy",
        "all_day": True,
        "start": dt.datetime(2026, 12, 1),
        "end": dt.datetime(2026, 12, 4),
        "time_zone": "Europe/Paris",
        "private": False,
        "category": None,
        "mark": Mark("cfg-1", absence_id),
    }
    base.update(changes)
    return DesiredEvent(**base)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LegacyMark:
    """Stands for a `Mark` in a `DesiredEvent` to write an event marked the way the
    engine did before ids were encoded (`absence-sync:{config}:{absence}`)."""

    mark: Mark

    @property
    def value(self) -> str:
        return self.mark.legacy_value


def legacy(mailbox: str, mark: Mark) -> DesiredEvent:
    return desired(mailbox, mark=LegacyMark(mark))


class ProviderContract:
    async def test_create_then_find(self, provider: Provider, mailbox: str) -> None:
        event = desired(mailbox)
        event_id = await provider.create(event, transaction_id="t-create-find")
        assert event_id
        assert await provider.find(mailbox, event.mark) == [event_id]
        assert await provider.find(mailbox, Mark("cfg-1", "other")) == []
        assert await provider.find(mailbox, Mark("cfg-2", "abs-1")) == []

    async def test_timed_event(self, provider: Provider, mailbox: str) -> None:
        event = desired(
            mailbox,
            all_day=False,
            start=dt.datetime(2026, 3, 29, 9, 0),
            end=dt.datetime(2026, 3, 29, 12, 30),
            show_as="tentative",
        )
        event_id = await provider.create(event, transaction_id="t-timed")
        assert await provider.find(mailbox, event.mark) == [event_id]

    async def test_update(self, provider: Provider, mailbox: str) -> None:
        event = desired(mailbox)
        event_id = await provider.create(event, transaction_id="t-update")
        new_id = await provider.update(mailbox, event_id, desired(mailbox, subject="Paid leave"))
        assert await provider.find(mailbox, event.mark) == [new_id]

    async def test_update_gone_raises_event_gone(self, provider: Provider, mailbox: str) -> None:
        event = desired(mailbox)
        event_id = await provider.create(event, transaction_id="t-gone")
        assert await provider.delete(mailbox, event_id) is True
        with pytest.raises(EventGone):
            await provider.update(mailbox, event_id, event)

    async def test_delete_twice_is_success(self, provider: Provider, mailbox: str) -> None:
        event = desired(mailbox)
        event_id = await provider.create(event, transaction_id="t-delete")
        assert await provider.delete(mailbox, event_id) is True
        assert await provider.delete(mailbox, event_id) is False
        assert await provider.find(mailbox, event.mark) == []

    async def test_retried_create_with_same_transaction_does_not_double(
        self, provider: Provider, mailbox: str
    ) -> None:
        event = desired(mailbox, absence_id="abs-tx")
        first = await provider.create(event, transaction_id="t-same")
        second = await provider.create(event, transaction_id="t-same")
        found = await provider.find(mailbox, event.mark)
        assert len(found) == 1
        assert first == second == found[0]

    async def test_marks_separate_absences(self, provider: Provider, mailbox: str) -> None:
        a = await provider.create(desired(mailbox, "abs-a"), transaction_id="t-a")
        b = await provider.create(desired(mailbox, "abs-b"), transaction_id="t-b")
        assert await provider.find(mailbox, Mark("cfg-1", "abs-a")) == [a]
        assert await provider.find(mailbox, Mark("cfg-1", "abs-b")) == [b]

    async def test_marks_of_colliding_ids_stay_apart(
        self, provider: Provider, mailbox: str
    ) -> None:
        left = desired(mailbox, mark=Mark("cfg:x", "abs-1"))
        right = desired(mailbox, mark=Mark("cfg", "x:abs-1"))
        a = await provider.create(left, transaction_id="t-left")
        b = await provider.create(right, transaction_id="t-right")
        assert await provider.find(mailbox, left.mark) == [a]
        assert await provider.find(mailbox, right.mark) == [b]

    async def test_team_and_employee_events_of_one_absence_stay_apart(
        self, provider: Provider, mailbox: str
    ) -> None:
        """One absence's employee event and team event (each with its target's mark
        and transaction id) in the same calendar: each found by its own mark only;
        deleting one leaves the other; neither create answers with the other."""
        employee = desired(mailbox, "abs-team")
        team = desired(mailbox, "abs-team", mark=Mark("cfg-1", "abs-team", team=True),
                       subject="Jane Doe: Absent", show_as="free")
        a = await provider.create(employee, transaction_id=transaction_id("cfg-1", "abs-team", 1))
        b = await provider.create(
            team, transaction_id=transaction_id("cfg-1", "abs-team", 1, TEAM)
        )
        assert a != b
        assert await provider.find(mailbox, employee.mark) == [a]
        assert await provider.find(mailbox, team.mark) == [b]
        assert await provider.delete(mailbox, b) is True
        assert await provider.find(mailbox, team.mark) == []
        assert await provider.find(mailbox, employee.mark) == [a]

    async def test_missing_mailbox(self, provider: Provider, missing_mailbox: str) -> None:
        with pytest.raises(ProviderError) as info:
            await provider.create(desired(missing_mailbox), transaction_id="t-missing")
        assert info.value.code == MAILBOX_NOT_FOUND
        assert info.value.retriable is False
        assert info.value.hint
