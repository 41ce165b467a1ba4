"""The `reply` target through the executor, the real store and the Graph and
EWS test servers (no Kafka): approvals, moves, cancellations, the employee's
own reply, adjacent absences, the next absence taking over, and a crash
between the write and its record."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from cryptography.fernet import Fernet

from consumer import store
from consumer.admin import Admin
from consumer.config import SyncConfig
from consumer.dispatch import Executor, Job, KeyedLimiter, LeaseClock, ProviderCache, RetryPolicy
from consumer.events import parse_event
from consumer.metrics import Metrics
from consumer.outages import Outages
from consumer.providers.base import Provider
from consumer.replies import ReplySetting
from consumer.secrets import SecretBox
from consumer.store import replies as reply_store
from tests.conftest import event
from tests.ews_server import EwsServer
from tests.google_server import GoogleServer
from tests.graph_server import GraphServer
from tests.test_provider_exchange import ews  # noqa: F401 - fixture
from tests.test_provider_exchange import make_provider as make_exchange
from tests.test_provider_google import google  # noqa: F401 - fixture
from tests.test_provider_microsoft365 import TENANT, graph, make_provider  # noqa: F401

UTC = dt.UTC
_boxes = itertools.count()
REPLY = {"internal": "{first_name} is away until {return_date}.",
         "external": "I am out of the office until {return_date}.", "audience": "all"}


def o365(**changes: Any) -> SyncConfig:
    fields: dict[str, Any] = {"auto_reply": REPLY, **changes}
    return SyncConfig(id="acme-o365", tenant="acme", provider="microsoft365",
                      provider_settings={"tenant_id": TENANT}, **fields)


async def record(pool: asyncpg.Pool, *docs: dict[str, Any]) -> None:
    incoming = []
    for doc in docs:
        parsed = parse_event(json.dumps(doc).encode())
        incoming.append(store.Incoming(parsed.absence, parsed.data, parsed.time))
    async with pool.acquire() as conn, conn.transaction():
        await store.record_absences(conn, incoming)


class World:
    def __init__(self, pool: asyncpg.Pool, provider: Provider,
                 box: SecretBox | None = None) -> None:
        self.pool = pool
        self.provider = provider
        self.box = box or SecretBox(None)
        metrics = Metrics()
        self.executor = Executor(
            pool, metrics, RetryPolicy(base=5.0), mailbox_slots=KeyedLimiter(),
            mailbox_leases=None, outages=Outages(metrics), outage_retry_max_seconds=1.0,
        )

    async def sync(self, provider: Provider | None = None) -> list[store.Claimed]:
        items = await store.claim(self.pool, limit=100, busy_tenants=[], lease_seconds=30,
                                  owner="test")
        cache = ProviderCache(self.pool, self.box, lambda _: provider or self.provider)
        jobs = []
        for item in items:
            resolved = await cache.get(item.config_id, item.config_revision)
            assert resolved is not None
            jobs.append(Job(item, resolved))
        done: list[store.Claimed] = []
        await self.executor.run(jobs, LeaseClock(asyncio.get_running_loop().time() + 30),
                                done.append)
        return items

    async def reply_item(self, absence_id: str) -> asyncpg.Record:
        row = await self.pool.fetchrow(
            "SELECT * FROM sync_items WHERE absence_id = $1 AND target = 'reply'", absence_id)
        assert row is not None
        return row


@pytest.fixture
async def m365(pool: asyncpg.Pool, graph: GraphServer) -> AsyncIterator[World]:  # noqa: F811
    await store.apply_configs(pool, [o365()], SecretBox(None))
    provider = make_provider(graph)
    yield World(pool, provider)
    await provider.close()


def mailbox(graph: GraphServer) -> str:  # noqa: F811
    return graph.add_mailbox(f"jane{next(_boxes)}@acme.test").lower()


def scheduled(graph: GraphServer, box: str) -> tuple[str, str, str]:  # noqa: F811
    held = graph.reply_of(box)
    return (held["status"], held["scheduledStartDateTime"]["dateTime"][:16],
            held["scheduledEndDateTime"]["dateTime"][:16])


async def test_approval_move_and_cancellation(m365: World, graph: GraphServer) -> None:  # noqa: F811
    box = mailbox(graph)
    await record(m365.pool, event("a1", 1, email=box, display_name="Jane Doe",
                                  start=("2027-03-01", "am"), end=("2027-03-03", "pm")))
    await m365.sync()
    # Paris is UTC+1 in March: local midnight to midnight
    assert scheduled(graph, box) == ("scheduled", "2027-02-28T23:00", "2027-03-03T23:00")
    assert "Jane is away until 2027-03-04." in graph.reply_of(box)["internalReplyMessage"]
    item = await m365.reply_item("a1")
    assert (item["status"], item["mailbox"]) == ("synced", box)
    calendar = await m365.pool.fetchrow(
        "SELECT status FROM sync_items WHERE absence_id = 'a1' AND target = 'calendar'")
    assert calendar is not None and calendar["status"] == "synced"

    # moved twice: rescheduled each time, ours all along
    await record(m365.pool, event("a1", 2, email=box, display_name="Jane Doe",
                                  start=("2027-03-08", "am"), end=("2027-03-08", "am")))
    await m365.sync()
    assert scheduled(graph, box) == ("scheduled", "2027-03-08T08:00", "2027-03-08T11:30")
    assert "until 2027-03-08." in graph.reply_of(box)["internalReplyMessage"]
    await record(m365.pool, event("a1", 3, email=box, display_name="Jane Doe",
                                  start=("2027-03-12", "pm"), end=("2027-03-15", "am")))
    await m365.sync()
    assert scheduled(graph, box) == ("scheduled", "2027-03-12T12:30", "2027-03-15T11:30")
    assert (await m365.reply_item("a1"))["status"] == "synced"

    # re-queued without a change (a resync): no request at all; forced: read and rewrite
    settings_calls = len([r for r in graph.graph_requests(box) if "mailboxSettings" in r.path])
    await m365.pool.execute("UPDATE sync_items SET change_seq = change_seq + 1"
                            " WHERE target = 'reply'")
    await m365.sync()
    assert len([r for r in graph.graph_requests(box)
                if "mailboxSettings" in r.path]) == settings_calls
    await m365.pool.execute("UPDATE sync_items SET change_seq = change_seq + 1, force = true"
                            " WHERE target = 'reply'")
    await m365.sync()
    methods = [r.method for r in graph.graph_requests(box)
               if "mailboxSettings" in r.path][settings_calls:]
    assert methods == ["GET", "PATCH", "GET"]
    assert (await m365.reply_item("a1"))["status"] == "synced"

    await record(m365.pool, event("a1", 4, email=box, status="cancelled",
                                  start=("2027-03-12", "pm"), end=("2027-03-15", "am")))
    await m365.sync()
    assert graph.reply_of(box)["status"] == "disabled"
    assert (await m365.reply_item("a1"))["status"] == "deleted"


async def test_the_employees_own_reply_is_left_alone(m365: World, graph: GraphServer) -> None:  # noqa: F811
    box = mailbox(graph)
    await record(m365.pool, event("b1", 1, email=box, start=("2027-04-05", "am"),
                                  end=("2027-04-09", "pm")))
    await m365.sync()
    assert graph.reply_of(box)["status"] == "scheduled"
    own = {"status": "alwaysEnabled", "internalReplyMessage": "Back whenever, ask Bob.",
           "externalReplyMessage": "Away."}
    graph.set_user_reply(box, own)
    theirs = graph.reply_of(box)

    await record(m365.pool, event("b1", 2, email=box, start=("2027-04-12", "am"),
                                  end=("2027-04-16", "pm")))
    await m365.sync()
    assert graph.reply_of(box) == theirs
    item = await m365.reply_item("b1")
    assert item["status"] == "skipped_user_reply"
    counts = await store.status_counts(m365.pool, "acme-o365")
    assert counts.get("skipped_user_reply") == 1
    # monitoring: counted per configuration and target, listed by state
    admin = Admin(m365.pool)
    view = (await admin.sync("acme", "acme-o365", "https://sync.example.com")).to_json()
    assert view["counts"]["skipped_user_reply"] == 1
    assert view["counts_by_target"]["reply"]["skipped_user_reply"] == 1
    page = await admin.items("acme", "acme-o365", state="skipped_user_reply", cursor=None,
                             limit=50)
    assert [(r.absence_id, r.target) for r in page.items] == [("b1", "reply")]
    await _monitoring_shows_it(m365.pool, box)
    history = await m365.pool.fetch(
        "SELECT operation FROM sync_log WHERE absence_id = 'b1' AND target = 'reply'")
    assert "reply_skipped" in [h["operation"] for h in history]

    await record(m365.pool, event("b1", 3, email=box, status="cancelled",
                                  start=("2027-04-12", "am"), end=("2027-04-16", "pm")))
    await m365.sync()
    assert graph.reply_of(box) == theirs  # cancelled: theirs stays


async def test_adjacent_absences_share_one_reply_and_the_next_one_takes_over(
    m365: World, graph: GraphServer,  # noqa: F811
) -> None:
    box = mailbox(graph)
    await record(m365.pool,
                 event("c1", 1, email=box, start=("2027-05-03", "am"), end=("2027-05-07", "pm")),
                 event("c2", 1, email=box, start=("2027-05-10", "am"), end=("2027-05-10", "pm")),
                 event("c3", 1, email=box, start=("2027-05-24", "am"), end=("2027-05-25", "pm")))
    await m365.sync()
    # c1 (Mon-Fri) and c2 (the next Monday) are adjacent: one reply covering both
    assert scheduled(graph, box) == ("scheduled", "2027-05-02T22:00", "2027-05-10T22:00")
    assert "until 2027-05-11." in graph.reply_of(box)["internalReplyMessage"]
    assert {(await m365.reply_item(a))["status"] for a in ("c1", "c2", "c3")} == {"synced"}
    due = await m365.pool.fetchval(
        "SELECT recheck_at FROM auto_replies WHERE mailbox = $1", box)
    assert due == dt.datetime(2027, 5, 10, 22, 0, tzinfo=UTC)

    # cancelling c1 shrinks the reply to c2
    await record(m365.pool, event("c1", 2, email=box, status="cancelled",
                                  start=("2027-05-03", "am"), end=("2027-05-07", "pm")))
    await m365.sync()
    assert scheduled(graph, box) == ("scheduled", "2027-05-09T22:00", "2027-05-10T22:00")

    # once c2 is over, c3's reply takes the mailbox
    m365.executor.replies.clock = lambda: dt.datetime(2027, 5, 12, tzinfo=UTC)
    await m365.pool.execute("UPDATE auto_replies SET recheck_at = now() - interval '1 s'")
    assert await reply_store.queue_due_rechecks(m365.pool) >= 1
    await m365.sync()
    assert scheduled(graph, box) == ("scheduled", "2027-05-23T22:00", "2027-05-25T22:00")


class _Crash(BaseException):
    """The process dies right after the server took the write."""


class _CrashAfterWrite(Provider):
    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.kind = inner.kind  # type: ignore[misc]
        self.supports_replies = True  # type: ignore[misc]

    async def create(self, event: Any, *, transaction_id: str) -> str:
        return await self.inner.create(event, transaction_id=transaction_id)

    async def update(self, mailbox: str, event_id: str, event: Any) -> str:
        return await self.inner.update(mailbox, event_id, event)

    async def delete(self, mailbox: str, event_id: str) -> bool:
        return await self.inner.delete(mailbox, event_id)

    async def find(self, mailbox: str, mark: Any) -> list[str]:
        return await self.inner.find(mailbox, mark)

    async def read_reply(self, mailbox: str) -> ReplySetting:
        return await self.inner.read_reply(mailbox)

    async def write_reply(self, mailbox: str, setting: ReplySetting) -> ReplySetting:
        await self.inner.write_reply(mailbox, setting)
        raise _Crash


async def test_a_crash_between_the_write_and_its_record_keeps_the_reply_ours(
    pool: asyncpg.Pool, graph: GraphServer,  # noqa: F811
) -> None:
    config = o365()
    config = config.model_copy(update={"auto_reply": config.auto_reply, "id": "acme-crash"})
    await store.apply_configs(pool, [SyncConfig(**{**config.model_dump(), "id": "acme-crash"})],
                              SecretBox(None))
    provider = make_provider(graph, config_id="acme-crash")
    world = World(pool, provider)
    box = mailbox(graph)
    try:
        await record(pool, event("d1", 1, email=box, start=("2027-06-07", "am"),
                                 end=("2027-06-08", "pm")))
        # the calendar item goes first, then the reply item dies after its write
        with pytest.raises(_Crash):
            await world.sync(_CrashAfterWrite(provider))
        assert graph.reply_of(box)["status"] == "scheduled"
        row = await pool.fetchrow("SELECT readback, intent FROM auto_replies WHERE mailbox = $1",
                                  box)
        assert row is not None and row["readback"] is None and row["intent"] is not None
        # the lease runs out; the item is tried again: the reply is adopted, not skipped
        await pool.execute("UPDATE sync_items SET lease_until = NULL, lease_owner = NULL")
        await world.sync()
        assert (await world.reply_item("d1"))["status"] == "synced"
        # and stays ours: a cancellation disables it
        await record(pool, event("d1", 2, email=box, status="cancelled",
                                 start=("2027-06-07", "am"), end=("2027-06-08", "pm")))
        await world.sync()
        assert graph.reply_of(box)["status"] == "disabled"
    finally:
        await provider.close()


async def test_a_new_address_moves_the_reply(m365: World, graph: GraphServer) -> None:  # noqa: F811
    old, new = mailbox(graph), mailbox(graph)
    await record(m365.pool, event("e1", 1, email=old, start=("2027-07-05", "am"),
                                  end=("2027-07-06", "pm")))
    await m365.sync()
    assert graph.reply_of(old)["status"] == "scheduled"
    await record(m365.pool, event("e1", 2, email=old, calendar_address=new,
                                  start=("2027-07-05", "am"), end=("2027-07-06", "pm")))
    await m365.sync()
    assert graph.reply_of(old)["status"] == "disabled"
    assert graph.reply_of(new)["status"] == "scheduled"
    assert (await m365.reply_item("e1"))["mailbox"] == new


async def test_throttling_is_retried_with_back_off(m365: World, graph: GraphServer) -> None:  # noqa: F811
    box = mailbox(graph)
    graph.script_settings(box, 429, "ApplicationThrottled", retry_after="2")
    await record(m365.pool, event("f1", 1, email=box, start=("2027-08-02", "am"),
                                  end=("2027-08-02", "pm")))
    await m365.sync()
    item = await m365.reply_item("f1")
    assert item["last_error_code"] == "throttled" and item["status"] == "pending"
    assert item["next_attempt_at"] >= item["updated_at"] + dt.timedelta(seconds=1.5)
    await m365.pool.execute("UPDATE sync_items SET next_attempt_at = now()")
    await m365.sync()  # the provider waits out what is left of Retry-After
    assert (await m365.reply_item("f1"))["status"] == "synced"
    assert graph.reply_of(box)["status"] == "scheduled"


async def test_exchange_through_the_executor(pool: asyncpg.Pool, ews: EwsServer) -> None:  # noqa: F811
    config = SyncConfig(
        id="acme-ews", tenant="acme", provider="exchange",
        provider_settings={"url": ews.url, "username": ews.username, "auth": "basic"},
        secrets={"password": ews.password}, auto_reply=REPLY,
    )
    box = SecretBox(Fernet.generate_key().decode())
    await store.apply_configs(pool, [config], box)
    provider = make_exchange(ews)
    world = World(pool, provider, box)
    address = ews.add_mailbox(f"ex{next(_boxes)}@acme.test").lower()
    try:
        await record(pool, event("g1", 1, email=address, start=("2027-09-06", "am"),
                                 end=("2027-09-07", "pm")))
        await world.sync()
        held = ews.oof_of(address)
        assert (held["state"], held["start"], held["end"]) == (
            "Scheduled", "2027-09-05T22:00:00Z", "2027-09-07T22:00:00Z")
        ews.set_user_oof(address, internal="My own words")
        await record(pool, event("g1", 2, email=address, status="cancelled",
                                 start=("2027-09-06", "am"), end=("2027-09-07", "pm")))
        await world.sync()
        assert ews.oof_of(address)["state"] == "Scheduled"  # theirs now: left alone
        assert "My own words" in ews.oof_of(address)["internal"]
    finally:
        await provider.close()


async def test_the_consent_link_names_the_mailbox_settings_permission(
    dsn: str, pool: asyncpg.Pool,
) -> None:
    from tests.test_consent import consent_url

    await store.apply_configs(pool, [
        o365(), SyncConfig(id="acme-plain", tenant="acme", provider="microsoft365"),
    ], SecretBox(None))
    with_replies = consent_url(dsn, "acme-o365")
    assert with_replies.returncode == 0, with_replies.stderr
    assert "Calendars.ReadWrite and MailboxSettings.ReadWrite" in with_replies.stderr
    plain = consent_url(dsn, "acme-plain")
    assert plain.returncode == 0 and "MailboxSettings" not in plain.stderr


async def test_gmail_through_the_executor(pool: asyncpg.Pool, google: GoogleServer) -> None:  # noqa: F811
    from tests.google_server import CALENDAR_SCOPE, GMAIL_SCOPE
    from tests.test_reply_providers import make_gmail

    key = google.add_account("gmail-dispatch@acme-project.iam.gserviceaccount.com",
                             scopes=(CALENDAR_SCOPE, GMAIL_SCOPE))
    config = SyncConfig(id="acme-google", tenant="acme", provider="google",
                        secrets={"service_account": key},
                        auto_reply={**REPLY, "audience": "none", "subject": "Away: {display_name}"})
    box = SecretBox(Fernet.generate_key().decode())
    await store.apply_configs(pool, [config], box)
    provider = make_gmail(google, key)
    world = World(pool, provider, box)
    address = google.add_user(f"gm{next(_boxes)}@acme.test").lower()
    try:
        await record(pool, event("h1", 1, email=address, display_name="Jane Doe",
                                 start=("2027-10-04", "am"), end=("2027-10-05", "pm")))
        await world.sync()
        held = google.vacation(address)
        assert held["enableAutoReply"] is True and held["restrictToDomain"] is True
        assert held["responseBodyPlainText"] == "Jane is away until 2027-10-06."
        assert held["responseSubject"] == "Away: Jane Doe"
        assert held["startTime"] == str(int(dt.datetime(2027, 10, 3, 22, tzinfo=UTC)
                                            .timestamp() * 1000))
        assert (await world.reply_item("h1"))["status"] == "synced"
        await record(pool, event("h1", 2, email=address, status="cancelled",
                                 start=("2027-10-04", "am"), end=("2027-10-05", "pm")))
        await world.sync()
        assert google.vacation(address)["enableAutoReply"] is False
    finally:
        await provider.close()


async def test_adding_then_removing_the_option(pool: asyncpg.Pool, graph: GraphServer) -> None:  # noqa: F811
    """A configuration that gains `auto_reply` gets a reply item per recorded
    absence; one that loses it switches its replies off (only its own)."""
    from consumer.targets import CALENDAR, targets_of
    from consumer.targets import REPLY as REPLY_TARGET

    plain = SyncConfig(id="acme-later", tenant="acme", provider="microsoft365",
                       provider_settings={"tenant_id": TENANT})
    assert targets_of(plain) == [CALENDAR]
    assert targets_of(o365()) == [CALENDAR, REPLY_TARGET]
    await store.apply_configs(pool, [plain], SecretBox(None))
    provider = make_provider(graph, config_id="acme-later")
    world = World(pool, provider)
    box = mailbox(graph)
    try:
        await record(pool, event("i1", 1, email=box, start=("2027-11-01", "am"),
                                 end=("2027-11-02", "pm")))
        await world.sync()
        assert graph.reply_of(box)["status"] == "disabled"
        with_replies = SyncConfig(**{**plain.model_dump(), "auto_reply": REPLY})
        await store.apply_configs(pool, [with_replies], SecretBox(None))
        await world.sync()
        assert graph.reply_of(box)["status"] == "scheduled"
        await store.apply_configs(pool, [plain], SecretBox(None))
        await world.sync()
        assert graph.reply_of(box)["status"] == "disabled"
        assert (await world.reply_item("i1"))["status"] == "deleted"
    finally:
        await provider.close()


async def _monitoring_shows_it(pool: asyncpg.Pool, box: str) -> None:
    """The API lists the item by its state and the page names the mailbox."""
    from aiohttp.test_utils import TestClient, TestServer

    from consumer.web import WebState, create_app
    from tests.admin_world import new_token
    from tests.test_page import sign_in

    token = await new_token(pool, "acme", "read")
    async with TestClient(TestServer(create_app(WebState(Metrics(), pool)))) as client:
        headers = {"Authorization": f"Bearer {token}"}
        listed = await client.get("/api/v1/syncs/acme-o365/items",
                                  params={"state": "skipped_user_reply"}, headers=headers)
        assert listed.status == 200, await listed.text()
        body = await listed.json()
        assert [(i["absence_id"], i["target"], i["state"]) for i in body["items"]] == [
            ("b1", "reply", "skipped_user_reply")]
        sync = await (await client.get("/api/v1/syncs/acme-o365", headers=headers)).json()
        assert sync["counts"]["skipped_user_reply"] == 1
        await sign_in(client, token)
        page = await client.get("/ui/syncs/acme-o365")
        text = await page.text()
        assert page.status == 200 and "Own reply kept" in text and box in text
