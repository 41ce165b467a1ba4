"""The Exchange provider against an HTTPS EWS stand-in (tests/ews_server.py).

Besides the provider contract (basic auth on Exchange 2019, NTLM on Exchange
2010): the payload of items, every error mapping, the known pitfalls of
exchangelib 5.6 (401 read as throttling, 503 waits, the pool deadlock under
ErrorServerBusy, no idempotency key, inclusive all-day ends, version probing,
per-item errors of bulk calls), TLS, and the warnings.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from consumer.config import SyncConfig
from consumer.providers import microsoft365
from consumer.providers.base import (
    ACCESS_DENIED,
    AUTH_FAILED,
    MAILBOX_NOT_FOUND,
    PROVIDER_ERROR,
    SERVER_UNREACHABLE,
    THROTTLED,
    TLS_UNTRUSTED_CERTIFICATE,
    EventGone,
    Provider,
    ProviderContext,
    ProviderError,
    make_ssl_context,
)
from consumer.providers.exchange import (
    MARK_PROPERTY_NAME,
    MARK_PROPERTY_SET,
    ExchangeProvider,
)
from consumer.render import Mark
from consumer.settings import Settings
from tests.ews_server import EwsServer, Item
from tests.provider_contract import ProviderContract, desired

_boxes = itertools.count()


async def started(directory: Path, **options: Any) -> EwsServer:
    server = EwsServer(**options)
    await server.start(directory)
    return server


@pytest.fixture(scope="module")
async def ews(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EwsServer]:
    server = await started(tmp_path_factory.mktemp("ews"))
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def ews2010(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EwsServer]:
    server = await started(tmp_path_factory.mktemp("ews2010"), version="2010", auth=("ntlm",))
    yield server
    await server.stop()


def make_provider(server: EwsServer, *, auth: str | None = "basic", password: str | None = None,
                  url: str | None = None, timeout: float = 5.0, ca: Path | None = None,
                  **block: Any) -> ExchangeProvider:
    settings = Settings(ca_bundle=ca or server.ca_path, request_timeout_seconds=timeout)
    settings_block: dict[str, Any] = {"url": url or server.url, "username": server.username,
                                      **block}
    if auth is not None:
        settings_block["auth"] = auth
    config = SyncConfig(
        id="acme-ews", tenant="acme", provider="exchange", provider_settings=settings_block,
        secrets={"password": password or server.password},
    )
    provider = ExchangeProvider.from_config(config, ProviderContext(settings,
                                                                    make_ssl_context(settings)))
    assert isinstance(provider, ExchangeProvider)
    return provider


@pytest.fixture
async def exchange(ews: EwsServer) -> AsyncIterator[ExchangeProvider]:
    provider = make_provider(ews)
    yield provider
    await provider.close()


def new_mailbox(server: EwsServer, name: str = "user") -> str:
    return server.add_mailbox(f"{name}{next(_boxes)}@acme.test")


def only_item(server: EwsServer, mailbox: str) -> Item:
    [item] = server.calendar(mailbox)
    return item


def marks(server: EwsServer, mailbox: str) -> dict[str, int]:
    found = server.marked(mailbox, MARK_PROPERTY_SET, MARK_PROPERTY_NAME)
    return {value: len(items) for value, items in found.items()}


async def failure(call: Awaitable[Any]) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await call
    return info.value


class TestExchangeProviderBasic2019(ProviderContract):
    @pytest.fixture
    async def provider(self, ews: EwsServer) -> AsyncIterator[Provider]:
        provider = make_provider(ews)
        yield provider
        await provider.close()

    @pytest.fixture
    def mailbox(self, ews: EwsServer) -> str:
        return new_mailbox(ews)

    @pytest.fixture
    def missing_mailbox(self) -> str:
        return "nobody@acme.test"


class TestExchangeProviderNtlm2010(ProviderContract):
    @pytest.fixture
    async def provider(self, ews2010: EwsServer) -> AsyncIterator[Provider]:
        provider = make_provider(ews2010, auth=None)  # NTLM is the default
        yield provider
        await provider.close()

    @pytest.fixture
    def mailbox(self, ews2010: EwsServer) -> str:
        return new_mailbox(ews2010)

    @pytest.fixture
    def missing_mailbox(self) -> str:
        return "nobody@acme.test"


# ---------------------------------------------------------------- payloads


async def test_all_day_item_payload(ews: EwsServer, exchange: ExchangeProvider) -> None:
    box = new_mailbox(ews)
    event = desired(box, subject="Paid leave", show_as="oof", private=True, category="Absences",
                    time_zone="Europe/Paris")  # 1 to 3 December, end exclusive on the 4th
    event_id = await exchange.create(event, transaction_id="cfg-1/abs-1/1")
    item = only_item(ews, box)
    assert item.id == event_id
    assert item.subject == "Paid leave"
    assert item.all_day is True
    assert item.fields["StartTimeZone"] == item.fields["EndTimeZone"] == "Romance Standard Time"
    # exchangelib's date end is inclusive: the item ends at midnight starting the 4th
    assert (item.local_start, item.local_end) == (dt.datetime(2026, 12, 1),
                                                  dt.datetime(2026, 12, 4))
    assert item.free_busy == "OOF"
    assert item.fields["Sensitivity"] == "Private"
    assert item.categories == ["Absences"]
    assert item.fields["ReminderIsSet"] in ("false", "0")
    assert item.fields["IsResponseRequested"] in ("false", "0")
    assert item.ext(MARK_PROPERTY_SET, MARK_PROPERTY_NAME) == "absence-sync:cfg-1:abs-1"
    assert not ews.anomalies  # no body, attendees, reminder, invitation, odd midnights
    # the same named property as the microsoft365 provider: marks survive a migration
    assert (
        f"String {{{MARK_PROPERTY_SET}}} Name {MARK_PROPERTY_NAME}"
    ) == microsoft365.MARK_PROPERTY_ID


async def test_timed_item_keeps_wall_clock_across_dst(ews: EwsServer,
                                                      exchange: ExchangeProvider) -> None:
    box = new_mailbox(ews)
    event = desired(box, all_day=False, start=dt.datetime(2026, 3, 7, 13, 30),
                    end=dt.datetime(2026, 3, 9, 12, 30), time_zone="America/New_York",
                    show_as="tentative")  # New York moves its clocks on 8 March 2026
    await exchange.create(event, transaction_id="t-dst")
    item = only_item(ews, box)
    assert item.all_day is False
    assert item.fields["StartTimeZone"] == "Eastern Standard Time"
    assert (item.local_start, item.local_end) == (dt.datetime(2026, 3, 7, 13, 30),
                                                  dt.datetime(2026, 3, 9, 12, 30))
    assert item.start.utcoffset() == dt.timedelta(hours=-5)
    assert item.end.utcoffset() == dt.timedelta(hours=-4)
    assert item.free_busy == "Tentative"
    assert item.fields["Sensitivity"] == "Normal"
    assert item.categories == []


@pytest.mark.parametrize(("show_as", "status"), [
    ("free", "Free"), ("tentative", "Tentative"), ("busy", "Busy"), ("oof", "OOF"),
    ("workingElsewhere", "WorkingElsewhere"),
])
async def test_show_as_is_legacy_free_busy_status(ews: EwsServer, exchange: ExchangeProvider,
                                                  show_as: str, status: str) -> None:
    box = new_mailbox(ews)
    await exchange.create(desired(box, show_as=show_as), transaction_id=f"t-{show_as}")
    assert only_item(ews, box).free_busy == status


async def test_working_elsewhere_is_free_before_exchange_2013(ews2010: EwsServer) -> None:
    provider = make_provider(ews2010, auth="ntlm")
    try:
        box = new_mailbox(ews2010)
        await provider.create(desired(box, show_as="workingElsewhere"), transaction_id="t-we")
    finally:
        await provider.close()
    assert only_item(ews2010, box).free_busy == "Free"


async def test_update_replaces_every_field(ews: EwsServer, exchange: ExchangeProvider) -> None:
    box = new_mailbox(ews)
    event_id = await exchange.create(
        desired(box, category="Absences", private=True), transaction_id="t-upd"
    )
    new = desired(box, subject="Remote work", show_as="workingElsewhere", all_day=False,
                  start=dt.datetime(2026, 12, 2, 13, 30), end=dt.datetime(2026, 12, 2, 18, 0),
                  time_zone="Asia/Tokyo")
    assert await exchange.update(box, event_id, new) == event_id
    item = only_item(ews, box)
    assert (item.subject, item.free_busy, item.all_day) == ("Remote work", "WorkingElsewhere",
                                                            False)
    assert item.fields["StartTimeZone"] == "Tokyo Standard Time"
    assert (item.local_start, item.local_end) == (dt.datetime(2026, 12, 2, 13, 30),
                                                  dt.datetime(2026, 12, 2, 18, 0))
    assert item.categories == [] and item.fields["Sensitivity"] == "Normal"
    assert item.ext(MARK_PROPERTY_SET, MARK_PROPERTY_NAME) == "absence-sync:cfg-1:abs-1"
    assert item.updates == 1 and not ews.anomalies


# ---------------------------------------------------------------- batching and bulk results


async def test_concurrent_operations_of_a_mailbox_share_one_bulk_request(
    ews: EwsServer, exchange: ExchangeProvider
) -> None:
    box = new_mailbox(ews)
    ids = await asyncio.gather(*(
        exchange.create(desired(box, f"abs-{n}"), transaction_id=f"t-bulk-{n}") for n in range(12)
    ))
    assert len(set(ids)) == 12
    assert ews.operations(box) == {"CreateItem": 1}
    gone = ids[0]
    assert await exchange.delete(box, gone) is True
    before = ews.operations(box)["DeleteItem"]
    results = await asyncio.gather(*(exchange.delete(box, i) for i in ids))
    assert results == [False] + [True] * 11  # ErrorItemNotFound is one item's result
    assert ews.operations(box)["DeleteItem"] == before + 1
    assert ews.calendar(box) == []


async def test_a_refused_item_does_not_lose_the_others(ews: EwsServer,
                                                       exchange: ExchangeProvider) -> None:
    """exchangelib raises most per-item errors of bulk calls, which would lose the
    results of the items stored in the same request."""
    box = new_mailbox(ews)
    ews.refuse_subjects["Refused"] = "ErrorQuotaExceeded"
    try:
        outcomes = await asyncio.gather(*(
            exchange.create(desired(box, f"abs-{n}", subject="Refused" if n == 2 else "Absent"),
                            transaction_id=f"t-refused-{n}")
            for n in range(5)
        ), return_exceptions=True)
        first = [o for o in outcomes if isinstance(o, str)]
        changed = {i: desired(box, f"abs-{i}", subject="Refused" if i == 1 else "Paid leave")
                   for i in range(len(first))}
        updated = await asyncio.gather(*(
            exchange.update(box, first[i], changed[i]) for i in changed
        ), return_exceptions=True)
    finally:
        del ews.refuse_subjects["Refused"]
    refused = outcomes[2]
    assert isinstance(refused, ProviderError) and not isinstance(refused, EventGone)
    assert "ErrorQuotaExceeded" in refused.message and refused.retriable is False
    assert len(first) == 4 and len(ews.calendar(box)) == 4
    assert isinstance(updated[1], ProviderError) and "ErrorQuotaExceeded" in updated[1].message
    assert [u for i, u in enumerate(updated) if i != 1] == [first[0], first[2], first[3]]
    # one request each, and no lookups: every item had its own result
    assert ews.operations(box) == {"CreateItem": 1, "UpdateItem": 1}


# ---------------------------------------------------------------- error mappings


async def test_unknown_mailbox_is_mailbox_not_found(ews: EwsServer,
                                                    exchange: ExchangeProvider) -> None:
    error = await failure(exchange.create(desired("ghost@acme.test"), transaction_id="t-ghost"))
    assert (error.code, error.retriable) == (MAILBOX_NOT_FOUND, False)
    assert "ErrorNonExistentMailbox" in error.message
    assert "ghost@acme.test" in error.hint and "calendar_address" in error.hint


@pytest.mark.parametrize("code", ["ErrorImpersonateUserDenied", "ErrorAccessDenied"])
async def test_refused_impersonation_is_access_denied(ews: EwsServer, exchange: ExchangeProvider,
                                                      code: str) -> None:
    box = new_mailbox(ews, "denied")
    if code == "ErrorImpersonateUserDenied":
        ews.impersonation_denied.add(box.lower())
    else:
        ews.script("CreateItem", box, fault=code, message="Access is denied.")
    error = await failure(exchange.create(desired(box), transaction_id="t-denied"))
    assert (error.code, error.retriable) == (ACCESS_DENIED, False)
    assert code in error.message
    for words in ("ApplicationImpersonation", "management scope", ews.username, box):
        assert words in error.hint


async def test_wrong_password_fails_fast_with_auth_failed_and_is_remembered(
    ews: EwsServer,
) -> None:
    provider = make_provider(ews, password="not-the-password")
    box = new_mailbox(ews)
    try:
        started_at = time.monotonic()
        error = await failure(provider.create(desired(box), transaction_id="t-401"))
        assert time.monotonic() - started_at < 5  # exchangelib alone would back off for an hour
        assert (error.code, error.retriable) == (AUTH_FAILED, False)
        assert "401" in error.message and ews.username in error.hint
        assert "not-the-password" not in error.message + error.hint
        seen = len(ews.requests)
        # a burst of calls does not become a burst of failed sign-ins (account lockout)
        more = await asyncio.gather(*(
            provider.delete(box, f"id-{n}") for n in range(5)
        ), return_exceptions=True)
        assert all(isinstance(e, ProviderError) and e.code == AUTH_FAILED for e in more)
        assert len(ews.requests) == seen
    finally:
        await provider.close()


@pytest.mark.parametrize("auth", ["basic", "ntlm"])
async def test_http_401_is_auth_failed(ews: EwsServer, auth: str) -> None:
    provider = make_provider(ews, auth=auth)
    box = new_mailbox(ews)
    try:
        await provider.create(desired(box), transaction_id="t-ok")
        ews.script("auth", status=401, times=3)
        started_at = time.monotonic()
        error = await failure(provider.create(desired(box, "abs-2"), transaction_id="t-401b"))
    finally:
        await provider.close()
        ews.scripts.clear()
    assert time.monotonic() - started_at < 5
    assert (error.code, error.retriable) == (AUTH_FAILED, False)


@pytest.mark.parametrize(("offered", "announce", "auth", "chosen"), [
    (("ntlm", "basic"), True, None, "ntlm"), (("basic",), True, None, "basic"),
    (("ntlm",), True, None, "ntlm"), (("ntlm", "basic"), True, "basic", "basic"),
    (("basic",), False, None, "basic"),
])
async def test_without_auth_ntlm_is_used_unless_the_server_does_not_offer_it(
    tmp_path: Path, offered: tuple[str, ...], announce: bool, auth: str | None, chosen: str
) -> None:
    server = await started(tmp_path / "auth", auth=offered, announce=announce)
    provider = make_provider(server, auth=auth)
    box = server.add_mailbox("jane@acme.test")
    try:
        await provider.create(desired(box), transaction_id="t-auth")
    finally:
        await provider.close()
        await server.stop()
    assert len(server.calendar(box)) == 1
    assert (server.handshakes > 0) is (chosen == "ntlm")


async def test_ntlm_against_a_basic_only_server_says_so(tmp_path: Path) -> None:
    server = await started(tmp_path / "basic-only", auth=("basic",))
    provider = make_provider(server, auth="ntlm")
    try:
        error = await failure(provider.create(desired(server.add_mailbox("jane@acme.test")),
                                              transaction_id="t-ntlm"))
    finally:
        await provider.close()
        await server.stop()
    assert error.code == AUTH_FAILED
    assert "exchange.auth: basic" in error.hint


async def test_ntlm_signs_in_once_per_connection(ews: EwsServer) -> None:
    provider = make_provider(ews, auth="ntlm")
    box = new_mailbox(ews)
    before = ews.handshakes
    try:
        for n in range(4):
            await provider.create(desired(box, f"abs-{n}"), transaction_id=f"t-ntlm-{n}")
    finally:
        await provider.close()
    assert 1 <= ews.handshakes - before <= provider.max_connections
    assert {r.user for r in ews.requests if r.mailbox == box.lower()} == {
        f"{ews.domain}\\{ews.user}"
    }


async def test_item_not_found(ews: EwsServer, exchange: ExchangeProvider) -> None:
    box = new_mailbox(ews)
    event_id = await exchange.create(desired(box), transaction_id="t-nf")
    ews.items[box.lower()].clear()  # the employee deleted it
    assert await exchange.delete(box, event_id) is False
    with pytest.raises(EventGone):
        await exchange.update(box, event_id, desired(box))


async def test_server_busy_is_throttled_and_its_back_off_is_honoured(ews: EwsServer) -> None:
    provider = make_provider(ews, timeout=10.0)
    box = new_mailbox(ews)
    try:
        ews.script("CreateItem", box, back_off_ms=3000)
        started_at = time.monotonic()
        error = await failure(provider.create(desired(box), transaction_id="t-busy"))
        # failed at once: exchangelib alone would sleep the back-off and send again
        assert time.monotonic() - started_at < 2.5
        assert (error.code, error.retriable, error.retry_after) == (THROTTLED, True, 3.0)
        assert "ErrorServerBusy" in error.message and error.hint
        # Exchange charges impersonated calls to the target mailbox: others go on
        other = new_mailbox(ews)
        await provider.create(desired(other), transaction_id="t-other")
        assert time.monotonic() - started_at < 2.5
        # the next call for the mailbox waits the back-off out (it fits in its timeout)
        await provider.create(desired(box), transaction_id="t-busy")
        assert time.monotonic() - started_at >= 2.9
    finally:
        await provider.close()
    assert not ews.early
    assert len(ews.calendar(box)) == 1


async def test_server_busy_for_each_item_keeps_its_back_off(
    ews: EwsServer, exchange: ExchangeProvider
) -> None:
    box = new_mailbox(ews)
    ews.script("CreateItem", box, back_off_ms=800, per_item=True)
    errors = await asyncio.gather(*(
        failure(exchange.create(desired(box, f"abs-{n}"), transaction_id=f"t-pi-{n}"))
        for n in range(3)
    ))
    assert {(e.code, e.retry_after) for e in errors} == {(THROTTLED, 0.8)}
    assert ews.operations(box) == {"CreateItem": 1}  # a refusal: nothing to look up


async def test_a_back_off_longer_than_the_timeout_fails_later_calls_without_requests(
    ews: EwsServer,
) -> None:
    provider = make_provider(ews, timeout=1.0)
    box = new_mailbox(ews)
    try:
        ews.script("CreateItem", box, back_off_ms=60_000)
        first = await failure(provider.create(desired(box), transaction_id="t-long"))
        seen = len(ews.requests)
        second = await failure(provider.find(box, Mark("cfg-1", "abs-1")))
        third = await failure(provider.delete(box, "some-id"))
    finally:
        await provider.close()
    assert first.retry_after == 60.0
    for error in (second, third):
        assert error.code == THROTTLED and error.retry_after is not None
        assert 55 < error.retry_after <= 60
    assert len(ews.requests) == seen and not ews.early


@pytest.mark.parametrize(("retry_after", "code", "expected"),
                         [(None, PROVIDER_ERROR, None), ("7", THROTTLED, 7.0)])
async def test_503_fails_fast_and_retriable(ews: EwsServer, retry_after: str | None, code: str,
                                            expected: float | None) -> None:
    provider = make_provider(ews)
    box = new_mailbox(ews)
    try:
        await provider.delete(box, "warm-up")  # the version probe is done
        ews.script("DeleteItem", box, status=503, retry_after=retry_after)
        started_at = time.monotonic()
        error = await failure(provider.delete(box, "some-id"))
    finally:
        await provider.close()
    # exchangelib would wait 10 s, 20 s, ... on a 503 without Retry-After
    assert time.monotonic() - started_at < 5
    # 503 with Retry-After is throttling, as for every provider
    assert (error.code, error.retriable, error.retry_after) == (code, True, expected)
    assert "503" in error.message


async def test_503_after_a_stored_create_does_not_double_it(
    ews: EwsServer, exchange: ExchangeProvider
) -> None:
    box = new_mailbox(ews)
    ews.script("CreateItem", box, status=503, after=True)
    event = desired(box)
    event_id = await exchange.create(event, transaction_id="t-503-after")
    assert [i.id for i in ews.calendar(box)] == [event_id]
    assert ews.operations(box) == {"CreateItem": 1, "FindItem": 1}
    # a later retry of the same transaction (the dispatcher's) stores nothing either
    assert await exchange.create(event, transaction_id="t-503-after") == event_id
    assert len(ews.calendar(box)) == 1


async def test_503_before_storing_is_retried_by_the_caller_once(
    ews: EwsServer, exchange: ExchangeProvider
) -> None:
    box = new_mailbox(ews)
    ews.script("CreateItem", box, status=503)
    event = desired(box)
    error = await failure(exchange.create(event, transaction_id="t-503-before"))
    assert (error.code, error.retriable) == (PROVIDER_ERROR, True)
    assert ews.calendar(box) == []
    assert ews.operations(box) == {"CreateItem": 1, "FindItem": 1}  # looked before failing
    event_id = await exchange.create(event, transaction_id="t-503-before")
    assert [i.id for i in ews.calendar(box)] == [event_id]


async def test_timeout_after_a_stored_create_is_resolved_by_the_mark(ews: EwsServer) -> None:
    provider = make_provider(ews, timeout=2.0)
    box = new_mailbox(ews)
    try:
        ews.script("CreateItem", box, delay=4.0)
        event_id = await provider.create(desired(box), transaction_id="t-slow")
    finally:
        await provider.close()
    assert [i.id for i in ews.calendar(box)] == [event_id]


async def test_wrong_path_is_a_permanent_provider_error(ews: EwsServer) -> None:
    url = ews.url.replace("/EWS/Exchange.asmx", "/owa/")
    provider = make_provider(ews, url=url)
    try:
        error = await failure(provider.create(desired(new_mailbox(ews)), transaction_id="t-url"))
    finally:
        await provider.close()
    assert (error.code, error.retriable) == (PROVIDER_ERROR, False)
    assert "404" in error.message and "/EWS/Exchange.asmx" in error.hint


async def test_unreachable_server(ews: EwsServer) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens
    provider = make_provider(ews, url=f"https://127.0.0.1:{port}/EWS/Exchange.asmx")
    try:
        error = await failure(provider.create(desired("jane@acme.test"), transaction_id="t-un"))
    finally:
        await provider.close()
    assert (error.code, error.retriable) == (SERVER_UNREACHABLE, True)
    assert "127.0.0.1" in error.hint


async def test_self_signed_certificate_is_tls_untrusted_certificate(
    ews: EwsServer, tmp_path: Path,
) -> None:
    rogue = await started(tmp_path / "rogue", self_signed=True)
    box = rogue.add_mailbox("jane@acme.test")
    provider = make_provider(rogue, ca=ews.ca_path)  # trusts the real CA, not this server
    try:
        error = await failure(provider.create(desired(box), transaction_id="t-tls"))
    finally:
        await provider.close()
        await rogue.stop()
    assert (error.code, error.retriable) == (TLS_UNTRUSTED_CERTIFICATE, False)
    assert "ABSENCE_SYNC_CA_BUNDLE" in error.hint
    assert rogue.requests == []  # nothing was sent over the untrusted connection


# ---------------------------------------------------------------- threads, pool, versions


async def test_exchangelib_never_runs_on_the_event_loop(ews: EwsServer,
                                                        exchange: ExchangeProvider) -> None:
    box = new_mailbox(ews)
    ews.script("CreateItem", box, delay=2.0)
    gaps: list[float] = []

    async def heartbeat() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    try:
        await exchange.create(desired(box), transaction_id="t-loop")
    finally:
        beat.cancel()
    assert len(gaps) > 20 and max(gaps) < 1.0  # the call itself takes 2 s


async def test_server_busy_under_load_neither_deadlocks_nor_doubles(tmp_path: Path) -> None:
    """exchangelib 5.6 shrinks its session pool on ErrorServerBusy while holding the
    pool lock and waiting for a session: with several connections busy, every
    thread hangs. Here the server is busy whenever more than two requests are in
    flight; callers retry throttled calls like the dispatcher does."""
    server = await started(tmp_path / "busy", latency=0.05, busy_above=2, busy_back_off_ms=20)
    provider = make_provider(server, max_connections=6)
    boxes = [new_mailbox(server) for _ in range(24)]

    async def write(box: str, n: int) -> None:
        event = desired(box, f"abs-{n}")
        while True:
            try:
                await provider.create(event, transaction_id=f"t-load-{box}-{n}")
                return
            except ProviderError as exc:
                assert exc.code == THROTTLED
                await asyncio.sleep(exc.retry_after or 0.02)

    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(write(box, n) for box in boxes for n in range(2)))
    finally:
        await provider.close()
        await server.stop()
    busy = [r for r in server.requests if "ErrorServerBusy" in r.codes]
    assert len(busy) >= 5, "the server was never busy: the test proves nothing"
    assert server.max_in_flight <= 6
    for box in boxes:
        assert marks(server, box) == {"absence-sync:cfg-1:abs-0": 1, "absence-sync:cfg-1:abs-1": 1}


async def test_server_version_is_probed_once(ews2010: EwsServer) -> None:
    provider = make_provider(ews2010, auth="ntlm")
    box = new_mailbox(ews2010)
    first = len(ews2010.requests)
    try:
        event_id = await provider.create(desired(box), transaction_id="t-probe")
        await provider.update(box, event_id, desired(box, subject="Paid leave"))
        await provider.find(box, Mark("cfg-1", "abs-1"))
        await provider.delete(box, event_id)
    finally:
        await provider.close()
    mine = ews2010.requests[first:]
    probes = [r for r in mine if r.operation == "ConvertId"]
    # exchangelib walks down from its newest version until the server accepts one
    assert [r.version for r in probes][-1] == "Exchange2010_SP2" and len(probes) == 6
    items = [r for r in mine if r.operation != "ConvertId"]
    assert [r.operation for r in items] == ["CreateItem", "UpdateItem", "FindItem", "DeleteItem"]
    assert {r.version for r in items} == {"Exchange2010_SP2"}  # no call type probes again
    assert {r.status for r in items} == {200}


@pytest.mark.parametrize(("version", "warned"), [
    ("2010", "Exchange Server 2010"), ("2013", "Exchange Server 2013"), ("2016", None),
    ("2019", None),
])
async def test_old_servers_are_warned_about(tmp_path: Path, version: str,
                                            warned: str | None) -> None:
    server = await started(tmp_path / version, version=version)
    provider = make_provider(server)
    try:
        assert provider.warnings == ()
        await provider.find(server.add_mailbox("jane@acme.test"), Mark("cfg-1", "abs-1"))
        warnings = provider.warnings
    finally:
        await provider.close()
        await server.stop()
    if warned is None:
        assert warnings == ()
    else:
        [warning] = warnings
        assert warned in warning and "out of support" in warning


async def test_exchange_online_url_is_warned_about(ews: EwsServer) -> None:
    provider = make_provider(ews, url="https://outlook.office365.com/EWS/Exchange.asmx")
    try:
        [warning] = provider.warnings
    finally:
        await provider.close()
    assert "microsoft365" in warning and "Exchange Online" in warning


@pytest.mark.parametrize(("version", "status"), [("2010", "Free"), ("2019", "WorkingElsewhere")])
async def test_a_server_refusing_the_version_probe_is_learnt_from_its_answers(
    tmp_path: Path, version: str, status: str
) -> None:
    server = await started(tmp_path / version, version=version, convert_id=False)
    provider = make_provider(server)
    box = server.add_mailbox("jane@acme.test")
    try:
        event_id = await provider.create(desired(box, show_as="workingElsewhere"),
                                         transaction_id="t-learn")
        assert [i.free_busy for i in server.calendar(box)] == [status]
        await provider.delete(box, event_id)  # SuppressReadReceipts only where it exists
        warnings = provider.warnings
    finally:
        await provider.close()
        await server.stop()
    assert server.calendar(box) == []
    assert [r.operation for r in server.requests if r.status == 200] == [
        "FindItem", "CreateItem", "DeleteItem"
    ]
    created = next(r for r in server.requests if r.operation == "CreateItem")
    assert created.status == 200
    assert bool(warnings) is (version == "2010")


async def test_closing_fails_calls_in_flight_as_retriable(ews: EwsServer) -> None:
    provider = make_provider(ews)
    box = new_mailbox(ews)
    await provider.find(box, Mark("cfg-1", "abs-1"))  # probed and connected
    ews.script("CreateItem", box, delay=2.0)
    call = asyncio.create_task(provider.create(desired(box), transaction_id="t-close"))

    async def sent() -> bool:
        return ews.operations(box)["CreateItem"] == 1

    deadline = time.monotonic() + 5
    while not await sent():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await provider.close()
    error = await failure(asyncio.wait_for(call, 1.0))
    assert (error.code, error.retriable) == (PROVIDER_ERROR, True)
    later = await failure(provider.delete(box, "some-id"))
    assert later.retriable is True


async def test_the_double_answers_get_item(ews: EwsServer, exchange: ExchangeProvider) -> None:
    """GetItem is not used by the provider; the double answers it for other clients."""
    import requests
    from lxml import etree

    box = new_mailbox(ews)
    event_id = await exchange.create(desired(box, subject="Paid leave"), transaction_id="t-get")
    envelope = f"""<?xml version="1.0" encoding="utf-8"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"
 xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
 xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">
