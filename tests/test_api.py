"""The administration API against the real database, with tokens of two tenants
and three roles; every answer is checked against the OpenAPI document."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet
from jsonschema import Draft202012Validator, FormatChecker

from consumer import resync, store, tokens
from consumer.config import SyncConfig
from consumer.metrics import Metrics
from consumer.secrets import SecretBox
from consumer.settings import Settings
from consumer.web import WebState, create_app
from consumer.web.api import PREFIX, ROUTES
from consumer.web.openapi import document
from tests.admin_world import (
    Calendars,
    absence,
    admin_settings,
    dispatching,
    idle,
    new_token,
    record,
    settle,
)
from tests.conftest import Publisher, wait_until

Client = TestClient[web.Request, web.Application]
ROLES = tokens.ROLES
DAV = {"url": "https://dav.example.com/{email}/calendar/"}
GHOST = "ghost@acme.test"
ACME_MAILBOXES = ["jane@acme.test", "john@acme.test", "joe@acme.test", GHOST]
_cases = itertools.count()


# ---------------------------------------------------------------- OpenAPI checks

def _template(path: str) -> str:
    return path.replace(PREFIX, "", 1)


def check_against_openapi(method: str, template: str, status: int, body: Any) -> None:
    """The response is documented for this operation and status, and matches its schema."""
    doc = document()
    operation = doc["paths"][template][method.lower()]
    assert str(status) in operation["responses"], (method, template, status, body)
    content = operation["responses"][str(status)].get("content")
    if content is None:
        assert body is None, (method, template, status, body)
        return
    schema = content["application/json"]["schema"]
    validator = Draft202012Validator(
        {**schema, "components": doc["components"]}, format_checker=FormatChecker()
    )
    errors = sorted(validator.iter_errors(body), key=str)
    assert not errors, (method, template, status, [e.message for e in errors[:3]])


@dataclass
class Api:
    client: Client
    seen: set[tuple[str, str, int]] = field(default_factory=set)

    async def call(
        self, method: str, template: str, token: str | None = None, *,
        ids: dict[str, str] | None = None, json: Any = None, query: dict[str, str] | None = None,
        raw: str | None = None,
    ) -> tuple[int, Any]:
        path = PREFIX + template.format(**(ids or {}))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = raw if raw is not None else None
        response = await self.client.request(
            method, path, headers=headers, json=json if raw is None else None, data=data,
            params=query,
        )
        body = await response.json() if response.status != 204 else None
        check_against_openapi(method, template.replace("{sync}", "{id}").replace("{job}", "{id}"),
                              response.status, body)
        self.seen.add((method, template, response.status))
        if response.status >= 400:
            assert response.headers["Cache-Control"] == "no-store"
        return response.status, body


# ---------------------------------------------------------------- the world


@dataclass
class World:
    pool: asyncpg.Pool
    settings: Settings
    calendars: Calendars
    box: SecretBox
    api: Api
    tokens: dict[tuple[str, str], str]
    publisher: Publisher
    job_id: str = ""

    async def record(self, docs: list[dict[str, Any]]) -> None:
        await record(self.pool, docs, self.publisher)

    def token(self, tenant: str, role: str) -> str:
        return self.tokens[(tenant, role)]


def caldav(config_id: str, tenant: str = "acme", **fields: Any) -> SyncConfig:
    return SyncConfig(id=config_id, tenant=tenant, provider="caldav", provider_settings=DAV,
                      **fields)


@pytest.fixture
async def world(
    dsn: str, pool: asyncpg.Pool, settings: Settings, publisher: Publisher
) -> AsyncIterator[World]:
    settings = admin_settings(
        dsn, kafka_bootstrap_servers=settings.kafka_bootstrap_servers, topic=settings.topic,
        dlq_topic=settings.dlq_topic, group_id=settings.group_id,
    )
    box = SecretBox(Fernet.generate_key().decode())
    calendars = Calendars(settings, unknown={GHOST})
    await store.apply_configs(pool, [
        SyncConfig(id="acme-o365", tenant="acme", provider="microsoft365"),
        caldav("acme-cal"),
        caldav("acme-put"),
        caldav("globex-cal", tenant="globex"),
    ], box)
    await record(pool, [absence(f"a{n}", box_) for n, box_ in enumerate(ACME_MAILBOXES)],
                 publisher)
    await record(pool, [absence("g1", "mallory@globex.test", tenant="globex")], publisher)
    await settle(pool, settings, calendars)
    found = {
        (tenant, role): await new_token(pool, tenant, role, f"{tenant} {role}")
        for tenant in ("acme", "globex") for role in ROLES
    }
    state = WebState(Metrics(), pool, settings=settings, box=box, housekeeping_seconds=0.1,
                     bootstrap=settings.kafka_bootstrap_servers)
    async with TestClient(TestServer(create_app(state))) as client:
        yield World(pool, settings, calendars, box, Api(client), found, publisher)
    await resync.cancel_jobs()


# ---------------------------------------------------------------- monitoring


async def test_health_causes_and_consent_link(world: World) -> None:
    status, body = await world.api.call("GET", "/syncs", world.token("acme", "read"))
    assert status == 200
    syncs = {s["id"]: s for s in body["syncs"]}
    assert sorted(syncs) == ["acme-cal", "acme-o365", "acme-put"]  # nothing of globex

    o365 = syncs["acme-o365"]
    assert o365["health"] == "failing"
    assert o365["counts"] == {"pending": 0, "synced": 0, "failed": 4, "deleted": 0}
    assert o365["cause"].startswith("An administrator must grant consent: https://")
    link = urlsplit(o365["consent_url"])
    assert o365["cause"].endswith(o365["consent_url"])
    assert (link.netloc, link.path) == ("login.microsoftonline.com",
                                        "/organizations/v2.0/adminconsent")
    query = parse_qs(link.query)
    assert query["redirect_uri"] == ["https://sync.vendor.example/consent/microsoft365/callback"]
    state = query["state"][0]
    assert await world.pool.fetchval(
        "SELECT config_id FROM consent_states WHERE state = $1", state) == "acme-o365"
    assert o365["last_failure_at"] is not None and o365["last_success_at"] is None

    cal = syncs["acme-cal"]
    assert cal["health"] == "degraded"
    assert cal["cause"] == (
        f"Some mailboxes fail: check these employees' e-mail addresses: {GHOST}."
    )
    assert cal["consent_url"] is None
    assert cal["counts"] == {"pending": 0, "synced": 3, "failed": 1, "deleted": 0}
    assert (cal["synced"], cal["pending"], cal["failed"]) == (3, 0, 1)  # also at the top
    assert (o365["synced"], o365["pending"], o365["failed"]) == (0, 0, 4)
    assert cal["last_success_at"] is not None

    # viewing again reuses the consent state instead of piling them up
    again = (await world.api.call("GET", "/syncs", world.token("acme", "read")))[1]
    assert {s["id"]: s for s in again["syncs"]}["acme-o365"]["consent_url"] == o365["consent_url"]
    assert await world.pool.fetchval("SELECT count(*) FROM consent_states") == 1

    status, body = await world.api.call("GET", "/syncs", world.token("globex", "read"))
    assert [(s["id"], s["health"], s["cause"]) for s in body["syncs"]] == [
        ("globex-cal", "ok", None)
    ]


async def test_idle_until_something_is_written(world: World) -> None:
    await store.apply_configs(world.pool, [caldav("globex-new", tenant="globex")], world.box)
    status, body = await world.api.call("GET", "/syncs/{sync}", world.token("globex", "read"),
                                        ids={"sync": "globex-new"})
    assert status == 200
    assert (body["health"], body["cause"]) in {("idle", None)}
    # its backfilled absence is pending: once written, the configuration is ok
    await settle(world.pool, world.settings, world.calendars)
    body = (await world.api.call("GET", "/syncs/{sync}", world.token("globex", "read"),
                                 ids={"sync": "globex-new"}))[1]
    assert body["health"] == "ok"


async def test_throttling_alone_is_not_a_failure(world: World) -> None:
    await store.apply_configs(world.pool, [caldav("globex-slow", tenant="globex")], world.box)
    from consumer.providers.base import THROTTLED, ProviderError

    world.calendars.memory.fail_next(
        *[ProviderError(THROTTLED, "slow down", retriable=True, retry_after=0.01)] * 3
    )
    await settle(world.pool, world.settings, world.calendars)
    errors = await world.pool.fetchval(
        "SELECT count(*) FROM sync_log WHERE config_id = 'globex-slow' AND error_code = $1",
        THROTTLED,
    )
    assert errors >= 1
    body = (await world.api.call("GET", "/syncs/{sync}", world.token("globex", "read"),
                                 ids={"sync": "globex-slow"}))[1]
    assert (body["health"], body["cause"]) == ("ok", None)


async def test_detail_never_shows_secrets(world: World) -> None:
    status, body = await world.api.call(
        "PUT", "/syncs/{sync}", world.token("acme", "configure"), ids={"sync": "acme-ex"},
        json={"provider": "exchange", "exchange": {
            "url": "https://mail.acme.test/EWS/Exchange.asmx", "username": "svc-sync",
            "password": "s3cret-Exchange-pw"}},
    )
    assert status == 201, body
    assert body["secrets"] == ["password"]
    assert body["configuration"]["exchange"] == {
        "url": "https://mail.acme.test/EWS/Exchange.asmx", "username": "svc-sync"}
    assert body["configuration"]["tenant"] == "acme"
    assert "s3cret-Exchange-pw" not in str(body)
    status, body = await world.api.call("GET", "/syncs/{sync}", world.token("acme", "read"),
                                        ids={"sync": "acme-ex"})
    assert "s3cret-Exchange-pw" not in str(body)
    # stored encrypted
    raw = await world.pool.fetchval("SELECT secrets FROM sync_configs WHERE id = 'acme-ex'")
    assert b"s3cret-Exchange-pw" not in bytes(raw)
    # a document without the secret keeps it; null removes it
    status, body = await world.api.call(
        "PUT", "/syncs/{sync}", world.token("acme", "configure"), ids={"sync": "acme-ex"},
        json={"provider": "exchange", "hidden_label": "Away", "exchange": {
            "url": "https://mail.acme.test/EWS/Exchange.asmx", "username": "svc-sync"}},
    )
    assert status == 200, body
    stored = await store.get_config(world.pool, "acme-ex", world.box)
    assert stored is not None and stored.config.secrets == {"password": "s3cret-Exchange-pw"}
    assert stored.config.hidden_label == "Away"
    status, body = await world.api.call(
        "PUT", "/syncs/{sync}", world.token("acme", "configure"), ids={"sync": "acme-ex"},
        json={"provider": "exchange", "exchange": {
            "url": "https://mail.acme.test/EWS/Exchange.asmx", "username": "svc-sync",
            "password": None}},
    )
    assert status == 400 and "exchange.password" in body["error"]["message"]


@pytest.mark.parametrize(
    ("doc", "status", "fragment"),
    [
        ({"provider": "caldav", "caldav": {"url": "https://d.test/{email}/",
                                           "password_env": "ABSENCE_SYNC_SECRET_KEYS"}},
         400, "never as a variable or a file"),
        ({"provider": "caldav", "caldav": {"url": "https://d.test/{email}/",
                                           "password_file": "/etc/shadow"}},
         400, "never as a variable or a file"),
        ({"provider": "caldav", "tenant": "globex", "caldav": {"url": "https://d.test/"}},
         403, "own tenant"),
        ({"provider": "caldav", "id": "other-id", "caldav": {"url": "https://d.test/"}},
         400, "field 'id'"),
        ({"provider": "caldav", "caldav": {"url": "http://d.test/"}}, 400, "https://"),
        ({"provider": "caldav", "morning": "12:00-09:00", "caldav": {"url": "https://d.test/"}},
         400, "field 'morning'"),
        ({"provider": "outlook"}, 400, "field 'provider'"),
        ({"provider": "caldav", "caldav": {"url": "https://d.test/"}, "colour": "red"},
         400, "field 'colour'"),
        (["not", "an", "object"], 400, "JSON object"),
    ],
)
async def test_bad_documents_are_refused_and_change_nothing(
    world: World, doc: Any, status: int, fragment: str
) -> None:
    before = await world.pool.fetchval("SELECT settings::text FROM sync_configs WHERE id = $1",
                                       "acme-put")
    got, body = await world.api.call("PUT", "/syncs/{sync}", world.token("acme", "configure"),
                                     ids={"sync": "acme-put"}, json=doc)
    assert got == status, body
    assert fragment in body["error"]["message"]
    after = await world.pool.fetchval("SELECT settings::text FROM sync_configs WHERE id = $1",
                                      "acme-put")
    assert after == before


async def test_put_cannot_take_another_tenants_id(world: World) -> None:
    before = await world.pool.fetchrow("SELECT * FROM sync_configs WHERE id = 'globex-cal'")
    status, body = await world.api.call(
        "PUT", "/syncs/{sync}", world.token("acme", "configure"), ids={"sync": "globex-cal"},
        json={"provider": "caldav", "caldav": {"url": "https://evil.test/{email}/"}},
    )
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert dict(await world.pool.fetchrow(
        "SELECT * FROM sync_configs WHERE id = 'globex-cal'")) == dict(before)


async def test_put_changes_rendering_and_requeues(world: World) -> None:
    status, body = await world.api.call(
        "PUT", "/syncs/{sync}", world.token("acme", "configure"), ids={"sync": "acme-put"},
        json={"provider": "caldav", "hidden_label": "Out", "caldav": DAV},
    )
    assert status == 200, body
    assert body["configuration"]["hidden_label"] == "Out"
    await settle(world.pool, world.settings, world.calendars)
    subjects = {
        e.event.subject for e in world.calendars.memory.all()
        if e.event.mark.config_id == "acme-put"
    }
    assert subjects == {"Out"}


# ---------------------------------------------------------------- items, retry, resync


async def test_items_pages_and_failures_carry_code_and_hint(world: World) -> None:
    token = world.token("acme", "read")
    status, body = await world.api.call("GET", "/syncs/{sync}/items", token,
                                        ids={"sync": "acme-cal"}, query={"state": "failed"})
    assert status == 200
    [item] = body["items"]
    assert item["absence_id"] == "a3"
    assert (item["state"], item["code"], item["mailbox"]) == ("failed", "mailbox_not_found",
                                                               GHOST)
    assert item["employee_email"] == GHOST
    assert GHOST in item["hint"] and item["message"] and item["attempts"] == 1
    assert body["next_cursor"] is None

    seen, cursor, pages = [], None, 0
    while True:
        query = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        status, body = await world.api.call("GET", "/syncs/{sync}/items", token,
                                            ids={"sync": "acme-cal"}, query=query)
        assert status == 200
        pages += 1
        seen += [i["absence_id"] for i in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ["a0", "a1", "a2", "a3"] and pages == 4

    o365 = (await world.api.call("GET", "/syncs/{sync}/items", token, ids={"sync": "acme-o365"},
                                 query={"state": "failed"}))[1]["items"]
    assert {i["code"] for i in o365} == {"consent_missing"}
    assert all("absence-sync consent-url acme-o365" in i["hint"] for i in o365)

    for query in ({"state": "broken"}, {"limit": "0"}, {"limit": "x"}, {"cursor": "%%%"}):
        status, body = await world.api.call("GET", "/syncs/{sync}/items", token,
                                            ids={"sync": "acme-cal"}, query=query)
        assert status == 400, query


async def test_retry_requeues_failed_items(world: World) -> None:
    token = world.token("acme", "manage")
    status, body = await world.api.call("POST", "/syncs/{sync}/retry", token,
                                        ids={"sync": "acme-o365"}, json={"absence_ids": ["a1"]})
    assert (status, body) == (200, {"requeued": 1})
    row = await world.pool.fetchrow(
        "SELECT status, attempts FROM sync_items"
        " WHERE config_id = 'acme-o365' AND absence_id = 'a1'"
    )
    assert (row["status"], row["attempts"]) == ("pending", 0)
    status, body = await world.api.call("POST", "/syncs/{sync}/retry", token,
                                        ids={"sync": "acme-o365"})
    assert (status, body) == (200, {"requeued": 3})
    status, body = await world.api.call("POST", "/syncs/{sync}/retry", token,
                                        ids={"sync": "acme-o365"}, json={"absence_ids": "a1"})
    assert status == 400
    # the unknown mailbox now exists: a retry writes it
    world.calendars.unknown.clear()
    status, body = await world.api.call("POST", "/syncs/{sync}/retry", token,
                                        ids={"sync": "acme-cal"})
    assert (status, body) == (200, {"requeued": 1})
    await settle(world.pool, world.settings, world.calendars)
    body = (await world.api.call("GET", "/syncs/{sync}", token, ids={"sync": "acme-cal"}))[1]
    assert (body["health"], body["counts"]["failed"], body["counts"]["synced"]) == ("ok", 0, 4)
    assert (body["failed"], body["synced"], body["pending"]) == (0, 4, 0)


async def test_resync_dry_run_then_job_to_completion(world: World) -> None:
    token = world.token("acme", "manage")
    await world.record([
        absence("old", "jane@acme.test", start=("2026-01-05", "am"), end="2026-01-06"),
        absence("lyon", "joe@acme.test", establishment_id="lyon"),
        absence("gone", "jane@acme.test", status="cancelled"),
    ])
    await settle(world.pool, world.settings, world.calendars)

    async def dry(**body: Any) -> int:
        status, answer = await world.api.call("POST", "/syncs/{sync}/resync", token,
                                              ids={"sync": "acme-cal"},
                                              json={"dry_run": True, **body})
        assert status == 200, answer
        return int(answer["in_scope"])

    assert await dry(since="2026-12-01") == 5  # a0-a3 and lyon; not the cancelled one
    assert await dry() == 6
    assert await dry(since="2026-12-01", establishments=["lyon"]) == 1
    assert await dry(since="2027-01-01") == 0
    requests = len(world.calendars.memory.calls)
    for bad in ({"since": "01/12/2026"}, {"since": "2026-13-01"}, {"dry_run": "yes"},
                {"establishments": "paris"}, {"when": "now"}):
        status, _ = await world.api.call("POST", "/syncs/{sync}/resync", token,
                                         ids={"sync": "acme-cal"}, json=bad)
        assert status == 400, bad
    assert len(world.calendars.memory.calls) == requests  # a dry run touches nothing

    status, job = await world.api.call("POST", "/syncs/{sync}/resync", token,
                                       ids={"sync": "acme-cal"},
                                       json={"since": "2026-12-01", "force": True})
    assert status == 202, job
    assert job["job_id"] == job["id"] and job["state"] == "running"
    # one resync per configuration at a time
    status, busy = await world.api.call("POST", "/syncs/{sync}/resync", token,
                                        ids={"sync": "acme-cal"}, json={})
    assert status == 409 and job["id"] in busy["error"]["message"], busy
    async with dispatching(world.pool, world.settings, world.calendars):
        async def finished() -> bool:
            _, state = await world.api.call("GET", "/jobs/{job}", world.token("acme", "read"),
                                            ids={"job": job["id"]})
            return bool(state["state"] != "running")

        await wait_until(finished, timeout=60)
    _, done = await world.api.call("GET", "/jobs/{job}", world.token("acme", "read"),
                                   ids={"job": job["id"]})
    assert done["state"] == "done" and done["in_scope"] == done["marked"] == 5
    # forced: every marked pair written again, but the unknown mailbox fails
    assert (done["done"], done["written"], done["unchanged"], done["failed"]) == (5, 4, 0, 1)
    assert done["read"] == done["total"] >= 8 and done["finished_at"] is not None
    status, _ = await world.api.call("GET", "/jobs/{job}", world.token("globex", "configure"),
                                     ids={"job": job["id"]})
    assert status == 404


# ---------------------------------------------------------------- delete


async def test_delete_with_purge_removes_events_then_the_configuration(world: World) -> None:
    def events() -> int:
        return sum(1 for e in world.calendars.memory.all() if e.event.mark.config_id == "acme-put")

    assert events() == 3
    token = world.token("acme", "configure")
    status, body = await world.api.call("DELETE", "/syncs/{sync}", token,
                                        ids={"sync": "acme-put"}, query={"purge": "true"})
    # the 3 events; the create refused for the unknown mailbox left nothing in doubt
    assert (status, body) == (202, {"deleting": True, "events": 3})
    listed = (await world.api.call("GET", "/syncs/{sync}", token, ids={"sync": "acme-put"}))[1]
    assert listed["deleting"] is True
    async with dispatching(world.pool, world.settings, world.calendars):
        async def gone() -> bool:
            status, _ = await world.api.call("GET", "/syncs/{sync}", token,
                                             ids={"sync": "acme-put"})
            return status == 404

        await wait_until(gone, timeout=30)
    assert events() == 0
    assert await world.pool.fetchval(
        "SELECT count(*) FROM sync_items WHERE config_id = 'acme-put'") == 0
    assert await world.pool.fetchval(
        "SELECT count(*) FROM sync_log WHERE config_id = 'acme-put'") == 0
    # another configuration's events are untouched
    assert any(e.event.mark.config_id == "acme-cal" for e in world.calendars.memory.all())


async def test_delete_without_purge_leaves_events(world: World) -> None:
    token = world.token("acme", "configure")
    status, body = await world.api.call("DELETE", "/syncs/{sync}", token,
                                        ids={"sync": "acme-cal"})
    assert (status, body) == (204, None)
    assert await store.get_config(world.pool, "acme-cal") is None
    assert sum(1 for e in world.calendars.memory.all() if e.event.mark.config_id == "acme-cal")
    status, _ = await world.api.call("DELETE", "/syncs/{sync}", token, ids={"sync": "acme-cal"})
    assert status == 404
    status, _ = await world.api.call("DELETE", "/syncs/{sync}", token, ids={"sync": "acme-o365"},
                                     query={"purge": "maybe"})
    assert status == 400


# ---------------------------------------------------------------- the role x tenant matrix


@dataclass(frozen=True)
class Endpoint:
    method: str
    template: str
    role: str
    ok: int
    body: Any = None
    query: dict[str, str] | None = None


ENDPOINTS = [
    Endpoint("GET", "/syncs/{sync}", "read", 200),
    Endpoint("GET", "/syncs/{sync}/items", "read", 200, query={"state": "failed"}),
    Endpoint("POST", "/syncs/{sync}/retry", "manage", 200),
    Endpoint("POST", "/syncs/{sync}/resync", "manage", 200, {"dry_run": True}),
    Endpoint("POST", "/syncs/{sync}/resync", "manage", 202, {"since": "2026-12-01"}),
    Endpoint("GET", "/jobs/{job}", "read", 200),
    Endpoint("PUT", "/syncs/{sync}", "configure", 200, {"provider": "caldav", "caldav": DAV}),
    Endpoint("DELETE", "/syncs/{sync}", "configure", 204),
]


def expected(endpoint: Endpoint, tenant: str | None, role: str | None) -> int:
    if tenant is None or role is None:
        return 401
    if not tokens.allows(role, endpoint.role):  # type: ignore[arg-type]
        return 403
    if tenant != "acme":
        return 404
    return endpoint.ok


async def test_every_endpoint_by_role_and_tenant(world: World) -> None:
    """acme's resources, asked for with each token (two tenants, three roles), no token,
    a forged token and a revoked one: 401, 403, 404 or success, as the rules say."""
    api = world.api
    job = (await api.call("POST", "/syncs/{sync}/resync", world.token("acme", "manage"),
                          ids={"sync": "acme-cal"}, json={}))[1]
    revoked = await new_token(world.pool, "acme", "configure")
    await world.pool.execute("UPDATE api_tokens SET revoked = true WHERE hash = $1",
                             tokens.token_hash(revoked))
    callers: list[tuple[str | None, str | None, str | None]] = [
        (t, r, world.token(t, r)) for t in ("acme", "globex") for r in ROLES
    ]
    callers += [(None, None, None), (None, None, "absync_" + "A" * 43), (None, None, revoked),
                (None, None, "not-a-token")]
    failures = []
    for endpoint in ENDPOINTS:
        for tenant, role, token in callers:
            sync = "acme-put"
            # a fresh victim each time: a deletion, or a resync (one runs at a time)
            if endpoint.method == "DELETE" or endpoint.ok == 202:
                sync = f"acme-victim-{next(_cases)}"
                await store.apply_configs(world.pool, [caldav(sync)], world.box)
            status, body = await api.call(
                endpoint.method, endpoint.template, token,
                ids={"sync": sync, "job": job["id"]}, json=endpoint.body, query=endpoint.query,
            )
            want = expected(endpoint, tenant, role)
            if status != want:
                failures.append((endpoint.method, endpoint.template, tenant, role, status, want))
            if status == 404 and endpoint.method != "PUT":  # PUT of an absent id creates it
                # exactly as if absent: the same answer for an id that does not exist
                _, absent = await api.call(
                    endpoint.method, endpoint.template, token,
                    ids={"sync": "no-such-sync", "job": "no-such-job"}, json=endpoint.body,
                    query=endpoint.query,
                )
                assert body["error"]["code"] == absent["error"]["code"] == "not_found"
                assert body["error"]["message"].replace(sync, "X").replace(job["id"], "X") == \
                    absent["error"]["message"].replace("no-such-sync", "X").replace(
                        "no-such-job", "X")
    assert not failures, failures
    # the list is per tenant for every role
    for tenant in ("acme", "globex"):
        for role in ROLES:
            _, body = await api.call("GET", "/syncs", world.token(tenant, role))
            assert body["syncs"] and {s["tenant"] for s in body["syncs"]} == {tenant}
    status, _ = await api.call("GET", "/syncs", None)
    assert status == 401


async def test_openapi_describes_every_route(world: World) -> None:
    response = await world.api.client.get(PREFIX + "/openapi.json")
    assert response.status == 200
    served = await response.json()
    assert served == document()
    assert served["openapi"].startswith("3.")
    Draft202012Validator.check_schema(served["components"]["schemas"]["Sync"])
    documented = {
        (method.upper(), path)
        for path, item in served["paths"].items()
        for method in item if method != "parameters"
    }
    routed = {(method, path) for method, path, _ in ROUTES}
    assert documented == routed
    # and the app serves exactly those under /api/v1 (besides the document itself)
    app_routes = {
        (r.method, _template(r.resource.canonical))
        for r in world.api.client.app.router.routes()
        if r.resource is not None and r.resource.canonical.startswith(PREFIX)
        and r.method != "HEAD"
    }
    assert app_routes == routed | {("GET", "/openapi.json")}


# ---------------------------------------------------------------- tokens at rest


async def test_no_token_in_clear_anywhere_in_the_database(world: World) -> None:
    for token in world.tokens.values():
        await world.api.call("GET", "/syncs", token)  # last use noted
    rows = await world.pool.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    dump = []
    for row in rows:
        for record_ in await world.pool.fetch(f'SELECT t::text AS t FROM "{row["table_name"]}" t'):
            dump.append(record_["t"])
    text = "\n".join(dump)
    assert "api_tokens" in {r["table_name"] for r in rows}
    for token in world.tokens.values():
        secret = token.removeprefix(tokens.PREFIX)
        assert secret not in text
        assert secret[:16] not in text
        assert tokens.token_hash(token) in text  # what is stored instead
    used = await world.pool.fetchval(
        "SELECT count(*) FROM api_tokens WHERE last_used_at IS NOT NULL")
    assert used == len(world.tokens)


async def test_idle_database_without_workers_is_idle(pool: asyncpg.Pool, dsn: str) -> None:
    """A bare app on an empty database: an empty list, and nothing pending."""
    token = await new_token(pool, "acme", "read")
    state = WebState(Metrics(), pool, settings=admin_settings(dsn))
    async with TestClient(TestServer(create_app(state))) as client:
        api = Api(client)
        status, body = await api.call("GET", "/syncs", token)
        assert (status, body) == (200, {"syncs": []})
    assert await idle(pool)


# ---------------------------------------------------------------- team calendars


async def test_items_and_counts_show_the_target(world: World) -> None:
    """A configuration with a team calendar: its items carry their target (the
    team item of an absence whose employee mailbox does not exist is synced),
    its counts come per target, and a failing team mailbox is named as such."""
    team = "team@acme.test"
    await store.apply_configs(world.pool, [
        caldav("acme-team", team_calendar={"address": team}),  # type: ignore[arg-type]
    ], world.box)
    world.calendars.unknown.add(team)
    await settle(world.pool, world.settings, world.calendars)
    token = world.token("acme", "read")
    status, body = await world.api.call("GET", "/syncs/{sync}/items", token,
                                        ids={"sync": "acme-team"}, query={"limit": "3"})
    assert status == 200
    items = body["items"]
    cursor = body["next_cursor"]
    while cursor:
        _, more = await world.api.call("GET", "/syncs/{sync}/items", token,
                                       ids={"sync": "acme-team"},
                                       query={"limit": "3", "cursor": cursor})
        items += more["items"]
        cursor = more["next_cursor"]
    got = {(i["absence_id"], i["target"]): (i["state"], i["mailbox"]) for i in items}
    assert len(got) == len(items) == 2 * len(ACME_MAILBOXES)
    assert got[("a3", "calendar")] == ("failed", GHOST)
    assert got[("a3", "team")] == ("failed", team)
    assert got[("a0", "calendar")] == ("synced", ACME_MAILBOXES[0])
    status, sync = await world.api.call("GET", "/syncs/{sync}", token, ids={"sync": "acme-team"})
    assert status == 200
    assert sync["counts_by_target"] == {
        "calendar": {"pending": 0, "synced": 3, "failed": 1, "deleted": 0},
        "team": {"pending": 0, "synced": 0, "failed": 4, "deleted": 0},
    }
    assert sync["counts"]["failed"] == 5
    assert sync["health"] == "degraded"
    assert sync["cause"].startswith(f"The team calendar {team} cannot be written")
    assert sync["configuration"]["team_calendar"] == {"address": team}
