"""The administration page over plain HTTP: sessions, CSRF, roles, tenants, assets.
(The browser test drives the same page in Chromium.)"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from consumer import store
from consumer.config import SyncConfig
from consumer.metrics import Metrics
from consumer.secrets import SecretBox
from consumer.web import WebState, create_app
from consumer.web.page import CSRF_COOKIE, SESSION_COOKIE
from tests.admin_world import Calendars, absence, admin_settings, new_token, record, settle

Client = TestClient[web.Request, web.Application]
DAV = {"url": "https://dav.example.com/{email}/calendar/"}


@pytest.fixture
async def client(dsn: str, pool: asyncpg.Pool) -> AsyncIterator[Client]:
    settings = admin_settings(dsn, public_url=None)
    await store.apply_configs(pool, [
        SyncConfig(id="acme-cal", tenant="acme", provider="caldav", provider_settings=DAV),
        SyncConfig(id="globex-cal", tenant="globex", provider="caldav", provider_settings=DAV),
    ], SecretBox(None))
    await record(pool, [absence("a1", "jane@acme.test"), absence("a2", "ghost@acme.test")])
    await settle(pool, settings, Calendars(settings, unknown={"ghost@acme.test"}))
    state = WebState(Metrics(), pool, settings=settings)
    async with TestClient(TestServer(create_app(state))) as c:
        yield c


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html[:500]
    return match.group(1)


async def sign_in(client: Client, token: str, **headers: str) -> str:
    """Signs in like the form does; returns the page's CSRF token."""
    page = await client.get("/")
    csrf = _csrf(await page.text())
    response = await client.post("/ui/signin", data={"token": token, "csrf": csrf},
                                 allow_redirects=False, headers=headers)
    assert response.status == 303, await response.text()
    return csrf


