"""The Microsoft 365 provider against an HTTPS stand-in for login and Graph.

Besides the provider contract: every error mapping, Retry-After and the
4-per-mailbox limit (checked by the server, which records arrival times and
requests in flight), JSON batching, the token cache, MSAL's hosts, the
payload of created events, and the consent URL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import trustme

from consumer.config import SyncConfig
from consumer.providers import microsoft365
from consumer.providers.base import (
    ACCESS_DENIED,
    AUTH_FAILED,
    CONSENT_MISSING,
    INVALID_EVENT,
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
from consumer.providers.microsoft365 import (
    MARK_PROPERTY_ID,
    Microsoft365Provider,
    consent_url,
    graph_scope,
    graph_transaction_id,
    parse_retry_after,
)
from consumer.render import Mark
from consumer.settings import Settings
from tests.graph_server import GraphServer
from tests.provider_contract import ProviderContract, desired, legacy

TENANT = "8f4a1c2e-0000-4000-8000-00000000acme"
_boxes = itertools.count()


@pytest.fixture(scope="module")
async def graph(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GraphServer]:
    server = GraphServer()
    server.add_tenant(TENANT)
    await server.start(tmp_path_factory.mktemp("graph"))
    yield server
    await server.stop()


def make_settings(graph: GraphServer, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "ms_client_id": graph.client_id,
        "ms_client_secret": graph.client_secret,
        "ms_client_cert_file": None,
        "ms_authority_host": graph.authority_host,
        "ms_graph_url": graph.graph_url,
        "ca_bundle": graph.ca_path,
        "request_timeout_seconds": 5.0,
    }
    values.update(changes)
    return Settings(**values)


def make_provider(graph: GraphServer, *, tenant: str | None = TENANT,
                  ssl_context: ssl.SSLContext | None = None,
                  config_id: str = "acme-o365", **changes: Any) -> Microsoft365Provider:
    settings = make_settings(graph, **changes)
    block = {"tenant_id": tenant} if tenant else {}
    config = SyncConfig(id=config_id, tenant="acme", provider="microsoft365",
                        provider_settings=block)
    context = ProviderContext(settings, ssl_context or make_ssl_context(settings))
    provider = Microsoft365Provider.from_config(config, context)
    assert isinstance(provider, Microsoft365Provider)
    return provider


@pytest.fixture
async def m365(graph: GraphServer) -> AsyncIterator[Microsoft365Provider]:
    provider = make_provider(graph)
    yield provider
    await provider.close()


def new_mailbox(graph: GraphServer) -> str:
    return graph.add_mailbox(f"user{next(_boxes)}@acme.test")


async def failure(call: Awaitable[Any]) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await call
    return info.value


class TestMicrosoft365Provider(ProviderContract):
    @pytest.fixture
    async def provider(self, graph: GraphServer) -> AsyncIterator[Provider]:
        provider = make_provider(graph)
        yield provider
        await provider.close()

    @pytest.fixture
    def mailbox(self, graph: GraphServer) -> str:
        return new_mailbox(graph)

    @pytest.fixture
    def missing_mailbox(self) -> str:
        return "nobody@elsewhere.test"


# ---------------------------------------------------------------- payloads


async def test_created_all_day_event_payload(graph: GraphServer,
                                             m365: Microsoft365Provider) -> None:
    box = new_mailbox(graph)
    event = desired(box, subject="Paid leave", show_as="oof", private=True,
                    category="Absences", time_zone="America/New_York")
    event_id = await m365.create(event, transaction_id="cfg-1/abs-1/1")
    stored = graph.events[box][event_id]
    assert stored["subject"] == "Paid leave"
    assert stored["isAllDay"] is True
    assert stored["start"] == {"dateTime": "2026-12-01T00:00:00", "timeZone": "America/New_York"}
    assert stored["end"] == {"dateTime": "2026-12-04T00:00:00", "timeZone": "America/New_York"}
    assert stored["showAs"] == "oof"
    assert stored["sensitivity"] == "private"
    assert stored["categories"] == ["Absences"]
    assert stored["isReminderOn"] is False
    assert stored["responseRequested"] is False
    assert stored["attendees"] == []
    assert stored["body"] == {"contentType": "text", "content": ""}
    assert stored["singleValueExtendedProperties"] == [
        {"id": MARK_PROPERTY_ID, "value": "absence-sync:cfg-1:abs-1"}
    ]
    assert stored["transactionId"] == graph_transaction_id("cfg-1/abs-1/1")


async def test_timed_event_and_update_payload(graph: GraphServer,
                                              m365: Microsoft365Provider) -> None:
    box = new_mailbox(graph)
    event = desired(box, all_day=False, start=dt.datetime(2026, 3, 29, 13, 30),
                    end=dt.datetime(2026, 3, 30, 12, 30), show_as="tentative")
    event_id = await m365.create(event, transaction_id="t-timed-payload")
    stored = graph.events[box][event_id]
    assert stored["isAllDay"] is False
    assert stored["start"] == {"dateTime": "2026-03-29T13:30:00", "timeZone": "Europe/Paris"}
    assert stored["end"] == {"dateTime": "2026-03-30T12:30:00", "timeZone": "Europe/Paris"}
    assert stored["sensitivity"] == "normal"
    assert stored["categories"] == []
    transaction = stored["transactionId"]
    await m365.update(box, event_id, desired(box, subject="Remote work", show_as="free"))
    stored = graph.events[box][event_id]
    assert (stored["subject"], stored["showAs"], stored["isAllDay"]) == (
        "Remote work", "free", True
    )
    assert stored["transactionId"] == transaction
    patch = [r for r in graph.graph_requests(box) if r.method == "PATCH"]
    assert len(patch) == 1


def test_transaction_ids_are_deterministic_and_short() -> None:
    long = "acme-o365:" + "x" * 300 + ":7"
    assert graph_transaction_id(long) == graph_transaction_id(long)
    assert graph_transaction_id(long) != graph_transaction_id(long + "8")
    assert len(graph_transaction_id(long)) <= 64


async def test_find_follows_next_links_and_escapes_quotes(
    graph: GraphServer, m365: Microsoft365Provider
) -> None:
    box = new_mailbox(graph)
    graph.page_size[box.lower()] = 2
    mark = Mark("cfg-1", "abs-o'brien")
    ids = [
        await m365.create(desired(box, "abs-o'brien"), transaction_id=f"t-page-{n}")
        for n in range(5)
    ]
    await m365.create(desired(box, "abs-other"), transaction_id="t-page-other")
    assert sorted(await m365.find(box, mark)) == sorted(ids)
    gets = [r for r in graph.graph_requests(box) if r.method == "GET"]
    assert len(gets) == 3


async def test_find_matches_marks_written_before_ids_were_encoded(
    graph: GraphServer, m365: Microsoft365Provider
) -> None:
    box = new_mailbox(graph)
    mark = Mark("cfg-1", "abs:old%")
    old = await m365.create(legacy(box, mark), transaction_id="t-legacy-old")
    new = await m365.create(desired(box, mark=mark), transaction_id="t-legacy-new")
    stored = {e["id"]: e["singleValueExtendedProperties"][0]["value"]
              for e in graph.events[box.lower()].values()}
    assert stored == {old: "absence-sync:cfg-1:abs:old%",
                      new: "absence-sync:cfg-1:abs%3Aold%25"}
    assert await m365.find(box, mark) == [new, old]
    # an id without ':' or '%' has one form: one query
    before = len(graph.graph_requests(box))
    assert await m365.find(box, Mark("cfg-1", "abs-plain")) == []
    assert len(graph.graph_requests(box)) == before + 1


# ---------------------------------------------------------------- error mappings

GRAPH_ERRORS = [
    # (status, Graph code, Retry-After, expected code, retriable, retry_after)
    (404, "ErrorInvalidUser", None, MAILBOX_NOT_FOUND, False, None),
    (404, "MailboxNotEnabledForRESTAPI", None, MAILBOX_NOT_FOUND, False, None),
    (404, "ResourceNotFound", None, MAILBOX_NOT_FOUND, False, None),
    (403, "ErrorAccessDenied", None, ACCESS_DENIED, False, None),
    (403, "Authorization_RequestDenied", None, ACCESS_DENIED, False, None),
    (429, "ApplicationThrottled", "1", THROTTLED, True, 1.0),
    (503, "ServiceUnavailable", "2", THROTTLED, True, 2.0),
    (503, "ServiceUnavailable", None, PROVIDER_ERROR, True, None),
    (502, "BadGateway", None, PROVIDER_ERROR, True, None),
    (504, "GatewayTimeout", None, PROVIDER_ERROR, True, None),
    (500, "InternalServerError", None, PROVIDER_ERROR, True, None),
    (400, "ErrorInvalidRequest", None, INVALID_EVENT, False, None),
    (400, "TimeZoneNotSupportedException", None, INVALID_EVENT, False, None),
]


@pytest.mark.parametrize(("status", "graph_code", "retry_after", "code", "retriable", "delay"),
                         GRAPH_ERRORS)
async def test_graph_error_mapping(graph: GraphServer, m365: Microsoft365Provider, status: int,
                                   graph_code: str, retry_after: str | None, code: str,
                                   retriable: bool, delay: float | None) -> None:
    box = new_mailbox(graph)
    graph.script(box, status, graph_code, retry_after=retry_after)
    error = await failure(m365.create(desired(box), transaction_id="t-map"))
    assert (error.code, error.retriable, error.retry_after) == (code, retriable, delay)
    assert error.hint


async def test_unauthorized_twice_is_auth_failed(graph: GraphServer,
                                                 m365: Microsoft365Provider) -> None:
    box = new_mailbox(graph)
    graph.script(box, 401, "InvalidAuthenticationToken", times=2)
    error = await failure(m365.create(desired(box), transaction_id="t-401"))
    assert (error.code, error.retriable) == (AUTH_FAILED, False)


async def test_directory_answers(graph: GraphServer, m365: Microsoft365Provider) -> None:
    """Unknown, REST-disabled and access-denied mailboxes as the directory reports them."""
    missing = "ghost@acme.test"
    disabled = new_mailbox(graph)
    graph.rest_disabled.add(disabled.lower())
    denied = new_mailbox(graph)
    graph.access_denied.add(denied.lower())
    for box, code in ((missing, MAILBOX_NOT_FOUND), (disabled, MAILBOX_NOT_FOUND),
                      (denied, ACCESS_DENIED)):
        error = await failure(m365.create(desired(box), transaction_id="t-dir"))
        assert (error.code, error.retriable) == (code, False)
    assert "HR system" in (await failure(m365.find(missing, Mark("c", "a")))).hint
    assert "application access policy" in (
        await failure(m365.delete(denied, "AAMkADx"))
    ).hint


async def test_invalid_payload_is_invalid_event(graph: GraphServer,
                                                m365: Microsoft365Provider) -> None:
    box = new_mailbox(graph)
    error = await failure(m365.create(desired(box, time_zone="Mars/Olympus_Mons"),
                                      transaction_id="t-tz"))
    assert (error.code, error.retriable) == (INVALID_EVENT, False)


async def test_update_and_delete_of_gone_event(graph: GraphServer,
                                               m365: Microsoft365Provider) -> None:
    box = new_mailbox(graph)
    with pytest.raises(EventGone):
        await m365.update(box, "AAMkADgone", desired(box))
    assert await m365.delete(box, "AAMkADgone") is False


TOKEN_ERRORS = [
    (400, {"error": "invalid_grant", "error_description": "AADSTS65001: The user or "
           "administrator has not consented to use the application.", "error_codes": [65001]},
     CONSENT_MISSING, False),
    (400, {"error": "unauthorized_client", "error_description": "AADSTS700016: Application "
           "with identifier 'x' was not found in the directory 'y'.", "error_codes": [700016]},
     CONSENT_MISSING, False),
    (401, {"error": "invalid_client", "error_description": "AADSTS7000222: The provided "
           "client secret keys are expired.", "error_codes": [7000222]}, AUTH_FAILED, False),
    (400, {"error": "invalid_scope", "error_description": "AADSTS70011: The provided value "
           "for the input parameter 'scope' is not valid.", "error_codes": [70011]},
     AUTH_FAILED, False),
    (400, {"error": "temporarily_unavailable", "error_description": "AADSTS50196: The server "
           "is busy.", "error_codes": [50196]}, PROVIDER_ERROR, True),
    (503, {"error": "server_error", "error_description": "down"}, PROVIDER_ERROR, True),
]


@pytest.mark.parametrize(("status", "body", "code", "retriable"), TOKEN_ERRORS)
async def test_token_error_mapping(graph: GraphServer, status: int, body: dict[str, Any],
                                   code: str, retriable: bool) -> None:
    tenant = graph.add_tenant(f"tenant-{next(_boxes)}.onmicrosoft.test")
    graph.script_token(tenant, status, body)
    provider = make_provider(graph, tenant=tenant, config_id="acme-scripted")
    try:
        error = await failure(provider.create(desired(new_mailbox(graph)), transaction_id="t"))
    finally:
        await provider.close()
    assert (error.code, error.retriable) == (code, retriable)
    if code == CONSENT_MISSING:
        assert "absence-sync consent-url acme-scripted" in error.hint


async def test_directory_without_the_application_is_consent_missing(graph: GraphServer) -> None:
    unknown = make_provider(graph, tenant="0000dead-0000-4000-8000-000000000000",
                            config_id="acme-unknown")
    not_consented = make_provider(graph, tenant=graph.add_tenant("fabrikam.test",
                                                                 consented=False))
    try:
        for provider in (unknown, not_consented):
            error = await failure(provider.create(desired(new_mailbox(graph)),
                                                  transaction_id="t"))
            assert (error.code, error.retriable) == (CONSENT_MISSING, False)
            assert "consent-url" in error.hint
        assert "AADSTS90002" in (await failure(unknown.find("a@b.test", Mark("c", "a")))).message
    finally:
        await unknown.close()
        await not_consented.close()


async def test_consent_granted_later_is_seen(graph: GraphServer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(microsoft365, "_FAILURE_MEMORY", 0.0)
    tenant = graph.add_tenant(f"later-{next(_boxes)}.test", consented=False)
    provider = make_provider(graph, tenant=tenant)
    box = new_mailbox(graph)
    try:
        error = await failure(provider.create(desired(box), transaction_id="t-later"))
        assert error.code == CONSENT_MISSING
        graph.consented.add(tenant)
        assert await provider.create(desired(box), transaction_id="t-later")
    finally:
        await provider.close()


async def test_missing_tenant_id_is_consent_missing_without_a_request(
    graph: GraphServer,
) -> None:
    before = len(graph.requests)
    provider = make_provider(graph, tenant=None, config_id="acme-new")
    try:
        for call in (provider.create(desired("a@acme.test"), transaction_id="t"),
                     provider.update("a@acme.test", "x", desired("a@acme.test")),
                     provider.delete("a@acme.test", "x"),
                     provider.find("a@acme.test", Mark("c", "a"))):
            error = await failure(call)
            assert error.code == CONSENT_MISSING
            assert "absence-sync consent-url acme-new" in error.hint
    finally:
        await provider.close()
    assert len(graph.requests) == before


async def test_wrong_secret_is_auth_failed(graph: GraphServer) -> None:
    provider = make_provider(graph, ms_client_secret="wrong")
    try:
        error = await failure(provider.create(desired(new_mailbox(graph)), transaction_id="t"))
    finally:
        await provider.close()
    assert (error.code, error.retriable) == (AUTH_FAILED, False)
    assert "AADSTS7000215" in error.message


async def test_unreachable_graph_is_retriable(graph: GraphServer) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    provider = make_provider(graph, ms_graph_url=f"https://127.0.0.1:{closed_port}/v1.0")
    try:
        error = await failure(provider.create(desired(new_mailbox(graph)), transaction_id="t"))
    finally:
        await provider.close()
    assert (error.code, error.retriable) == (SERVER_UNREACHABLE, True)


async def test_slow_graph_times_out_retriably(graph: GraphServer) -> None:
    box = new_mailbox(graph)
    graph.latency[box.lower()] = 3.0
    provider = make_provider(graph, request_timeout_seconds=0.5)
    try:
        await provider.find(new_mailbox(graph), Mark("c", "a"))  # token first, quickly
        error = await failure(provider.create(desired(box), transaction_id="t-slow"))
    finally:
        await provider.close()
        graph.latency.pop(box.lower())
    assert (error.code, error.retriable) == (SERVER_UNREACHABLE, True)


async def test_untrusted_certificate(graph: GraphServer) -> None:
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)
    provider = make_provider(graph, ssl_context=stranger)
    try:
        error = await failure(provider.create(desired(new_mailbox(graph)), transaction_id="t"))
    finally:
        await provider.close()
    assert (error.code, error.retriable) == (TLS_UNTRUSTED_CERTIFICATE, False)


# ---------------------------------------------------------------- throttling


def test_parse_retry_after() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


async def test_retry_after_is_honoured_per_mailbox(graph: GraphServer,
                                                   m365: Microsoft365Provider) -> None:
    box, other = new_mailbox(graph), new_mailbox(graph)
    graph.script(box, 429, "ApplicationThrottled", "Application is over its "
                 "MailboxConcurrency limit.", retry_after="1")
    error = await failure(m365.create(desired(box), transaction_id="t-429"))
    assert (error.code, error.retry_after) == (THROTTLED, 1.0)
    throttle = graph.throttles[-1]
    ids = await asyncio.gather(
        *(m365.create(desired(box, f"abs-{n}"), transaction_id=f"t-after-{n}") for n in range(6)),
        m365.create(desired(other), transaction_id="t-other"),
    )
    assert all(ids)
    later = [r for r in graph.graph_requests(box) if r.at > throttle.sent]
    assert len(later) == 6
    assert min(r.at for r in later) >= throttle.until
    assert not graph.early
    # the other mailbox was not held back by this mailbox's Retry-After
    assert graph.graph_requests(other)[0].at < throttle.until


async def test_retry_after_in_batch_sub_response(graph: GraphServer,
                                                 m365: Microsoft365Provider) -> None:
    boxes = [new_mailbox(graph) for _ in range(3)]
    graph.script(boxes[0], 503, "ServiceUnavailable", retry_after="1")
    results = await asyncio.gather(
        *(m365.create(desired(b), transaction_id="t-sub-503") for b in boxes),
        return_exceptions=True,
    )
    assert isinstance(results[0], ProviderError)
    assert (results[0].code, results[0].retriable, results[0].retry_after) == (
        THROTTLED, True, 1.0
    )
    assert all(isinstance(r, str) for r in results[1:])
    assert all(r.batched for b in boxes for r in graph.graph_requests(b))
    throttle = graph.throttles[-1]
    await m365.create(desired(boxes[0]), transaction_id="t-sub-503")
    assert graph.graph_requests(boxes[0])[-1].at >= throttle.until
    assert not graph.early


async def test_long_retry_after_fails_fast_without_a_request(graph: GraphServer) -> None:
    box = new_mailbox(graph)
    provider = make_provider(graph, request_timeout_seconds=1.0)
    try:
        graph.script(box, 429, "ApplicationThrottled", retry_after="2")
        await failure(provider.create(desired(box), transaction_id="t-long"))
        sent = len(graph.graph_requests(box))
        started = time.monotonic()
        error = await failure(provider.create(desired(box), transaction_id="t-long"))
        assert time.monotonic() - started < 0.5
        assert error.code == THROTTLED and error.retriable
        assert error.retry_after is not None and 1.0 < error.retry_after <= 2.0
        assert len(graph.graph_requests(box)) == sent
    finally:
        await provider.close()


async def test_application_wide_throttling_holds_every_mailbox(graph: GraphServer,
                                                               m365: Microsoft365Provider) -> None:
    first, second = new_mailbox(graph), new_mailbox(graph)
    graph.script(first, 429, "TooManyRequests", "Too many requests.", retry_after="1")
    await failure(m365.create(desired(first), transaction_id="t-app"))
    throttle = graph.throttles[-1]
    await m365.create(desired(second), transaction_id="t-app")
    assert graph.graph_requests(second)[0].at >= throttle.until
    assert not graph.early


async def test_never_more_than_four_in_flight_per_mailbox(graph: GraphServer,
                                                          m365: Microsoft365Provider) -> None:
    box = new_mailbox(graph)
    graph.latency[box.lower()] = 0.05
    batches = len(graph.batch_sizes)
    try:
        ids = await asyncio.gather(
            *(m365.create(desired(box, f"abs-{n}"), transaction_id=f"t-c{n}") for n in range(40))
        )
    finally:
        graph.latency.pop(box.lower())
    assert len(set(ids)) == 40
    assert graph.max_in_flight[box.lower()] == 4
    assert all(r.status == 201 for r in graph.graph_requests(box))
    assert len(graph.batch_sizes) > batches


# ---------------------------------------------------------------- batching


async def test_concurrent_operations_are_batched(graph: GraphServer,
                                                 m365: Microsoft365Provider) -> None:
    boxes = [new_mailbox(graph) for _ in range(15)]
    batches = len(graph.batch_sizes)
    calls = [
        m365.create(desired(box, f"abs-{n}"), transaction_id=f"t-b{n}")
        for box in boxes for n in range(3)
    ]
    calls.append(m365.create(desired("nobody@acme.test"), transaction_id="t-bad"))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, str) for r in results[:-1])
    bad = results[-1]
    assert isinstance(bad, ProviderError) and bad.code == MAILBOX_NOT_FOUND
    sizes = graph.batch_sizes[batches:]
    assert sizes and max(sizes) <= 20 and sum(sizes) == len(calls)
    assert all(r.batched for r in graph.graph_requests("nobody@acme.test"))
    assert all(len(graph.events[b.lower()]) == 3 for b in boxes)


async def test_a_lone_request_is_not_batched(graph: GraphServer,
                                             m365: Microsoft365Provider) -> None:
    box = new_mailbox(graph)
    batches = len(graph.batch_sizes)
    await m365.create(desired(box), transaction_id="t-lone")
    assert len(graph.batch_sizes) == batches
    assert [r.batched for r in graph.graph_requests(box)] == [False]


async def test_cancelled_caller_keeps_its_slot_until_the_exchange_ends(
    graph: GraphServer, m365: Microsoft365Provider
) -> None:
    box = new_mailbox(graph)
    graph.latency[box.lower()] = 0.3
    try:
        slow = [asyncio.ensure_future(m365.create(desired(box, f"abs-{n}"),
                                                  transaction_id=f"t-x{n}")) for n in range(4)]
        await _until(lambda: graph.in_flight[box.lower()] == 4)
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
        await m365.create(desired(box, "abs-next"), transaction_id="t-next")
    finally:
        graph.latency.pop(box.lower())
    assert graph.max_in_flight[box.lower()] == 4
    assert all(r.status != 429 for r in graph.graph_requests(box))


# ---------------------------------------------------------------- tokens and hosts


async def test_token_is_cached(graph: GraphServer) -> None:
    tenant = graph.add_tenant(f"cache-{next(_boxes)}.test")
    provider = make_provider(graph, tenant=tenant)
    try:
        box = new_mailbox(graph)
        await asyncio.gather(
            *(provider.create(desired(box, f"a{n}"), transaction_id=f"t{n}") for n in range(12))
        )
        for n in range(5):
            await provider.find(box, Mark("cfg-1", f"a{n}"))
    finally:
        await provider.close()
    assert graph.token_requests_for(tenant) == 1
    request = next(r for r in graph.token_requests if r["tenant"] == tenant)
    assert request["scope"] == graph_scope(graph.graph_url)
    assert request["grant_type"] == "client_credentials"


async def test_rejected_token_is_renewed_once(graph: GraphServer) -> None:
    tenant = graph.add_tenant(f"renew-{next(_boxes)}.test")
    provider = make_provider(graph, tenant=tenant)
    try:
        box = new_mailbox(graph)
        await provider.create(desired(box, "a1"), transaction_id="t1")
        graph.revoke_tokens()
        await asyncio.gather(
            *(provider.create(desired(box, f"b{n}"), transaction_id=f"u{n}") for n in range(3))
        )
    finally:
        await provider.close()
    assert graph.token_requests_for(tenant) == 2


async def test_msal_talks_to_the_configured_authority_only(
    graph: GraphServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved: list[str] = []
    lock = threading.Lock()
    real_getaddrinfo = socket.getaddrinfo

    def recording_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            resolved.append(str(host))
        if host not in ("localhost", "127.0.0.1"):
            raise socket.gaierror(socket.EAI_NONAME, "no network in this test")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording_getaddrinfo)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("MSAL_FORCE_REGION", "westeurope")
    tenant = graph.add_tenant(f"closed-{next(_boxes)}.test")
    start = len(graph.requests)
    provider = make_provider(graph, tenant=tenant)
    try:
        await provider.create(desired(new_mailbox(graph)), transaction_id="t-hosts")
    finally:
        await provider.close()
    assert "localhost" in resolved
    assert set(resolved) <= {"localhost", "127.0.0.1"}
    mine = graph.requests[start:]
    login = [r for r in mine if not r.path.startswith("/v1.0/")]
    assert [r.path.split("?")[0] for r in login] == [
        f"/{tenant}/v2.0/.well-known/openid-configuration",
        f"/{tenant}/oauth2/v2.0/token",
    ]
    assert {r.host for r in login} == {f"localhost:{graph.port}"}
    assert {r.host for r in mine if r.path.startswith("/v1.0/")} == {f"127.0.0.1:{graph.port}"}
    assert not graph.unexpected


async def test_certificate_credential(graph: GraphServer, tmp_path: Path) -> None:
    issued = trustme.CA().issue_cert("absence-sync-app", key_type=trustme.KeyType.RSA)
    pem = issued.private_key_pem.bytes() + issued.cert_chain_pems[0].bytes()
    cert_file = tmp_path / "app.pem"
    cert_file.write_bytes(pem)
    graph.register_certificate(issued.cert_chain_pems[0].bytes())
    tenant = graph.add_tenant(f"cert-{next(_boxes)}.test")
    provider = make_provider(graph, tenant=tenant, ms_client_secret=None,
                             ms_client_cert_file=cert_file)
    try:
        await provider.create(desired(new_mailbox(graph)), transaction_id="t-cert")
    finally:
        await provider.close()
    request = next(r for r in graph.token_requests if r["tenant"] == tenant)
    assert request["auth"] == "assertion"


async def test_unknown_certificate_is_auth_failed(graph: GraphServer, tmp_path: Path) -> None:
    issued = trustme.CA().issue_cert("someone-else", key_type=trustme.KeyType.RSA)
    cert_file = tmp_path / "other.pem"
    cert_file.write_bytes(issued.private_key_and_cert_chain_pem.bytes())
    provider = make_provider(graph, ms_client_secret=None, ms_client_cert_file=cert_file,
                             tenant=graph.add_tenant(f"cert-{next(_boxes)}.test"))
    try:
        error = await failure(provider.create(desired(new_mailbox(graph)), transaction_id="t"))
    finally:
        await provider.close()
    assert (error.code, error.retriable) == (AUTH_FAILED, False)


# ---------------------------------------------------------------- consent


def test_consent_url_shape() -> None:
    settings = Settings(ms_client_id="0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                        ms_authority_host="https://login.microsoftonline.us",
                        ms_graph_url="https://graph.microsoft.us/v1.0")
    url = consent_url(settings, "acme-o365", "st&te/1",
                      "https://sync.example.com/consent/microsoft365/callback")
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "https", "login.microsoftonline.us", "/organizations/v2.0/adminconsent"
    )
    assert parse_qs(parts.query) == {
        "client_id": ["0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"],
        "scope": ["https://graph.microsoft.us/.default"],
        "redirect_uri": ["https://sync.example.com/consent/microsoft365/callback"],
        "state": ["st&te/1"],
    }


def test_consent_url_needs_a_client_id() -> None:
    settings = Settings(ms_client_id=None)
    with pytest.raises(ProviderError) as info:
        consent_url(settings, "acme-o365", "s", "https://x.test/cb")
    assert "ABSENCE_SYNC_MS_CLIENT_ID" in info.value.hint


def test_scope_follows_the_graph_host() -> None:
    assert graph_scope("https://graph.microsoft.com/v1.0") == "https://graph.microsoft.com/.default"
    assert graph_scope("https://microsoftgraph.chinacloudapi.cn/v1.0") == (
        "https://microsoftgraph.chinacloudapi.cn/.default"
    )


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.005)
