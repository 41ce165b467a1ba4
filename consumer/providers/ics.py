"""The `ics` provider: a configuration without a remote calendar.

An `ics` configuration's events are not written anywhere: the worker serves
them as iCalendar feeds, computed from the recorded absences at request time
(`consumer.feeds`). Its work items still go through the dispatcher like any
other configuration's, and this provider settles each one at once, without
any network call: a wanted absence is "published" (synced, with the feed
event's UID as its event id), an unwanted one "withdrawn" (deleted). So the
monitoring view counts what the feeds hold, health reads ok, and nothing is
ever retried or piles up as failures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from consumer.providers.base import Provider, ProviderContext
from consumer.render import DesiredEvent, Mark

if TYPE_CHECKING:
    from consumer.config import SyncConfig


def feed_uid(mark: Mark) -> str:
    """The UID of the feed event for a mark: stable for the (configuration,
    absence) pair, distinct for the team view (its mark differs)."""
    return f"{mark.value}@absence-sync"


class IcsProvider(Provider):
    kind: ClassVar[str] = "ics"

    async def create(self, event: DesiredEvent, *, transaction_id: str) -> str:
        return feed_uid(event.mark)

    async def update(self, mailbox: str, event_id: str, event: DesiredEvent) -> str:
        return feed_uid(event.mark)

    async def delete(self, mailbox: str, event_id: str) -> bool:
        return True

    async def find(self, mailbox: str, mark: Mark) -> list[str]:
        # nothing is ever in doubt: a create cannot half-happen
        return []

    @classmethod
    def from_config(cls, config: SyncConfig, context: ProviderContext) -> Provider:
        return cls()
