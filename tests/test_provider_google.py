"""The Google Calendar provider against an HTTPS stand-in for Google's token
endpoint and Calendar API (tests/google_server.py).

Besides the provider contract: the payload of each kind of event, the
client-chosen ids (a lost insert response adopted, ids of deleted events
skipped), out-of-office events and event type changes, every error
mapping, the delegated token grant and its cache, batching and the
per-mailbox rate limit (measured by the server's arrival times).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.config import ConfigError, SyncConfig, config_warnings, parse_sync
from consumer.providers.base import (
    ACCESS_DENIED,
    AUTH_FAILED,
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
from consumer.providers.google import (
    MARK_KEY,
    QUOTA_BACKOFF,
    GoogleProvider,
    event_payload,
    google_event_id,
    parse_batch,
)
from consumer.providers.google_auth import (
    CALENDAR_SCOPE,
    GMAIL_SETTINGS_SCOPE,
    GoogleTokens,
    ServiceAccountKey,
)
from consumer.render import Mark
from consumer.settings import Settings
from tests.google_server import GoogleServer, validate_event
from tests.provider_contract import ProviderContract, desired

ACCOUNT = "absence-sync@acme-project.iam.gserviceaccount.com"
GMAIL_ACCOUNT = "replies@acme-project.iam.gserviceaccount.com"
CLIENT_ID = "112233445566778899001"
_boxes = itertools.count()


@pytest.fixture(scope="module")
async def google(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GoogleServer]:
    server = GoogleServer()
    await server.start(tmp_path_factory.mktemp("google"))
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def key(google: GoogleServer) -> str:
    return google.add_account(ACCOUNT, client_id=CLIENT_ID)


def make_settings(google: GoogleServer, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "google_token_url": google.token_url,
        "google_api_url": google.api_url,
        "ca_bundle": google.ca_path,
        "request_timeout_seconds": 5.0,
    }
    values.update(changes)
    return Settings(**values)


def make_provider(google: GoogleServer, key: str | None, *, block: dict[str, Any] | None = None,
                  **changes: Any) -> GoogleProvider:
    settings = make_settings(google)
    config = SyncConfig(id="acme-google", tenant="acme", provider="google",
                        provider_settings=block or {},
                        secrets={"service_account": key} if key else {})
    provider = GoogleProvider.from_config(config, ProviderContext(settings,
                                                                  make_ssl_context(settings)))
    for name, value in changes.items():
        setattr(provider, name, value)
    return provider


@pytest.fixture
async def gcal(google: GoogleServer, key: str) -> AsyncIterator[GoogleProvider]:
    provider = make_provider(google, key)
    yield provider
    await provider.close()


def new_user(google: GoogleServer, *calendars: str) -> str:
    return google.add_user(f"user{next(_boxes)}@acme.test", *calendars)


async def failure(call: Awaitable[Any]) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await call
    return info.value


def stored(google: GoogleServer, user: str, event_id: str,
           calendar: str = "primary") -> dict[str, Any]:
    return google.calendars[user.lower()][calendar][event_id]


class TestGoogleProvider(ProviderContract):
    @pytest.fixture
    async def provider(self, google: GoogleServer, key: str) -> AsyncIterator[Provider]:
        provider = make_provider(google, key)
        yield provider
        await provider.close()

    @pytest.fixture
    def mailbox(self, google: GoogleServer) -> str:
        return new_user(google)

    @pytest.fixture
    def missing_mailbox(self) -> str:
        return "nobody@acme.test"


# ---------------------------------------------------------------- payloads


async def test_all_day_event_payload(google: GoogleServer, gcal: GoogleProvider) -> None:
    user = new_user(google)
    event = desired(user, private=True, category="Absences")
    event_id = await gcal.create(event, transaction_id="acme-google/abs-1/1")
    assert re.fullmatch(r"[0-9a-v]{5,1024}", event_id)
    body = stored(google, user, event_id)
    assert body["start"] == {"date": "2026-12-01"}
    assert body["end"] == {"date": "2026-12-04"}  # exclusive
    assert body["transparency"] == "opaque"
    assert body["status"] == "confirmed"
    assert body["visibility"] == "private"
    assert body["reminders"] == {"useDefault": False}
    assert body["eventType"] == "default"
    assert body["summary"] == "Absent"
    assert body["description"] == ""
    assert "attendees" not in body
    assert body["extendedProperties"] == {"private": {MARK_KEY: "absence-sync:cfg-1:abs-1"}}


@pytest.mark.parametrize(("show_as", "transparency", "status"), [
    ("busy", "opaque", "confirmed"),
    ("tentative", "opaque", "tentative"),
    ("free", "transparent", "confirmed"),
    ("workingElsewhere", "transparent", "confirmed"),
])
async def test_timed_event_payload(google: GoogleServer, gcal: GoogleProvider, show_as: str,
                                   transparency: str, status: str) -> None:
    user = new_user(google)
    event = desired(user, all_day=False, show_as=show_as, start=dt.datetime(2026, 3, 29, 13, 30),
                    end=dt.datetime(2026, 3, 30, 12, 30))
    body = stored(google, user, await gcal.create(event, transaction_id="t"))
    assert body["start"] == {"dateTime": "2026-03-29T13:30:00", "timeZone": "Europe/Paris"}
    assert body["end"] == {"dateTime": "2026-03-30T12:30:00", "timeZone": "Europe/Paris"}
    assert (body["transparency"], body["status"], body["eventType"]) == (
        transparency, status, "default")
    assert body["visibility"] == "default"


async def test_out_of_office_whole_days_run_midnight_to_midnight(
    google: GoogleServer, key: str
) -> None:
    provider = make_provider(google, key, block={"autodecline": "new"})
    try:
        user = new_user(google)
        event_id = await provider.create(desired(user, show_as="oof"), transaction_id="t")
    finally:
        await provider.close()
    body = stored(google, user, event_id)
    assert body["eventType"] == "outOfOffice"
    assert body["start"] == {"dateTime": "2026-12-01T00:00:00", "timeZone": "Europe/Paris"}
    assert body["end"] == {"dateTime": "2026-12-04T00:00:00", "timeZone": "Europe/Paris"}
    assert body["outOfOfficeProperties"] == {
        "autoDeclineMode": "declineOnlyNewConflictingInvitations"}
    assert body["transparency"] == "opaque"


async def test_out_of_office_on_another_calendar_is_a_busy_event(
    google: GoogleServer, key: str
) -> None:
    provider = make_provider(google, key, block={"calendar_id": "absences"})
    try:
        user = new_user(google, "absences")
        event = desired(user, show_as="oof")
        event_id = await provider.create(event, transaction_id="t")
        assert await provider.find(user, event.mark) == [event_id]
    finally:
        await provider.close()
    body = stored(google, user, event_id, "absences")
    assert body["eventType"] == "default"
    assert body["transparency"] == "opaque"
    assert body["start"] == {"date": "2026-12-01"}
    assert google.events(user) == []


async def test_changing_to_and_from_out_of_office_replaces_the_event(
    google: GoogleServer, gcal: GoogleProvider
) -> None:
    user = new_user(google)
    event = desired(user, show_as="busy")
    first = await gcal.create(event, transaction_id="t")
    second = await gcal.update(user, first, desired(user, show_as="oof"))
    assert second != first
    assert stored(google, user, first)["status"] == "cancelled"
    assert stored(google, user, second)["eventType"] == "outOfOffice"
    third = await gcal.update(user, second, desired(user, show_as="free"))
    assert stored(google, user, third)["transparency"] == "transparent"
    assert stored(google, user, third)["eventType"] == "default"
    assert await gcal.find(user, event.mark) == [third]
    assert len(google.events(user)) == 1


async def test_update_keeps_the_id_and_replaces_the_content(
    google: GoogleServer, gcal: GoogleProvider
) -> None:
    user = new_user(google)
    event_id = await gcal.create(desired(user), transaction_id="t")
    again = await gcal.update(user, event_id, desired(user, subject="Paid leave", private=True,
                                                       show_as="tentative"))
    assert again == event_id
    body = stored(google, user, event_id)
    assert (body["summary"], body["visibility"], body["status"]) == (
        "Paid leave", "private", "tentative")


async def test_server_that_only_patches_gets_a_patch(
    google: GoogleServer, gcal: GoogleProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = new_user(google)
    event_id = await gcal.create(desired(user), transaction_id="t")
    monkeypatch.setattr(google, "refused_methods", {"PUT"})
    assert await gcal.update(user, event_id, desired(user, subject="Leave")) == event_id
    assert stored(google, user, event_id)["summary"] == "Leave"


# ---------------------------------------------------------------- ids and adoption


def test_event_ids_are_base32hex_and_deterministic() -> None:
    one = google_event_id("absence-sync:cfg:abs\ncfg/abs/1")
    assert re.fullmatch(r"[0-9a-v]{52}", one)
    assert one == google_event_id("absence-sync:cfg:abs\ncfg/abs/1")
    assert one != google_event_id("absence-sync:cfg:abs\ncfg/abs/2")
    assert one != google_event_id("absence-sync:cfg:abs\ncfg/abs/1", 1)


async def test_insert_whose_response_is_lost_is_adopted_on_retry(
    google: GoogleServer, gcal: GoogleProvider
) -> None:
    user = new_user(google)
    event = desired(user)
    google.lose_insert[user.lower()] = 1
    error = await failure(gcal.create(event, transaction_id="acme/abs-1/1"))
    assert error.code == SERVER_UNREACHABLE and error.retriable
    assert len(google.events(user)) == 1  # the insert happened
    event_id = await gcal.create(event, transaction_id="acme/abs-1/1")
    assert [e["id"] for e in google.events(user)] == [event_id]
    assert [(r.method, r.status) for r in google.api_requests(user)][-3:] == [
        ("POST", 409), ("GET", 200), ("PUT", 200)]


async def test_adopted_event_is_brought_up_to_date(
    google: GoogleServer, gcal: GoogleProvider
) -> None:
    user = new_user(google)
    event_id = await gcal.create(desired(user), transaction_id="tx")
    again = await gcal.create(desired(user, subject="Sick leave"), transaction_id="tx")
    assert again == event_id
    assert stored(google, user, event_id)["summary"] == "Sick leave"


async def test_id_of_a_deleted_event_is_not_reused(
    google: GoogleServer, gcal: GoogleProvider
) -> None:
    user = new_user(google)
    event = desired(user)
    first = await gcal.create(event, transaction_id="tx")
    assert await gcal.delete(user, first) is True
    second = await gcal.create(event, transaction_id="tx")  # same derivation: 409 first
    assert second != first
    assert await gcal.find(user, event.mark) == [second]


async def test_an_id_held_by_someone_elses_event_is_skipped(
    google: GoogleServer, gcal: GoogleProvider
) -> None:
    user = new_user(google)
    event = desired(user)
    taken = google_event_id(f"{event.mark.value}\ntx")
    google.calendars[user.lower()]["primary"][taken] = {
        "id": taken, "status": "confirmed", "summary": "not ours",
        "start": {"date": "2026-01-01"}, "end": {"date": "2026-01-02"},
    }
    event_id = await gcal.create(event, transaction_id="tx")
    assert event_id != taken
    assert stored(google, user, taken)["summary"] == "not ours"


async def test_find_reads_every_page_and_skips_deleted(
    google: GoogleServer, gcal: GoogleProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(google, "page_size", 2)
    user = new_user(google)
    event = desired(user)
    ids = [await gcal.create(event, transaction_id=f"tx-{n}") for n in range(5)]
    await gcal.delete(user, ids[0])
    assert await gcal.find(user, event.mark) == ids[1:]


async def test_update_of_an_event_the_employee_deleted_is_event_gone(
    google: GoogleServer, gcal: GoogleProvider
) -> None:
    user = new_user(google)
    with pytest.raises(EventGone):
        await gcal.update(user, "0123456789abcdef", desired(user))
    assert await gcal.delete(user, "0123456789abcdef") is False


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("status", "reason", "code", "retriable"), [
    (403, "rateLimitExceeded", THROTTLED, True),
    (403, "userRateLimitExceeded", THROTTLED, True),
    (429, "rateLimitExceeded", THROTTLED, True),
    (403, "forbidden", ACCESS_DENIED, False),
    (400, "invalid", INVALID_EVENT, False),
    (500, "backendError", PROVIDER_ERROR, True),
    (503, "backendError", PROVIDER_ERROR, True),
    (409, "conflict", PROVIDER_ERROR, True),
])
async def test_api_errors_are_translated(google: GoogleServer, gcal: GoogleProvider, status: int,
                                         reason: str, code: str, retriable: bool) -> None:
    user = new_user(google)
    event_id = await gcal.create(desired(user), transaction_id="t")
    google.script(user, status, reason)
    error = await failure(gcal.update(user, event_id, desired(user)))
    assert (error.code, error.retriable) == (code, retriable)
    assert error.retry_after is None
    assert error.hint


async def test_quota_exceeded_backs_off_long(google: GoogleServer, gcal: GoogleProvider) -> None:
    user = new_user(google)
    google.script(user, 403, "quotaExceeded", "Calendar usage limits exceeded.",
                  domain="usageLimits")
    error = await failure(gcal.create(desired(user), transaction_id="t"))
    assert error.code == THROTTLED and error.retriable
    assert error.retry_after == QUOTA_BACKOFF
    assert "usage limits" in error.hint


async def test_unknown_user_is_mailbox_not_found(google: GoogleServer,
                                                 gcal: GoogleProvider) -> None:
    error = await failure(gcal.create(desired("ghost@acme.test"), transaction_id="t"))
    assert (error.code, error.retriable) == (MAILBOX_NOT_FOUND, False)
    assert "ghost@acme.test" in error.hint
    # the refusal is remembered briefly: a burst for the same user costs one grant
    before = len(google.token_requests)
    await failure(gcal.find("ghost@acme.test", Mark("cfg-1", "abs-1")))
    assert len(google.token_requests) == before


async def test_missing_calendar_is_mailbox_not_found(google: GoogleServer, key: str) -> None:
    provider = make_provider(google, key, block={"calendar_id": "no-such-calendar"})
    try:
        user = new_user(google)
        error = await failure(provider.create(desired(user), transaction_id="t"))
    finally:
        await provider.close()
    assert (error.code, error.retriable) == (MAILBOX_NOT_FOUND, False)
    assert "calendar_id" in error.hint


async def test_missing_delegation_is_access_denied_with_the_admin_console_step(
    google: GoogleServer,
) -> None:
    other = google.add_account("nodelegation@acme-project.iam.gserviceaccount.com",
                               scopes=(), client_id="998877665544332211000")
    provider = make_provider(google, other)
    try:
        error = await failure(provider.create(desired(new_user(google)), transaction_id="t"))
    finally:
        await provider.close()
    assert (error.code, error.retriable) == (ACCESS_DENIED, False)
    assert "998877665544332211000" in error.hint
    assert CALENDAR_SCOPE in error.hint
    assert "Admin console" in error.hint and "hours" in error.hint


@pytest.mark.parametrize("bad", [
    "not json", "[]", json.dumps({"type": "authorized_user", "client_id": "x"}),
    json.dumps({"type": "service_account", "client_email": "a@b", "private_key": "nope"}),
])
async def test_unusable_key_is_auth_failed(google: GoogleServer, bad: str) -> None:
    provider = make_provider(google, bad)
    try:
        error = await failure(provider.create(desired(new_user(google)), transaction_id="t"))
    finally:
        await provider.close()
    assert (error.code, error.retriable) == (AUTH_FAILED, False)
    assert "JSON key" in error.hint
    assert "nope" not in error.message


async def test_key_not_matching_the_account_is_auth_failed(google: GoogleServer) -> None:
    google.add_account("rotated@acme-project.iam.gserviceaccount.com")
    stale = json.loads(google.add_account("stale@acme-project.iam.gserviceaccount.com"))
    stale["client_email"] = "rotated@acme-project.iam.gserviceaccount.com"
    provider = make_provider(google, json.dumps(stale))
    try:
        error = await failure(provider.create(desired(new_user(google)), transaction_id="t"))
    finally:
        await provider.close()
    assert error.code == AUTH_FAILED
    assert "Invalid JWT Signature" in error.message


async def test_revoked_token_is_renewed_once(google: GoogleServer, gcal: GoogleProvider) -> None:
    user = new_user(google)
    await gcal.create(desired(user), transaction_id="t1")
    google.tokens.clear()
    before = len(google.token_requests)
    await gcal.create(desired(user, "abs-2"), transaction_id="t2")
    assert len(google.token_requests) == before + 1
    google.script(user, 401, "authError", "Invalid Credentials", times=2)
    error = await failure(gcal.find(user, Mark("cfg-1", "abs-1")))
    assert (error.code, error.retriable) == (AUTH_FAILED, False)


async def test_token_endpoint_outage_is_retriable(google: GoogleServer,
                                                  gcal: GoogleProvider) -> None:
    user = new_user(google)
    google.script_token(user, 503, {"error": "temporarily_unavailable"})
    error = await failure(gcal.create(desired(user), transaction_id="t"))
    assert (error.code, error.retriable) == (PROVIDER_ERROR, True)
    assert await gcal.create(desired(user), transaction_id="t")


# ---------------------------------------------------------------- tokens


async def test_token_grant_and_cache(google: GoogleServer, gcal: GoogleProvider, key: str) -> None:
    user, other = new_user(google), new_user(google)
    before = len(google.token_requests)
    await asyncio.gather(*(gcal.create(desired(user, f"a{n}"), transaction_id=f"t{n}")
                           for n in range(6)))
    await gcal.create(desired(other), transaction_id="t")
    await gcal.find(user, Mark("cfg-1", "a1"))
    grants = google.token_requests[before:]
    assert [g["sub"] for g in grants] == [user.lower(), other.lower()]
    assert {g["iss"] for g in grants} == {ACCOUNT}
    assert {g["scope"] for g in grants} == {CALENDAR_SCOPE}
    assert {g["aud"] for g in grants} == {google.token_url}
    assert {g["grant_type"] for g in grants} == {"urn:ietf:params:oauth:grant-type:jwt-bearer"}


async def test_token_client_serves_another_scope(google: GoogleServer) -> None:
    """The auto-reply side asks for the Gmail settings scope with the same client."""
    key = google.add_account(GMAIL_ACCOUNT, scopes=(CALENDAR_SCOPE, GMAIL_SETTINGS_SCOPE))
    settings = make_settings(google)
    tokens = GoogleTokens(ServiceAccountKey.parse(key),
                          ProviderContext(settings, make_ssl_context(settings)))
    user = new_user(google)
    try:
        gmail = await tokens.get(user, GMAIL_SETTINGS_SCOPE)
        calendar = await tokens.get(user, CALENDAR_SCOPE)
        assert gmail != calendar
        assert await tokens.get(user, GMAIL_SETTINGS_SCOPE) == gmail
        assert google.tokens[gmail][1] == GMAIL_SETTINGS_SCOPE
        google.accounts[GMAIL_ACCOUNT].scopes.discard(GMAIL_SETTINGS_SCOPE)
        error = await failure(tokens.get(new_user(google), GMAIL_SETTINGS_SCOPE))
        assert error.code == ACCESS_DENIED and GMAIL_SETTINGS_SCOPE in error.hint
    finally:
        await tokens.close()


def test_key_repr_hides_the_private_key(key: str) -> None:
    parsed = ServiceAccountKey.parse(key)
    assert "PRIVATE" not in repr(parsed)
    assert parsed.client_email == ACCOUNT


# ---------------------------------------------------------------- quotas


async def test_operations_issued_together_are_batched(
    google: GoogleServer, gcal: GoogleProvider
) -> None:
    users = [new_user(google) for _ in range(4)]
    sizes_before = len(google.batch_sizes)
    events = [desired(u, f"abs-{n}") for u in users for n in range(3)]
    ids = await asyncio.gather(*(gcal.create(e, transaction_id=f"t-{i}")
                                 for i, e in enumerate(events)))
    assert len(set(ids)) == len(events)
    sizes = google.batch_sizes[sizes_before:]
    assert sizes and max(sizes) > 1 and max(sizes) <= 10
    # a batch holds one employee's requests (its token is the outer one too)
    assert all(len(users_of) == 1 for users_of in google.batch_users[sizes_before:])
    for user in users:
        assert len(google.events(user)) == 3
    found = await asyncio.gather(*(gcal.find(e.mailbox, e.mark) for e in events))
    assert [f[0] for f in found] == list(ids)


def test_batch_response_parts_are_matched_by_content_id() -> None:
    raw = (b"--b\r\nContent-Type: application/http\r\nContent-ID: <response-item-1>\r\n\r\n"
           b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\r\n{\"x\": 1}\r\n"
           b"--b\r\nContent-Type: application/http\r\nContent-ID: <response-item-0>\r\n\r\n"
           b"HTTP/1.1 204 No Content\r\n\r\n\r\n--b--\r\n")
    for text in (raw, raw.replace(b"\r\n", b"\n")):
        parts = parse_batch(text, 'multipart/mixed; boundary="b"')
        assert parts[0][0] == 204 and parts[0][2] == b""
        assert parts[1][0] == 404 and json.loads(parts[1][2]) == {"x": 1}


async def test_server_without_batch_endpoint_gets_single_requests(
    google: GoogleServer, gcal: GoogleProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gcal, "batch_url", google.api_url.replace("/calendar/v3", "/nothing"))
    users = [new_user(google) for _ in range(3)]
    ids = await asyncio.gather(*(gcal.create(desired(u), transaction_id="t") for u in users))
    assert all(ids)
    assert all(len(google.events(u)) == 1 for u in users)


async def test_per_mailbox_rate_limit_spaces_requests(google: GoogleServer, key: str) -> None:
    # 122 a minute with a burst of 2: two at once, then one every half second
    provider = make_provider(google, key, rate_per_minute=122, rate_burst=2)
    user, other = new_user(google), new_user(google)
    try:
        await asyncio.gather(*(provider.create(desired(user, f"a{n}"), transaction_id="t")
                               for n in range(6)),
                             provider.create(desired(other), transaction_id="t"))
    finally:
        await provider.close()
    times = sorted(r.at for r in google.api_requests(user))
    assert len(times) == 6
    for first, second in itertools.combinations(range(len(times)), 2):
        # any window holds at most burst + rate * its length requests
        assert second - first + 1 <= 2 + 2.0 * (times[second] - times[first]) + 0.2, times
    other_times = [r.at for r in google.api_requests(other)]
    assert other_times[0] - times[0] < 0.5  # another mailbox does not wait


async def test_wait_beyond_the_timeout_is_throttled_at_once(google: GoogleServer,
                                                            key: str) -> None:
    provider = make_provider(google, key, rate_per_minute=2, rate_burst=1, timeout=0.5)
    user = new_user(google)
    try:
        await provider.create(desired(user), transaction_id="t")
        error = await failure(provider.create(desired(user, "b"), transaction_id="t"))
    finally:
        await provider.close()
    assert error.code == THROTTLED and error.retriable
    assert error.retry_after is not None and error.retry_after > 0.5
    assert len(google.api_requests(user)) == 1


async def test_google_rate_limit_answer_is_throttled(google: GoogleServer, gcal: GoogleProvider,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(google, "user_rate", 3)
    user = new_user(google)
    results = await asyncio.gather(
        *(gcal.create(desired(user, f"a{n}"), transaction_id="t") for n in range(5)),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, ProviderError)]
    assert errors and all(e.code == THROTTLED and e.retriable for e in errors)
    assert google.rate_limited


# ---------------------------------------------------------------- configuration


def test_google_block_checks_autodecline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_GOOGLE_KEY", '{"type": "service_account"}')
    base = {"id": "g", "tenant": "acme", "provider": "google"}
    config = parse_sync("syncs[0]", {**base, "google": {
        "service_account_env": "TEST_GOOGLE_KEY", "autodecline": "ALL"}})
    assert config.provider_settings == {"autodecline": "all"}
    with pytest.raises(ConfigError, match=r"google\.autodecline.*none, all, new"):
        parse_sync("syncs[0]", {**base, "google": {
            "service_account_env": "TEST_GOOGLE_KEY", "autodecline": "sometimes"}})
    with pytest.raises(ConfigError, match=r"google\.calendar_id"):
        parse_sync("syncs[0]", {**base, "google": {
            "service_account_env": "TEST_GOOGLE_KEY", "calendar_id": " "}})


async def test_out_of_office_outside_primary_is_warned(google: GoogleServer, key: str) -> None:
    def config(**fields: Any) -> SyncConfig:
        return SyncConfig(id="w", tenant="acme", provider="google",
                          secrets={"service_account": key}, **fields)

    shared = config(busy_as="oof", provider_settings={"calendar_id": "absences"})
    assert config_warnings(shared) and "primary" in config_warnings(shared)[0]
    assert config_warnings(config(busy_as="oof")) == []
    assert config_warnings(config(provider_settings={"calendar_id": "absences"})) == []
    settings = make_settings(google)
    provider = GoogleProvider.from_config(shared, ProviderContext(settings,
                                                                  make_ssl_context(settings)))
    try:
        assert provider.warnings == tuple(config_warnings(shared))
    finally:
        await provider.close()


_zones = st.sampled_from(["Europe/Paris", "America/New_York", "Asia/Kolkata", "UTC"])


@settings(max_examples=200, deadline=None)
@given(
    show_as=st.sampled_from(["free", "tentative", "busy", "oof", "workingElsewhere"]),
    all_day=st.booleans(),
    day=st.dates(min_value=dt.date(2000, 1, 1), max_value=dt.date(2099, 12, 1)),
    length=st.integers(min_value=0, max_value=40),
    minutes=st.tuples(st.integers(0, 23 * 60), st.integers(1, 12 * 60)),
    zone=_zones,
    private=st.booleans(),
    subject=st.text(min_size=1, max_size=255),
    primary=st.booleans(),
    autodecline=st.sampled_from(["none", "all", "new"]),
)
def test_every_rendered_event_is_a_payload_google_accepts(
    show_as: str, all_day: bool, day: dt.date, length: int, minutes: tuple[int, int],
    zone: str, private: bool, subject: str, primary: bool, autodecline: str,
) -> None:
    if all_day:
        start = dt.datetime.combine(day, dt.time())
        end = start + dt.timedelta(days=length + 1)
    else:
        start = dt.datetime.combine(day, dt.time()) + dt.timedelta(minutes=minutes[0])
        end = start + dt.timedelta(days=length, minutes=minutes[1])
    event = desired("x@acme.test", show_as=show_as, all_day=all_day, start=start, end=end,
                    time_zone=zone, private=private, subject=subject)
    body = event_payload(event, primary=primary, autodecline=autodecline)
    assert validate_event(json.loads(json.dumps(body)),
                          "primary" if primary else "absences") is None
    assert (body["eventType"] == "outOfOffice") == (show_as == "oof" and primary)
    assert body["extendedProperties"]["private"][MARK_KEY] == event.mark.value


@given(seed=st.text(), attempt=st.integers(0, 1000))
def test_event_ids_always_follow_googles_rules(seed: str, attempt: int) -> None:
    assert re.fullmatch(r"[0-9a-v]{5,1024}", google_event_id(seed, attempt))


async def test_untrusted_certificate_is_reported(google: GoogleServer, key: str) -> None:
    settings = make_settings(google, ca_bundle=None)
    config = SyncConfig(id="tls", tenant="acme", provider="google",
                        secrets={"service_account": key})
    provider = GoogleProvider.from_config(config, ProviderContext(settings,
                                                                  make_ssl_context(settings)))
    try:
        error = await failure(provider.create(desired(new_user(google)), transaction_id="t"))
    finally:
        await provider.close()
    assert (error.code, error.retriable) == (TLS_UNTRUSTED_CERTIFICATE, False)


async def test_find_never_takes_another_mark_for_its_own(
    google: GoogleServer, gcal: GoogleProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = new_user(google)
    mine = await gcal.create(desired(user, "abs-1"), transaction_id="t")
    await gcal.create(desired(user, "abs-2"), transaction_id="t")
    original = google._list

    def unfiltered(box: dict[str, dict[str, Any]], params: dict[str, list[str]]) -> Any:
        return original(box, {k: v for k, v in params.items()
                              if k != "privateExtendedProperty"})

    monkeypatch.setattr(google, "_list", unfiltered)
    assert await gcal.find(user, Mark("cfg-1", "abs-1")) == [mine]
