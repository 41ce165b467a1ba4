"""Automatic replies at the provider boundary, against the HTTPS test servers.

One contract (`ReplyContract`) every provider that sets automatic replies
passes: a fresh mailbox reads as disabled; a scheduled write reads back with
the same instants, audience and message text (the server may rewrite the
HTML, so "ours" is the digest of the read-back, stable on later reads); the
employee's edit changes that digest; disabling keeps the messages; failures
arrive in the error vocabulary (throttling with Retry-After). Then each
provider's own payload details.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from consumer.providers.base import (
    ACCESS_DENIED,
    MAILBOX_NOT_FOUND,
    THROTTLED,
    Provider,
    ProviderError,
)
from consumer.providers.exchange import ExchangeProvider
from consumer.providers.google import GoogleProvider
from consumer.providers.microsoft365 import Microsoft365Provider
from consumer.replies import ReplySetting
from tests.ews_server import EwsServer
from tests.google_server import CALENDAR_SCOPE, GMAIL_SCOPE, GoogleServer
from tests.graph_server import GraphServer
from tests.test_provider_exchange import ews  # noqa: F401 - fixture
from tests.test_provider_exchange import make_provider as make_exchange
from tests.test_provider_google import google  # noqa: F401 - fixture
from tests.test_provider_microsoft365 import graph, make_provider  # noqa: F401 - fixture

UTC = dt.UTC
_boxes = itertools.count()

START = dt.datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
END = dt.datetime(2026, 12, 3, 23, 0, tzinfo=UTC)
OURS = ReplySetting("scheduled", START, END, "Jane is away until 2026-12-04 & back",
                    "I am out of the office.", "known", zone="Europe/Paris")


def _text(message: str) -> str:
    import html
    import re

    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", message)).split())


class ReplyContract:
    """What every provider with `supports_replies` does."""

    provider: Provider

    def mailbox(self) -> str:
        raise NotImplementedError

    def user_edits(self, mailbox: str) -> None:
        """The employee writes their own reply in their mail client."""
        raise NotImplementedError

    def script_throttle(self, mailbox: str) -> None:
        raise NotImplementedError

    def missing_mailbox(self) -> str:
        raise NotImplementedError

    async def test_a_fresh_mailbox_has_no_active_reply(self) -> None:
        current = await self.provider.read_reply(self.mailbox())
        assert current.status == "disabled"
        assert not current.active(START)

    async def test_a_scheduled_write_reads_back_the_same_reply(self) -> None:
        box = self.mailbox()
        ours = self.provider.reply_form(OURS)
        stored = await self.provider.write_reply(box, ours)
        assert stored.status == "scheduled"
        assert (stored.start, stored.end) == (START, END)
        assert stored.audience == "known"
        assert _text(stored.internal) == _text(ours.internal)
        assert _text(stored.external) == _text(ours.external)
        assert stored.fingerprint() == ours.fingerprint()
        again = await self.provider.read_reply(box)
        assert again.digest() == stored.digest()

    async def test_the_employees_edit_changes_the_digest(self) -> None:
        box = self.mailbox()
        stored = await self.provider.write_reply(box, OURS)
        self.user_edits(box)
        edited = await self.provider.read_reply(box)
        assert edited.digest() != stored.digest()
        assert edited.active(START)

    async def test_disabling_keeps_the_messages(self) -> None:
        box = self.mailbox()
        await self.provider.write_reply(box, OURS)
        off = await self.provider.write_reply(box, ReplySetting("disabled"))
        assert off.status == "disabled"
        assert _text(off.external) == _text(OURS.external)

    async def test_a_missing_mailbox(self) -> None:
        with pytest.raises(ProviderError) as info:
            await self.provider.read_reply(self.missing_mailbox())
        assert info.value.code == MAILBOX_NOT_FOUND

    async def test_throttling_carries_retry_after(self) -> None:
        box = self.mailbox()
        self.script_throttle(box)
        with pytest.raises(ProviderError) as info:
            await self.provider.write_reply(box, OURS)
        assert info.value.code == THROTTLED and info.value.retriable
        assert info.value.retry_after is not None and info.value.retry_after >= 1


class TestGraphReplies(ReplyContract):
    @pytest.fixture(autouse=True)
    async def _provider(self, graph: GraphServer) -> AsyncIterator[None]:  # noqa: F811
        self.server = graph
        provider = make_provider(graph)
        self.provider = provider
        yield
        await provider.close()

    def mailbox(self) -> str:
        return self.server.add_mailbox(f"reply{next(_boxes)}@acme.test")

    def missing_mailbox(self) -> str:
        return "nobody-here@acme.test"

    def user_edits(self, mailbox: str) -> None:
        self.server.set_user_reply(mailbox, {
            "status": "alwaysEnabled", "internalReplyMessage": "<p>Gone fishing</p>",
        })

    def script_throttle(self, mailbox: str) -> None:
        self.server.script(mailbox, 429, "ApplicationThrottled", retry_after="2")

    async def test_payload_is_graphs_automatic_replies_setting(self) -> None:
        box = self.mailbox()
        await self.provider.write_reply(box, OURS)
        held: dict[str, Any] = self.server.reply_of(box)
        assert held["status"] == "scheduled"
        assert held["externalAudience"] == "contactsOnly"
        # sent in the employee's zone (Paris, UTC+1), stored by Graph in UTC
        assert held["scheduledStartDateTime"]["dateTime"].startswith("2026-11-30T23:00:00")
        assert held["scheduledEndDateTime"]["dateTime"].startswith("2026-12-03T23:00:00")
        assert "<html>" in held["internalReplyMessage"]  # Graph rewrote it

    @pytest.mark.parametrize(("audience", "graph_value"),
                             [("none", "none"), ("known", "contactsOnly"), ("all", "all")])
    async def test_audiences(self, audience: str, graph_value: str) -> None:
        box = self.mailbox()
        setting = ReplySetting("scheduled", START, END, "a", "b", audience,  # type: ignore[arg-type]
                               zone="UTC")
        stored = await self.provider.write_reply(box, setting)
        assert self.server.reply_of(box)["externalAudience"] == graph_value
        assert stored.audience == audience

    async def test_without_the_mailbox_settings_permission(self) -> None:
        box = self.mailbox()
        self.server.settings_denied.add(box.lower())
        with pytest.raises(ProviderError) as info:
            await self.provider.write_reply(box, OURS)
        assert info.value.code == ACCESS_DENIED
        assert "MailboxSettings.ReadWrite" in info.value.hint

    def test_it_says_it_supports_replies(self) -> None:
        assert Microsoft365Provider.supports_replies and Microsoft365Provider.reply_html


class TestExchangeReplies(ReplyContract):
    @pytest.fixture(autouse=True)
    async def _provider(self, ews: EwsServer) -> AsyncIterator[None]:  # noqa: F811
        self.server = ews
        provider = make_exchange(ews)
        self.provider = provider
        yield
        await provider.close()

    def mailbox(self) -> str:
        return self.server.add_mailbox(f"oof{next(_boxes)}@acme.test")

    def missing_mailbox(self) -> str:
        return "nobody-here@acme.test"

    def user_edits(self, mailbox: str) -> None:
        self.server.set_user_oof(mailbox, state="Enabled", internal="Gone fishing")

    def script_throttle(self, mailbox: str) -> None:
        self.server.script("SetUserOofSettingsRequest", mailbox, back_off_ms=2000)

    async def test_payload_is_scheduled_in_utc_with_impersonation(self) -> None:
        box = self.mailbox()
        await self.provider.write_reply(box, OURS)
        held = self.server.oof_of(box)
        assert held["state"] == "Scheduled" and held["audience"] == "Known"
        assert (held["start"], held["end"]) == ("2026-11-30T23:00:00Z", "2026-12-03T23:00:00Z")
        assert "<html>" in held["internal"]  # Exchange rewrote it
        impersonated = {r.mailbox for r in self.server.requests
                        if r.operation == "SetUserOofSettingsRequest"}
        assert box.lower() in impersonated

    def test_it_says_it_supports_replies(self) -> None:
        assert ExchangeProvider.supports_replies and ExchangeProvider.reply_html


def make_gmail(google: GoogleServer, key: str) -> GoogleProvider:  # noqa: F811
    from consumer.config import SyncConfig
    from consumer.providers.base import ProviderContext, make_ssl_context
    from consumer.settings import Settings

    settings = Settings(google_token_url=google.token_url, google_api_url=google.api_url,
                        google_gmail_url=google.gmail_url, ca_bundle=google.ca_path,
                        request_timeout_seconds=5.0)
    config = SyncConfig(id="acme-google", tenant="acme", provider="google",
                        secrets={"service_account": key})
    provider = GoogleProvider.from_config(config, ProviderContext(settings,
                                                                  make_ssl_context(settings)))
    assert isinstance(provider, GoogleProvider)
    return provider


GMAIL_OURS = ReplySetting("scheduled", START, END, "", "I am out of the office.", "known",
                          "Out of office")


class TestGmailReplies(ReplyContract):
    @pytest.fixture(autouse=True)
    async def _provider(self, google: GoogleServer) -> AsyncIterator[None]:  # noqa: F811
        self.server = google
        key = google.add_account(f"replies{next(_boxes)}@acme-project.iam.gserviceaccount.com",
                                 scopes=(CALENDAR_SCOPE, GMAIL_SCOPE))
        provider = make_gmail(google, key)
        self.provider = provider
        yield
        await provider.close()

    def mailbox(self) -> str:
        return self.server.add_user(f"vac{next(_boxes)}@acme.test")

    def missing_mailbox(self) -> str:
        return "nobody-here@acme.test"

    def user_edits(self, mailbox: str) -> None:
        self.server.set_user_vacation(mailbox, {
            "enableAutoReply": True, "responseSubject": "Away",
            "responseBodyPlainText": "Gone fishing"})

    def script_throttle(self, mailbox: str) -> None:
        self.server.script(mailbox, 429, "rateLimitExceeded")

    async def test_a_missing_mailbox(self) -> None:
        # Google refuses a token for a user outside the domain
        with pytest.raises(ProviderError) as info:
            await self.provider.read_reply(self.missing_mailbox())
        assert info.value.code in (MAILBOX_NOT_FOUND, ACCESS_DENIED)

    async def test_throttling_carries_retry_after(self) -> None:
        box = self.mailbox()
        self.script_throttle(box)
        with pytest.raises(ProviderError) as info:
            await self.provider.write_reply(box, GMAIL_OURS)
        assert info.value.code == THROTTLED and info.value.retriable

    @pytest.mark.parametrize(("audience", "domain", "contacts", "message"), [
        ("none", True, False, "inside"), ("known", False, True, "outside"),
        ("all", False, False, "outside"),
    ])
    async def test_one_message_per_audience(self, audience: str, domain: bool, contacts: bool,
                                            message: str) -> None:
        box = self.mailbox()
        wish = self.provider.reply_form(ReplySetting(
            "scheduled", START, END, "inside", "outside", audience,  # type: ignore[arg-type]
            "Out of office"))
        stored = await self.provider.write_reply(box, wish)
        held = self.server.vacation(box)
        assert held["enableAutoReply"] is True
        assert (held["restrictToDomain"], held["restrictToContacts"]) == (domain, contacts)
        assert held["responseBodyPlainText"] == message
        assert held["responseSubject"] == "Out of office"
        assert (held["startTime"], held["endTime"]) == (
            str(int(START.timestamp() * 1000)), str(int(END.timestamp() * 1000)))
        assert stored.digest() == wish.digest()

    async def test_without_the_gmail_scope_in_the_delegation(self) -> None:
        key = self.server.add_account(
            f"nogmail{next(_boxes)}@acme-project.iam.gserviceaccount.com",
            scopes=(CALENDAR_SCOPE,))
        provider = make_gmail(self.server, key)
        try:
            with pytest.raises(ProviderError) as info:
                await provider.write_reply(self.mailbox(), GMAIL_OURS)
        finally:
            await provider.close()
        assert info.value.code == ACCESS_DENIED
        assert "gmail.settings.basic" in info.value.hint
