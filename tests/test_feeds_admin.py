"""Feed links managed as users manage them: the API (roles, tenants, OpenAPI), the
administration page, and the `absence-sync feed` commands of the console script."""

from __future__ import annotations

import itertools
import json
import re
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from consumer import feeds, store, tokens
from consumer.config import SyncConfig
from consumer.metrics import Metrics
from consumer.secrets import SecretBox
from consumer.web import WebState, create_app
from tests.admin_world import admin_settings, new_token, record
from tests.test_api import Api
from tests.test_cli import assert_clean_failure, run
from tests.test_feeds import doc
from tests.test_page import _csrf, sign_in

Client = TestClient[web.Request, web.Application]
ROLES = tokens.ROLES
DAV = {"url": "https://dav.example.com/{email}/calendar/"}
_cases = itertools.count()


@dataclass
class World:
    pool: asyncpg.Pool
    client: Client
    api: Api
    tokens: dict[tuple[str, str], str]

    def token(self, tenant: str, role: str) -> str:
        return self.tokens[(tenant, role)]


@pytest.fixture
async def world(dsn: str, pool: asyncpg.Pool) -> AsyncIterator[World]:
    await store.apply_configs(pool, [
        SyncConfig(id="acme-ics", tenant="acme", provider="ics"),
        SyncConfig(id="acme-cal", tenant="acme", provider="caldav", provider_settings=DAV),
        SyncConfig(id="globex-ics", tenant="globex", provider="ics"),
    ], SecretBox(None))
    found = {(t, r): await new_token(pool, t, r) for t in ("acme", "globex") for r in ROLES}
    state = WebState(Metrics(), pool, settings=admin_settings(dsn, public_url=None))
    async with TestClient(TestServer(create_app(state))) as client:
        yield World(pool, client, Api(client), found)


# --- the API ---------------------------------------------------------------------------


async def test_create_list_revoke_through_the_api(world: World) -> None:
    manage = world.token("acme", "manage")
    await record(world.pool, [doc("a1", email="jane@acme.test")])
    status, created = await world.api.call(
        "POST", "/syncs/{sync}/feeds", manage, ids={"sync": "acme-ics"},
        json={"employee": "Jane@Acme.test", "name": "Jane's absences"},
    )
    assert status == 201, created
    assert (created["kind"], created["employee"], created["name"], created["revoked"]) == (
        "employee", "jane@acme.test", "Jane's absences", False)
    url = urlsplit(created["url"])
    # no ABSENCE_SYNC_PUBLIC_URL: the address the request came to
    assert url.netloc == f"{world.client.server.host}:{world.client.server.port}"
    assert re.fullmatch(r"/feeds/absfeed_[A-Za-z0-9_-]{43}\.ics", url.path)
    fetched = await world.client.get(url.path)
    assert fetched.status == 200 and "SUMMARY:Absent" in await fetched.text()

    status, team = await world.api.call("POST", "/syncs/{sync}/feeds", manage,
                                        ids={"sync": "acme-ics"})
    assert status == 201 and (team["kind"], team["employee"]) == ("team", None)

    status, listed = await world.api.call("GET", "/syncs/{sync}/feeds", manage,
                                          ids={"sync": "acme-ics"})
    assert status == 200
    assert [f["id"] for f in listed["feeds"]] == [created["id"], team["id"]]
    assert "url" not in json.dumps(listed) and "absfeed_" not in json.dumps(listed)
    assert listed["feeds"][0]["last_used_at"] is not None

    status, body = await world.api.call("DELETE", "/syncs/{sync}/feeds/{feed}", manage,
                                        ids={"sync": "acme-ics", "feed": created["id"]})
    assert (status, body) == (204, None)
    assert (await world.client.get(url.path)).status == 404
    status, _ = await world.api.call("DELETE", "/syncs/{sync}/feeds/{feed}", manage,
                                     ids={"sync": "acme-ics", "feed": created["id"]})
    assert status == 204  # revoking twice is not an error
    listed = (await world.api.call("GET", "/syncs/{sync}/feeds", manage,
                                   ids={"sync": "acme-ics"}))[1]
    assert [f["revoked"] for f in listed["feeds"]] == [True, False]


