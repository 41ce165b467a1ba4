"""End to end, as an operator and a customer administrator meet the product:
`absence-sync token create` and `config apply`, then the API of a live
`absence-sync run` writing to the HTTPS Graph double."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from consumer.settings import Settings
from tests.conftest import Publisher, event, settings_env, wait_until
from tests.graph_server import GraphServer

SCRIPT = Path(sys.executable).parent / "absence-sync"
DIRECTORY = "5a1b2c3d-0000-4000-8000-0000000ad210"


@pytest.fixture
async def graph(tmp_path: Path) -> AsyncIterator[GraphServer]:
    server = GraphServer()
    server.add_tenant(DIRECTORY)
    await server.start(tmp_path)
    yield server
    await server.stop()


def environment(settings: Settings, graph: GraphServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSENCE_SYNC_")}
    assert graph.ca_path is not None
    env.update(settings_env(settings))
    env.update({
        "ABSENCE_SYNC_MS_CLIENT_ID": graph.client_id,
        "ABSENCE_SYNC_MS_CLIENT_SECRET": graph.client_secret,
        "ABSENCE_SYNC_MS_AUTHORITY_HOST": graph.authority_host,
        "ABSENCE_SYNC_MS_GRAPH_URL": graph.graph_url,
        "ABSENCE_SYNC_CA_BUNDLE": str(graph.ca_path),
        "ABSENCE_SYNC_PUBLIC_URL": "https://sync.vendor.example",
        "ABSENCE_SYNC_LOG_FORMAT": "json",
    })
    return env


async def run_cli(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(SCRIPT), *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, f"absence-sync {' '.join(args)}: {err.decode()}"
    return out.decode()


def http_port(log: Path) -> int | None:
    for line in log.read_text(errors="replace").splitlines():
        if '"worker started"' in line:
            return int(json.loads(line)["http_port"])
    return None


async def test_a_live_worker_through_tokens_made_by_the_cli(
    settings: Settings, publisher: Publisher, graph: GraphServer, tmp_path: Path
) -> None:
    env = environment(settings, graph)
    mailboxes = [graph.add_mailbox(f"e2e-{n}@globex.test") for n in range(4)]
    ghosts = ["e2e-ghost-1@globex.test"]
    syncs = tmp_path / "syncs.yaml"
    syncs.write_text(textwrap.dedent(f"""
        syncs:
          - id: acme-o365
            tenant: acme
            provider: microsoft365
          - id: globex-o365
            tenant: globex
            provider: microsoft365
            microsoft365:
              tenant_id: {DIRECTORY}
    """))
    await run_cli(env, "migrate")
    await run_cli(env, "config", "apply", "-f", str(syncs))
    made = {}
    for tenant, role in [("acme", "read"), ("acme", "manage"), ("globex", "read")]:
        out = await run_cli(env, "token", "create", "--tenant", tenant, "--role", role)
        made[(tenant, role)] = out.strip().splitlines()[-1]

    for n, box in enumerate(mailboxes + ghosts):
        await publisher.send(event(f"g{n}", 1, tenant="globex", email=box))
    for n in range(3):
        await publisher.send(event(f"a{n}", 1, tenant="acme", email=f"p{n}@acme.test"))
    await publisher.flush()

    log = tmp_path / "worker.log"
    with log.open("wb") as sink:
        worker = subprocess.Popen([str(SCRIPT), "run"], env={**env, "ABSENCE_SYNC_HTTP_PORT": "0"},
                                  stdout=sink, stderr=subprocess.STDOUT)
    try:
        async def started() -> bool:
            assert worker.poll() is None, log.read_text()
            return http_port(log) is not None

        await wait_until(started, timeout=60)
        base = f"http://127.0.0.1:{http_port(log)}/api/v1"
        assert settings.database_url

        async def settled() -> bool:
            conn = await asyncpg.connect(settings.database_url)
            try:
                return bool(await conn.fetchval(
                    "SELECT count(*) = 8 AND count(*) FILTER (WHERE change_seq > done_seq) = 0"
                    " FROM sync_items"))
            finally:
                await conn.close()

        await wait_until(settled, timeout=60)

        async with aiohttp.ClientSession() as http:
            async def call(method: str, path: str, token: str | None,
                           body: Any = None) -> tuple[int, Any]:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with http.request(method, base + path, headers=headers,
                                        json=body) as response:
                    return response.status, await response.json()

            status, acme = await call("GET", "/syncs", made[("acme", "read")])
            assert status == 200
            [o365] = acme["syncs"]
            assert (o365["id"], o365["health"]) == ("acme-o365", "failing")
            assert o365["cause"].startswith("An administrator must grant consent: https://")
            assert "sync.vendor.example%2Fconsent%2Fmicrosoft365%2Fcallback" in o365["cause"]

            status, globex = await call("GET", "/syncs", made[("globex", "read")])
            [g365] = globex["syncs"]
            assert (g365["id"], g365["health"]) == ("globex-o365", "degraded")
            assert ghosts[0] in g365["cause"] and "e-mail addresses" in g365["cause"]
            assert g365["counts"]["synced"] == 4 and g365["counts"]["failed"] == 1

            _, items = await call("GET", "/syncs/globex-o365/items?state=failed",
                                  made[("globex", "read")])
            [ghost] = items["items"]
            assert (ghost["code"], ghost["mailbox"]) == ("mailbox_not_found", ghosts[0])
            assert ghosts[0] in ghost["hint"]
            _, items = await call("GET", "/syncs/acme-o365/items?state=failed",
                                  made[("acme", "read")])
            assert {i["code"] for i in items["items"]} == {"consent_missing"}
            assert all(i["hint"] for i in items["items"])

            # isolation and roles
            assert (await call("GET", "/syncs/globex-o365", made[("acme", "manage")]))[0] == 404
            assert (await call("GET", "/syncs/acme-o365", made[("globex", "read")]))[0] == 404
            assert (await call("POST", "/syncs/acme-o365/retry", made[("acme", "read")]))[0] \
                == 403
            assert (await call("GET", "/syncs", None))[0] == 401
            assert (await call("GET", "/syncs", "absync_forged" + "x" * 40))[0] == 401

            # the dry-run count, then retry
            status, count = await call("POST", "/syncs/acme-o365/resync",
                                       made[("acme", "manage")], {"dry_run": True})
            assert (status, count) == (200, {"in_scope": 3})
            status, retried = await call("POST", "/syncs/acme-o365/retry",
                                         made[("acme", "manage")])
            assert (status, retried) == (200, {"requeued": 3})
            await wait_until(settled, timeout=60)
    finally:
        worker.terminate()
        worker.wait(30)

    text = log.read_text(errors="replace")
    conn = await asyncpg.connect(settings.database_url)
    try:
        tables = [r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
        rows = []
        for table in tables:
            rows += [r["t"] for r in await conn.fetch(f'SELECT t::text AS t FROM "{table}" t')]
        dump = "\n".join(rows)
    finally:
        await conn.close()
    for token in made.values():
        assert token not in text, "a token reached the worker's log"
        assert token.removeprefix("absync_") not in dump, "a token is stored in clear"