<s:Header><t:RequestServerVersion Version="Exchange2016"/><t:ExchangeImpersonation>
<t:ConnectingSID><t:PrimarySmtpAddress>{box}</t:PrimarySmtpAddress></t:ConnectingSID>
</t:ExchangeImpersonation></s:Header>
<s:Body><m:GetItem><m:ItemShape><t:BaseShape>Default</t:BaseShape></m:ItemShape>
<m:ItemIds><t:ItemId Id="{event_id}"/><t:ItemId Id="AAMkADunknown"/></m:ItemIds></m:GetItem>
</s:Body></s:Envelope>"""

    def post() -> requests.Response:
        return requests.post(ews.url, data=envelope.encode(), verify=str(ews.ca_path),
                             auth=(ews.upn, ews.password), timeout=10,
                             headers={"Content-Type": "text/xml; charset=utf-8"})

    response = await asyncio.get_running_loop().run_in_executor(None, post)
    assert response.status_code == 200
    root = etree.fromstring(response.content)
    ns = {"m": "http://schemas.microsoft.com/exchange/services/2006/messages",
          "t": "http://schemas.microsoft.com/exchange/services/2006/types"}
    codes = root.xpath("//m:ResponseCode/text()", namespaces=ns)
    assert codes == ["NoError", "ErrorItemNotFound"]
    assert root.xpath("//t:CalendarItem/t:Subject/text()", namespaces=ns) == ["Paid leave"]