async def test_rules_and_ics_through_put(world: World) -> None:
    configure = world.token("acme", "configure")
    rules = {"sick-leave": {"skip": True}, "training": {"label": "Training", "show_as": "free"}}
    status, body = await world.api.call(
        "PUT", "/syncs/{sync}", configure, ids={"sync": "acme-new"},
        json={"provider": "ics", "types": rules},
    )
    assert status == 201, body
    assert body["provider"] == "ics" and body["configuration"]["types"] == rules
    assert body["configuration"]["ics"] == {}
    status, body = await world.api.call(
        "PUT", "/syncs/{sync}", configure, ids={"sync": "acme-new"},
        json={"provider": "ics", "types": {"training": {"show_as": "away"}}},
    )
    assert status == 400
    assert "field 'types.training.show_as': must be one of" in body["error"]["message"]
    status, body = await world.api.call(
        "PUT", "/syncs/{sync}", configure, ids={"sync": "acme-new"},
        json={"provider": "ics", "ics": {"url": "https://x.example/"}},
    )
    assert status == 400 and "field 'ics.url': unknown key" in body["error"]["message"]


@pytest.mark.parametrize(
    ("sync", "body", "fragment"),
    [
        ("acme-cal", {}, "feeds are served for configurations with provider: ics"),
        ("acme-ics", {"employee": "not an address"}, "field 'employee'"),
        ("acme-ics", {"employee": 42}, "field 'employee'"),
        ("acme-ics", {"name": "n" * 256}, "field 'name'"),
        ("acme-ics", {"email": "jane@acme.test"}, "unknown field 'email'"),
        ("acme-ics", ["jane@acme.test"], "JSON object"),
    ],
)
async def test_bad_feed_requests_are_refused(
    world: World, sync: str, body: Any, fragment: str
) -> None:
    status, answer = await world.api.call("POST", "/syncs/{sync}/feeds",
                                          world.token("acme", "configure"),
                                          ids={"sync": sync}, json=body)
    assert status == 400 and fragment in answer["error"]["message"], answer
    assert await world.pool.fetchval("SELECT count(*) FROM feed_tokens") == 0


@dataclass(frozen=True)
class Endpoint:
    method: str
    template: str
    ok: int
    body: Any = None


ENDPOINTS = [
    Endpoint("GET", "/syncs/{sync}/feeds", 200),
    Endpoint("POST", "/syncs/{sync}/feeds", 201, {"employee": "jane@acme.test"}),
    Endpoint("DELETE", "/syncs/{sync}/feeds/{feed}", 204),
]


async def test_feed_endpoints_by_role_and_tenant(world: World) -> None:
    """acme's feeds asked for with each token: 401, 403 (below manage), 404 for another
    tenant exactly as for what does not exist, or success."""
    revoked = await new_token(world.pool, "acme", "configure")
    await world.pool.execute("UPDATE api_tokens SET revoked = true WHERE hash = $1",
                             tokens.token_hash(revoked))
    callers: list[tuple[str | None, str | None, str | None]] = [
        (t, r, world.token(t, r)) for t in ("acme", "globex") for r in ROLES
    ]
    callers += [(None, None, None), (None, None, "absync_" + "A" * 43), (None, None, revoked)]
    owner = world.token("acme", "manage")
    failures = []
    for endpoint in ENDPOINTS:
        for tenant, role, token in callers:
            feed = (await world.api.call("POST", "/syncs/{sync}/feeds", owner,
                                         ids={"sync": "acme-ics"}))[1]["id"]
            status, body = await world.api.call(
                endpoint.method, endpoint.template, token,
                ids={"sync": "acme-ics", "feed": feed}, json=endpoint.body,
            )
            if tenant is None or role is None:
                want = 401
            elif not tokens.allows(role, "manage"):
                want = 403
            elif tenant != "acme":
                want = 404
            else:
                want = endpoint.ok
            if status != want:
                failures.append((endpoint.method, endpoint.template, tenant, role, status, want))
            if status == 404:
                _, absent = await world.api.call(
                    endpoint.method, endpoint.template, token,
                    ids={"sync": "no-such-sync", "feed": "no-such-feed"}, json=endpoint.body,
                )
                assert body["error"]["message"].replace("acme-ics", "X") == \
                    absent["error"]["message"].replace("no-such-sync", "X")
            if tenant == "globex":  # nothing of acme's changed
                row = await world.pool.fetchrow(
                    "SELECT revoked_at FROM feed_tokens WHERE id = $1", feed)
                assert row["revoked_at"] is None
    assert not failures, failures
    assert await world.pool.fetchval(
        "SELECT count(*) FROM feed_tokens WHERE tenant = 'globex'") == 0


