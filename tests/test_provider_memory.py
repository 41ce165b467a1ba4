from __future__ import annotations

import itertools

import pytest

from consumer.providers.base import MAILBOX_NOT_FOUND, Provider, ProviderError
from consumer.providers.memory import MemoryCalendar, MemoryProvider
from consumer.render import DesiredEvent, Mark
from tests.provider_contract import ProviderContract, desired, legacy

_boxes = itertools.count()


class StrictMemoryProvider(MemoryProvider):
    """Knows only mailboxes at example.com, like a real directory."""

    async def create(self, event: DesiredEvent, *, transaction_id: str) -> str:
        if not event.mailbox.endswith("@example.com"):
            raise ProviderError(MAILBOX_NOT_FOUND, event.mailbox, retriable=False)
        return await super().create(event, transaction_id=transaction_id)


class TestMemoryProvider(ProviderContract):
    @pytest.fixture
    def provider(self) -> Provider:
        return StrictMemoryProvider(MemoryCalendar())

    @pytest.fixture
    def mailbox(self) -> str:
        return f"user{next(_boxes)}@example.com"

    @pytest.fixture
    def missing_mailbox(self) -> str:
        return "nobody@elsewhere.test"


async def test_finds_marks_written_before_ids_were_encoded() -> None:
    provider = MemoryProvider(MemoryCalendar())
    mark = Mark("cfg-1", "abs:old")
    old = await provider.create(legacy("a@example.com", mark), transaction_id="t-old")
    new = await provider.create(desired("a@example.com", mark=mark), transaction_id="t-new")
    assert await provider.find("a@example.com", mark) == [old, new]