async def test_sign_in_sets_a_strict_http_only_cookie(client: Client, pool: asyncpg.Pool) -> None:
    token = await new_token(pool, "acme", "read")
    page = await client.get("/")
    assert page.status == 200 and "API token" in await page.text()
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    csrf = _csrf(await page.text())
    set_csrf = page.headers["Set-Cookie"]
    assert CSRF_COOKIE in set_csrf and "HttpOnly" in set_csrf and "SameSite=Strict" in set_csrf

    wrong = await client.post("/ui/signin", data={"token": "absync_" + "x" * 43, "csrf": csrf})
    assert wrong.status == 401 and "unknown or revoked" in await wrong.text()

    response = await client.post("/ui/signin", data={"token": token, "csrf": csrf},
                                 allow_redirects=False)
    assert response.status == 303
    cookie = response.cookies[SESSION_COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and not cookie["secure"]
    assert cookie.value == token
    home = await client.get("/")
    text = await home.text()
    assert "acme-cal" in text and "globex-cal" not in text
    assert "Degraded" in text and "ghost@acme.test" in text
    assert token not in text  # the page never shows the token


async def test_cookie_is_secure_behind_https(client: Client, pool: asyncpg.Pool) -> None:
    token = await new_token(pool, "acme", "read")
    page = await client.get("/")
    response = await client.post(
        "/ui/signin", data={"token": token, "csrf": _csrf(await page.text())},
        allow_redirects=False, headers={"X-Forwarded-Proto": "https"},
    )
    assert response.cookies[SESSION_COOKIE]["secure"]


async def test_forms_need_the_csrf_token_and_this_origin(client: Client,
                                                         pool: asyncpg.Pool) -> None:
    token = await new_token(pool, "acme", "manage")
    csrf = await sign_in(client, token)
    url = "/ui/syncs/acme-cal/retry"
    for data, headers in [
        ({}, {}),
        ({"csrf": "forged-" + csrf[7:]}, {}),
        ({"csrf": csrf}, {"Origin": "https://evil.example"}),
        ({"csrf": csrf}, {"Origin": "null"}),
    ]:
        response = await client.post(url, data=data, headers=headers, allow_redirects=False)
        assert response.status == 403, (data, headers)
    failed = await pool.fetchval("SELECT count(*) FROM sync_items WHERE status = 'failed'")
    assert failed == 1  # nothing was retried

    origin = f"http://{client.server.host}:{client.server.port}"
    response = await client.post(url, data={"csrf": csrf}, headers={"Origin": origin},
                                 allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"] == "/ui/syncs/acme-cal?requeued=1"
    page = await client.get(response.headers["Location"])
    assert "Re-queued 1 failed absence(s)" in await page.text()


async def test_roles_and_tenants_on_the_page(client: Client, pool: asyncpg.Pool) -> None:
    reader = await new_token(pool, "acme", "read")
    csrf = await sign_in(client, reader)
    page = await (await client.get("/ui/syncs/acme-cal")).text()
    assert "mailbox_not_found" in page and "ghost@acme.test" in page
    assert "Retry failed absences" not in page and "Count events" not in page
    assert "Save settings" not in page
    response = await client.post("/ui/syncs/acme-cal/retry", data={"csrf": csrf},
                                 allow_redirects=False)
    assert response.status == 403
    other = await client.get("/ui/syncs/globex-cal")
    absent = await client.get("/ui/syncs/nothing-here")
    assert other.status == absent.status == 404

    configurer = await new_token(pool, "acme", "configure")
    csrf = await sign_in(client, configurer)
    page = await (await client.get("/ui/syncs/acme-cal")).text()
    assert "Retry failed absences" in page and "Save settings" in page


async def test_signed_out_and_revoked_sessions_go_to_sign_in(client: Client,
                                                             pool: asyncpg.Pool) -> None:
    response = await client.get("/ui/syncs/acme-cal", allow_redirects=False)
    assert (response.status, response.headers["Location"]) == (303, "/")
    token = await new_token(pool, "acme", "read")
    csrf = await sign_in(client, token)
    assert (await client.get("/ui/syncs/acme-cal")).status == 200
    await pool.execute("UPDATE api_tokens SET revoked = true")
    response = await client.get("/ui/syncs/acme-cal", allow_redirects=False)
    assert response.status == 303
    token = await new_token(pool, "acme", "read")
    csrf = await sign_in(client, token)
    response = await client.post("/ui/signout", data={"csrf": csrf}, allow_redirects=False)
    assert response.status == 303
    assert (await client.get("/ui/syncs/acme-cal", allow_redirects=False)).status == 303


async def test_settings_form_validates_and_saves(client: Client, pool: asyncpg.Pool) -> None:
    csrf = await sign_in(client, await new_token(pool, "acme", "configure"))
    form = {"csrf": csrf, "hidden_label": "Away", "busy_as": "oof", "free_as": "free",
            "morning": "08:00-12:00", "afternoon": "13:00-17:00", "time_zone": "Europe/Paris",
            "hide_labels": "1", "sync_pending": "1", "establishments": "paris, lyon",
            "p.url": "https://dav2.example.com/{email}/"}
    bad = await client.post("/ui/syncs/acme-cal/settings",
                            data={**form, "morning": "12:00-08:00"})
    assert bad.status == 400 and "ends before it starts" in await bad.text()
    response = await client.post("/ui/syncs/acme-cal/settings", data=form,
                                 allow_redirects=False)
    assert response.status == 303, await response.text()
    stored = await store.get_config(pool, "acme-cal")
    assert stored is not None
    config = stored.config
    assert (config.hidden_label, config.busy_as, config.morning, config.time_zone) == (
        "Away", "oof", "08:00-12:00", "Europe/Paris")
    assert config.establishments == ["paris", "lyon"] and config.private is False
    assert config.provider_settings["url"] == "https://dav2.example.com/{email}/"


async def test_static_assets_come_from_the_worker(client: Client) -> None:
    for name, kind in (("app.css", "text/css"), ("app.js", "javascript")):
        response = await client.get(f"/ui/static/{name}")
        assert response.status == 200 and kind in response.headers["Content-Type"]
    page = await (await client.get("/")).text()
    assert "http://" not in page and "https://" not in page  # no CDN, nothing external


async def test_the_team_calendar_on_the_page_and_kept_by_the_settings_form(
    client: Client, pool: asyncpg.Pool, dsn: str
) -> None:
    """The page names the team calendar and marks its failed items as such; saving
    the settings form keeps it (the form has no field for it)."""
    team = "team@acme.test"
    settings = admin_settings(dsn, public_url=None)
    await store.apply_configs(pool, [SyncConfig(
        id="acme-team", tenant="acme", provider="caldav", provider_settings=DAV,
        team_calendar={"address": team},  # type: ignore[arg-type]
    )], SecretBox(None))
    await settle(pool, settings, Calendars(settings, unknown={"ghost@acme.test", team}))
    csrf = await sign_in(client, await new_token(pool, "acme", "configure"))
    page = await (await client.get("/ui/syncs/acme-team")).text()
    assert f"team calendar {team}" in page
    assert f"team calendar: {team}" in page  # the failed team items
    assert "The team calendar team@acme.test cannot be written" in page
    form = {"csrf": csrf, "hidden_label": "Away", "busy_as": "busy", "free_as": "free",
            "morning": "09:00-12:30", "afternoon": "13:30-18:00", "time_zone": "UTC",
            "hide_labels": "1", "sync_pending": "1", "establishments": ""}
    response = await client.post("/ui/syncs/acme-team/settings", data=form,
                                 allow_redirects=False)
    assert response.status == 303, await response.text()
    stored = await store.get_config(pool, "acme-team")
    assert stored is not None and stored.config.hidden_label == "Away"
    assert stored.config.team_calendar is not None
    assert stored.config.team_calendar.address == team


# --- Test connection ---------------------------------------------------------------


async def test_test_connection_button_reaches_the_calendar_and_shows_the_outcome(
    dsn: str, pool: asyncpg.Pool, tmp_path: object
) -> None:
    """The button runs `config test`'s probe (the real Microsoft 365 provider against
    the Graph test server): ok, or the error code, message and hint; writes nothing."""
    from pathlib import Path

    from tests.graph_server import GraphServer

    assert isinstance(tmp_path, Path)
    directory = "2b3c4d5e-0000-4000-8000-0000000000aa"
    graph = GraphServer()
    graph.add_tenant(directory)
    graph.add_mailbox("jane@acme.test")
    await graph.start(tmp_path)
    try:
        settings = admin_settings(
            dsn, public_url=None, ms_client_id=graph.client_id,
            ms_client_secret=graph.client_secret,
            ms_authority_host=graph.authority_host, ms_graph_url=graph.graph_url,
            ca_bundle=graph.ca_path,
        )
        await store.apply_configs(pool, [SyncConfig(
            id="acme-o365", tenant="acme", provider="microsoft365",
            provider_settings={"tenant_id": directory},
        )], SecretBox(None))
        async with TestClient(TestServer(create_app(WebState(Metrics(), pool,
                                                              settings=settings)))) as client:
            reader = await new_token(pool, "acme", "read")
            await sign_in(client, reader)
            page = await (await client.get("/ui/syncs/acme-o365")).text()
            assert "Test connection" not in page  # configure role only
            forbidden = await client.post("/ui/syncs/acme-o365/test", data={"csrf": "x" * 43},
                                          headers={"Accept": "application/json"})
            assert forbidden.status == 403

            csrf = await sign_in(client, await new_token(pool, "acme", "configure"))
            page = await (await client.get("/ui/syncs/acme-o365")).text()
            assert 'id="test-button"' in page and "Test connection" in page
            ok = await client.post("/ui/syncs/acme-o365/test",
                                   data={"csrf": csrf, "mailbox": "Jane@acme.test"},
                                   headers={"Accept": "application/json"})
            assert ok.status == 200
            assert await ok.json() == {"ok": True, "provider": "microsoft365",
                                       "mailbox": "jane@acme.test", "code": None,
                                       "message": None, "hint": None}
            failed = await client.post("/ui/syncs/acme-o365/test",
                                       data={"csrf": csrf, "mailbox": "nobody@acme.test"},
                                       headers={"Accept": "application/json"})
            doc = await failed.json()
            assert doc["ok"] is False and doc["code"] == "mailbox_not_found"
            assert doc["message"] and "nobody@acme.test" in doc["hint"]
            # without JavaScript: the page comes back with the answer
            html = await client.post("/ui/syncs/acme-o365/test",
                                     data={"csrf": csrf, "mailbox": "nobody@acme.test"})
            text = await html.text()
            assert html.status == 200 and "<code>mailbox_not_found</code>" in text
            # no mailbox given and none known yet: said so
            none = await client.post("/ui/syncs/acme-o365/test", data={"csrf": csrf},
                                     headers={"Accept": "application/json"})
            assert none.status == 400 and "no mailbox" in (await none.json())["error"]["message"]
            stale = await client.post("/ui/syncs/acme-o365/test",
                                      data={"csrf": "y" * 43, "mailbox": "jane@acme.test"})
            assert stale.status == 403  # CSRF
        assert all(r.method == "GET" for r in graph.requests if r.mailbox)
        assert not graph.events.get("jane@acme.test")
    finally:
        await graph.stop()