async def test_a_feed_of_another_configuration_cannot_be_revoked_through_this_one(
    world: World
) -> None:
    globex = world.token("globex", "manage")
    _, theirs = await world.api.call("POST", "/syncs/{sync}/feeds", globex,
                                     ids={"sync": "globex-ics"})
    status, body = await world.api.call(
        "DELETE", "/syncs/{sync}/feeds/{feed}", world.token("acme", "manage"),
        ids={"sync": "acme-ics", "feed": theirs["id"]},
    )
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert (await world.client.get(urlsplit(theirs["url"]).path)).status == 200


# --- the page ------------------------------------------------------------------------------


async def test_page_shows_feed_links_to_manage_users(world: World) -> None:
    await record(world.pool, [doc("a1", email="jane@acme.test")])
    client = world.client
    csrf = await sign_in(client, world.token("acme", "manage"))
    page = await (await client.get("/ui/syncs/acme-ics")).text()
    assert "Feed links" in page and "No feed link yet." in page
    assert 'action="/ui/syncs/acme-ics/feeds"' in page
    # a configuration that writes to a calendar has none
    assert "Feed links" not in await (await client.get("/ui/syncs/acme-cal")).text()

    created = await client.post("/ui/syncs/acme-ics/feeds",
                                data={"csrf": csrf, "employee": "jane@acme.test", "name": ""})
    assert created.status == 200
    text = await created.text()
    match = re.search(r'value="(https?://[^"]+/feeds/(absfeed_[A-Za-z0-9_-]+)\.ics)"', text)
    assert match, text[:2000]
    assert "shown only this once" in text
    token = match.group(2)
    path = urlsplit(match.group(1)).path
    assert (await client.get(path)).status == 200
    # shown once: the page itself never shows it again
    again = await (await client.get("/ui/syncs/acme-ics")).text()
    assert token not in again and "jane@acme.test" in again
    feed_id = await world.pool.fetchval("SELECT id FROM feed_tokens")
    assert feed_id in again

    bad = await client.post("/ui/syncs/acme-ics/feeds", data={"csrf": csrf, "employee": "x"})
    assert bad.status == 400 and "field &#39;employee&#39;" in await bad.text()
    forged = await client.post("/ui/syncs/acme-ics/feeds", data={"csrf": "forged" + csrf})
    assert forged.status == 403

    revoked = await client.post(f"/ui/syncs/acme-ics/feeds/{feed_id}/revoke",
                                data={"csrf": csrf}, allow_redirects=False)
    assert revoked.status == 303
    assert (await client.get(path)).status == 404
    after = await (await client.get(revoked.headers["Location"])).text()
    assert "revoked" in after


async def test_page_hides_feed_links_from_readers_and_other_tenants(world: World) -> None:
    client = world.client
    csrf = await sign_in(client, world.token("acme", "read"))
    page = await (await client.get("/ui/syncs/acme-ics")).text()
    assert "Feed links" not in page and "/feeds" not in page
    refused = await client.post("/ui/syncs/acme-ics/feeds", data={"csrf": csrf})
    assert refused.status == 403
    csrf = await sign_in(client, world.token("globex", "configure"))
    other = await client.post("/ui/syncs/acme-ics/feeds", data={"csrf": csrf})
    assert other.status == 404
    assert await world.pool.fetchval("SELECT count(*) FROM feed_tokens") == 0
    # the page's own assets and forms are unchanged by a feed section
    assert _csrf(await (await client.get("/ui/syncs/globex-ics")).text())


async def test_saving_settings_on_the_page_keeps_the_rules(world: World) -> None:
    rules = {"training": {"label": "Training", "show_as": "free"}}
    status, _ = await world.api.call("PUT", "/syncs/{sync}", world.token("acme", "configure"),
                                     ids={"sync": "acme-ics"},
                                     json={"provider": "ics", "types": rules})
    assert status == 200
    client = world.client
    csrf = await sign_in(client, world.token("acme", "configure"))
    form = {"csrf": csrf, "hidden_label": "Away", "busy_as": "busy", "free_as": "free",
            "morning": "09:00-12:30", "afternoon": "13:30-18:00", "time_zone": "UTC"}
    response = await client.post("/ui/syncs/acme-ics/settings", data=form,
                                 allow_redirects=False)
    assert response.status == 303, await response.text()
    stored = await store.get_config(world.pool, "acme-ics")
    assert stored is not None and stored.config.hidden_label == "Away"
    assert stored.config.public_dict()["types"] == rules


# --- the console script -----------------------------------------------------------------------


