"""Microsoft 365 admin consent: `consent-url` then the redirect (SPEC section 6)."""

from __future__ import annotations

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
from consumer.metrics import Metrics
from consumer.secrets import SecretBox
from consumer.web import WebState, create_app
from tests.conftest import event

SCRIPT = Path(sys.executable).parent / "absence-sync"
DIRECTORY = "6f1c2a3b-0000-4000-8000-00000000beef"


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


@pytest.fixture
async def client(pool: asyncpg.Pool) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    changes: list[int] = []
    app = create_app(WebState(Metrics(), pool, on_change=lambda: changes.append(1)))
    async with TestClient(TestServer(app)) as c:
        yield c


async def _setup(pool: asyncpg.Pool) -> None:
    config = SyncConfig(id="acme-o365", tenant="acme", provider="microsoft365")
    await store.apply_configs(pool, [config], SecretBox(None))
    import json

    from consumer.events import parse_event

    parsed = parse_event(json.dumps(event("abs-1", 1)).encode())
    async with pool.acquire() as conn, conn.transaction():
        await store.record_absences(conn, [store.Incoming(parsed.absence, parsed.data, None)])
    # the dispatcher found no consent: the item failed permanently
    await pool.execute(
        "UPDATE sync_items SET status = 'failed', done_seq = change_seq,"
        " last_error_code = 'consent_missing'"
    )


async def test_consent_flow_records_directory_and_requeues(
    dsn: str, pool: asyncpg.Pool, client: TestClient[web.Request, web.Application]
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

    bad = await client.get(
        "/consent/microsoft365/callback",
        params={"admin_consent": "True", "tenant": DIRECTORY, "state": "forged"},
    )
    assert bad.status == 400
    assert await pool.fetchval("SELECT granted_tenant_id FROM sync_configs") is None

    ok = await client.get(
        "/consent/microsoft365/callback",
        params={"admin_consent": "True", "tenant": DIRECTORY, "state": state},
    )
    assert ok.status == 200
    assert "acme-o365" in await ok.text()
    stored = await store.get_config(pool, "acme-o365")
    assert stored is not None and stored.granted_tenant_id == DIRECTORY
    assert stored.config.provider_settings["tenant_id"] == DIRECTORY
    row = await pool.fetchrow("SELECT status, change_seq, done_seq FROM sync_items")
    assert row["status"] == "pending" and row["change_seq"] > row["done_seq"]

    replay = await client.get(
        "/consent/microsoft365/callback",
        params={"admin_consent": "True", "tenant": "someone-else", "state": state},
    )
    assert replay.status == 400  # a state is used once
    assert (await store.get_config(pool, "acme-o365")).granted_tenant_id == DIRECTORY  # type: ignore[union-attr]


async def test_consent_refused_is_reported(
    pool: asyncpg.Pool, client: TestClient[web.Request, web.Application]
) -> None:
    response = await client.get(
        "/consent/microsoft365/callback",
        params={"error": "access_denied", "error_description": "AADSTS65004: declined"},
    )
    assert response.status == 400
    assert "AADSTS65004" in await response.text()


def test_consent_url_for_unknown_or_wrong_config(dsn: str) -> None:
    result = consent_url(dsn, "nope")
    assert result.returncode != 0
    assert "nope" in result.stderr and "Traceback" not in result.stderr
