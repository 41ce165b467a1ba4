"""Microsoft 365 admin consent: `consent-url` then the redirect (docs/microsoft365.md).

The callback records a directory only when the redirect reports an
administrator's consent for a directory GUID, the state is one `consent-url`
issued, no other tenant's configuration uses the directory, and the vendor
application obtains a token for it from the (HTTPS test double of the) login
service.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from consumer import store
from consumer.config import SyncConfig
from consumer.events import parse_event
from consumer.metrics import Metrics
from consumer.providers.base import make_ssl_context
from consumer.providers.microsoft365 import confirm_consent
from consumer.secrets import SecretBox
from consumer.settings import Settings
from consumer.web import WebState, create_app
from tests.conftest import event
from tests.graph_server import GraphServer

SCRIPT = Path(sys.executable).parent / "absence-sync"
DIRECTORY = "6f1c2a3b-0000-4000-8000-00000000beef"
OTHER_DIRECTORY = "7a2b3c4d-0000-4000-8000-0000000cafe0"
CALLBACK = "/consent/microsoft365/callback"
Client = TestClient[web.Request, web.Application]


def consent_url(dsn: str, config_id: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSENCE_SYNC_")}
    env.update({
        "ABSENCE_SYNC_DATABASE_URL": dsn,
        "ABSENCE_SYNC_MS_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
        "ABSENCE_SYNC_PUBLIC_URL": "https://sync.vendor.example",
    })
    return subprocess.run(
        [str(SCRIPT), "consent-url", config_id], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )


@pytest.fixture(scope="module")
async def graph(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GraphServer]:
    server = GraphServer()
    server.add_tenant(DIRECTORY)
    server.add_tenant(OTHER_DIRECTORY, consented=False)
    await server.start(tmp_path_factory.mktemp("graph-consent"))
    yield server
    await server.stop()


@pytest.fixture
async def client(pool: asyncpg.Pool, graph: GraphServer) -> AsyncIterator[Client]:
    settings = Settings(
        ms_client_id=graph.client_id, ms_client_secret=graph.client_secret,
        ms_authority_host=graph.authority_host, ms_graph_url=graph.graph_url,
        ca_bundle=graph.ca_path, request_timeout_seconds=5,
    )
    confirm = functools.partial(confirm_consent, settings, make_ssl_context(settings),
                                delays=(0.05, 0.05))
    app = create_app(WebState(Metrics(), pool, confirm_consent=confirm))
    async with TestClient(TestServer(app)) as c:
        yield c


async def _setup(pool: asyncpg.Pool, config_id: str = "acme-o365", tenant: str = "acme") -> str:
    """A configuration whose item failed for want of consent, and a consent state."""
    config = SyncConfig(id=config_id, tenant=tenant, provider="microsoft365")
    await store.apply_configs(pool, [config], SecretBox(None))
    parsed = parse_event(json.dumps(event(f"abs-{config_id}", 1, tenant=tenant)).encode())
    async with pool.acquire() as conn, conn.transaction():
        await store.record_absences(conn, [store.Incoming(parsed.absence, parsed.data, None)])
    await pool.execute(
        "UPDATE sync_items SET status = 'failed', done_seq = change_seq,"
        " last_error_code = 'consent_missing' WHERE config_id = $1", config_id,
    )
    state = f"state-of-{config_id}-0123456789"
    await store.new_consent_state(pool, config_id, state)
    return state


async def callback(client: Client, **params: str) -> tuple[int, str]:
    response = await client.get(CALLBACK, params=params)
    return response.status, await response.text()


async def granted(pool: asyncpg.Pool, config_id: str = "acme-o365") -> str | None:
    stored = await store.get_config(pool, config_id)
    assert stored is not None
    return stored.granted_tenant_id


async def test_consent_flow_records_directory_and_requeues(
    dsn: str, pool: asyncpg.Pool, client: Client, graph: GraphServer
) -> None:
    await _setup(pool)
    result = consent_url(dsn, "acme-o365")
    assert result.returncode == 0, result.stderr
    url = urlsplit(result.stdout.strip())
    query = parse_qs(url.query)
    assert url.path == "/organizations/v2.0/adminconsent"
    assert query["client_id"] == ["11111111-2222-3333-4444-555555555555"]
    assert query["redirect_uri"] == [
        "https://sync.vendor.example/consent/microsoft365/callback"
    ]
    state = query["state"][0]
    assert len(state) >= 20

    status, _ = await callback(client, admin_consent="True", tenant=DIRECTORY, state="forged")
    assert status == 400
    assert await granted(pool) is None

    before = graph.token_requests_for(DIRECTORY)
    status, page = await callback(client, admin_consent="True", tenant=DIRECTORY, state=state)
    assert status == 200, page
    assert "acme-o365" in page
    assert graph.token_requests_for(DIRECTORY) == before + 1  # a token was obtained
    stored = await store.get_config(pool, "acme-o365")
    assert stored is not None and stored.granted_tenant_id == DIRECTORY
    assert stored.config.provider_settings["tenant_id"] == DIRECTORY
    row = await pool.fetchrow("SELECT status, change_seq, done_seq FROM sync_items")
    assert row["status"] == "pending" and row["change_seq"] > row["done_seq"]

    status, _ = await callback(client, admin_consent="True", tenant=DIRECTORY, state=state)
    assert status == 400  # a state is used once
    assert await granted(pool) == DIRECTORY


REFUSED: list[tuple[str, dict[str, str], int, str]] = [
    ("no admin_consent", {"tenant": DIRECTORY}, 400, "admin_consent=True"),
    ("admin_consent False", {"tenant": DIRECTORY, "admin_consent": "False"}, 400,
     "admin_consent=True"),
    ("a domain, not a GUID", {"tenant": "acme.onmicrosoft.com", "admin_consent": "True"}, 400,
     "not a directory (tenant) GUID"),
    ("organizations", {"tenant": "organizations", "admin_consent": "True"}, 400, "GUID"),
    ("not consented in the directory", {"tenant": OTHER_DIRECTORY, "admin_consent": "True"},
     403, "no access token for directory"),
    ("a directory that does not exist",
     {"tenant": "0000dead-0000-4000-8000-00000000dead", "admin_consent": "True"}, 403,
     "no access token"),
]


@pytest.mark.parametrize(("params", "status", "words"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
async def test_unconfirmed_consent_is_not_recorded(
    pool: asyncpg.Pool, client: Client, params: dict[str, str], status: int, words: str
) -> None:
    state = await _setup(pool)
    got, page = await callback(client, **params, state=state)
    assert (got, words in page) == (status, True), page
    assert await granted(pool) is None
    # the state is still good: the administrator may try again
    assert await store.consent_request(pool, state) is not None


async def test_consent_confirmed_once_the_login_service_has_caught_up(
    pool: asyncpg.Pool, client: Client, graph: GraphServer
) -> None:
    """Right after consent, Entra may answer 'not consented' for a few seconds."""
    state = await _setup(pool)
    graph.script_token(DIRECTORY, 400, {
        "error": "unauthorized_client", "error_codes": [700016],
        "error_description": "AADSTS700016: Application not found in the directory.",
    })
    status, page = await callback(client, admin_consent="True", tenant=DIRECTORY, state=state)
    assert status == 200, page
    assert await granted(pool) == DIRECTORY


@pytest.mark.parametrize("how", ["granted", "in its file"])
async def test_directory_of_another_tenant_is_refused(
    pool: asyncpg.Pool, client: Client, how: str
) -> None:
    if how == "granted":
        other_state = await _setup(pool, "globex-o365", "globex")
        status, _ = await callback(client, admin_consent="True", tenant=DIRECTORY,
                                   state=other_state)
        assert status == 200
    else:
        await store.apply_configs(pool, [SyncConfig(
            id="globex-o365", tenant="globex", provider="microsoft365",
            provider_settings={"tenant_id": DIRECTORY.upper()},
        )], SecretBox(None))
    state = await _setup(pool)
    status, page = await callback(client, admin_consent="True", tenant=DIRECTORY, state=state)
    assert status == 409
    assert "already linked to another customer" in page
    assert "globex" not in page  # nothing of the other customer is shown
    assert await granted(pool) is None
    # a second configuration of the same tenant may use the directory
    await _setup(pool, "globex-o365-b", "globex")
    status, _ = await callback(client, admin_consent="True", tenant=DIRECTORY,
                               state="state-of-globex-o365-b-0123456789")
    assert status == 200
    assert await granted(pool, "globex-o365-b") == DIRECTORY


async def test_grant_refuses_a_directory_bound_meanwhile(pool: asyncpg.Pool) -> None:
    """The check holds inside the recording transaction too (two callbacks at once)."""
    state = await _setup(pool)
    await store.apply_configs(pool, [SyncConfig(
        id="globex-o365", tenant="globex", provider="microsoft365",
        provider_settings={"tenant_id": DIRECTORY},
    )], SecretBox(None))
    with pytest.raises(store.ConflictError):
        await store.grant_consent(pool, state, DIRECTORY)
    assert await granted(pool) is None
    assert await store.consent_request(pool, state) is not None


async def test_without_a_microsoft_application_nothing_is_recorded(pool: asyncpg.Pool) -> None:
    state = await _setup(pool)
    app = create_app(WebState(Metrics(), pool))
    async with TestClient(TestServer(app)) as plain:
        status, page = await callback(plain, admin_consent="True", tenant=DIRECTORY, state=state)
    assert status == 503 and "ABSENCE_SYNC_MS_CLIENT_ID" in page
    assert await granted(pool) is None


async def test_consent_refused_is_reported(client: Client) -> None:
    response = await client.get(
        CALLBACK, params={"error": "access_denied", "error_description": "AADSTS65004: declined"},
    )
    assert response.status == 400
    assert "AADSTS65004" in await response.text()


def test_consent_url_for_unknown_or_wrong_config(dsn: str) -> None:
    result = consent_url(dsn, "nope")
    assert result.returncode != 0
    assert "nope" in result.stderr and "Traceback" not in result.stderr