def _syncs_file(tmp_path: Path) -> Path:
    path = tmp_path / "syncs.yaml"
    path.write_text(textwrap.dedent("""
        syncs:
          - id: acme-feed
            tenant: acme
            provider: ics
            category: Absence
            types:
              sick-leave: {skip: true}
              training:   {label: "Training", show_as: free}
              remote:     {show_as: workingElsewhere, sync_pending: false, private: false}
          - id: acme-dav
            tenant: acme
            provider: caldav
            caldav:
              url: "https://dav.example.com/{email}/calendar/"
        """), encoding="utf-8")
    return path


async def test_feed_commands_of_the_console_script(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    public = {"ABSENCE_SYNC_PUBLIC_URL": "https://sync.vendor.example/"}
    applied = run(dsn, "config", "apply", "-f", str(_syncs_file(tmp_path)))
    assert applied.returncode == 0, applied.stderr
    shown = json.loads(run(dsn, "config", "show", "acme-feed").stdout)
    assert shown["types"]["training"] == {"label": "Training", "show_as": "free"}
    assert shown["provider"] == "ics"

    created = run(dsn, "feed", "create", "--config", "acme-feed", "--employee",
                  "Jane@Acme.test", **public)
    assert created.returncode == 0, created.stderr
    lines = created.stdout.strip().splitlines()
    url = lines[-1]
    assert re.fullmatch(r"https://sync\.vendor\.example/feeds/absfeed_[A-Za-z0-9_-]{43}\.ics",
                        url), url
    assert url not in "\n".join(lines[:-1])  # printed once, alone on its line
    feed_id = lines[0].split()[2]
    assert "jane@acme.test" in lines[0]

    team = run(dsn, "feed", "create", "--config", "acme-feed", "--name", "Team Paris")
    assert team.returncode == 0, team.stderr
    assert "ABSENCE_SYNC_PUBLIC_URL is not set" in team.stderr
    team_url = team.stdout.strip().splitlines()[-1]
    assert team_url.startswith("http://localhost:8080/feeds/absfeed_")

    listed = run(dsn, "feed", "list", "--config", "acme-feed")
    assert listed.returncode == 0, listed.stderr
    assert feed_id in listed.stdout and "jane@acme.test" in listed.stdout
    assert "Team Paris" in listed.stdout and "absfeed_" not in listed.stdout
    as_json = json.loads(run(dsn, "feed", "list", "--config", "acme-feed", "--json").stdout)
    assert [(f["kind"], f["employee"]) for f in as_json] == [
        ("employee", "jane@acme.test"), ("team", None)]

    await record(pool, [doc("a1", email="jane@acme.test"),
                        doc("a2", email="jane@acme.test", account="sick-leave")])
    state = WebState(Metrics(), pool)
    async with TestClient(TestServer(create_app(state))) as client:
        path = urlsplit(url).path
        response = await client.get(path)
        assert response.status == 200
        body = await response.text()
        assert body.count("BEGIN:VEVENT") == 1 and "CATEGORIES:Absence" in body

        revoked = run(dsn, "feed", "revoke", feed_id)
        assert revoked.returncode == 0, revoked.stderr
        assert (await client.get(path)).status == 404
        assert (await client.get(urlsplit(team_url).path)).status == 200
        by_url = run(dsn, "feed", "revoke", team_url)
        assert by_url.returncode == 0, by_url.stderr
        assert (await client.get(urlsplit(team_url).path)).status == 404
    assert run(dsn, "feed", "list", "--config", "acme-feed").stdout.count("(revoked)") == 2

    token = feeds.token_of(url)
    assert token is not None
    stored = "\n".join(str(dict(r)) for r in await pool.fetch("SELECT * FROM feed_tokens"))
    assert token.removeprefix(feeds.TOKEN_PREFIX) not in stored


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (("feed", "create", "--config", "nope"), 1, "no configuration with id 'nope'"),
        (("feed", "create", "--config", "acme-dav"), 2, "provider: ics"),
        (("feed", "create", "--config", "acme-feed", "--employee", "jane"), 2, "--employee"),
        (("feed", "list", "--config", "nope"), 1, "no configuration"),
        (("feed", "revoke", "nope"), 1, "no such feed with id 'nope'"),
        (("feed", "revoke", "https://x.example/feeds/absfeed_" + "A" * 43 + ".ics"), 1,
         "no such feed"),
    ],
)
def test_feed_commands_refuse_clearly(
    dsn: str, tmp_path: Path, args: tuple[str, ...], code: int, fragment: str
) -> None:
    assert run(dsn, "config", "apply", "-f", str(_syncs_file(tmp_path))).returncode == 0
    done = run(dsn, *args)
    assert_clean_failure(done, code)
    assert fragment in done.stderr, done.stderr
