from __future__ import annotations

import itertools

import pytest

from consumer.providers.base import MAILBOX_NOT_FOUND, Provider, ProviderError
from consumer.providers.memory import MemoryCalendar, MemoryProvider
from consumer.render import DesiredEvent
from tests.provider_contract import ProviderContract

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
