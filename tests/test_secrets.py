"""No secret in any log line, metric, HTTP response or CLI output (README, 'Security').

`absence-sync run` (DEBUG logging) works for a Microsoft 365, a CalDAV and an
Exchange configuration through failures and throttling, against HTTPS doubles whose
error answers quote the request's credentials back (as some gateways' error
pages do) and a login service whose error echoes the client secret. Then
every output a person or a system could read is searched for every secret:
the worker's log, `/metrics`, `/healthz`, `/readyz`, the consent page, what
the monitoring API shows (the sync log and item errors in PostgreSQL), and
`config show` / `config list`.

The test proves the guards work, not only that nothing happened to leak: it
asserts that the echoed credentials did reach the worker and were replaced by
`[redacted]`. Each provider is a `ProviderCase` (Microsoft 365, CalDAV,
Exchange); a new provider adds one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import ssl
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import aiohttp
import asyncpg
import pytest
import trustme
from aiohttp import web
from cryptography.fernet import Fernet

from consumer.settings import Settings
from tests.conftest import Publisher, event, settings_env, wait_until
from tests.ews_server import EwsServer
from tests.graph_server import GraphServer
from tests.workerproc import WorkerProcess

SCRIPT = Path(sys.executable).parent / "absence-sync"
DIRECTORY = "5e8d7c6b-0000-4000-8000-00000000f00d"
MS_CLIENT_SECRET = "ms-Cl1ent-S3cret~" + uuid.uuid4().hex
DAV_USER = "sync-bot"
DAV_PASSWORD = "dav-Pa55w0rd;" + uuid.uuid4().hex[:12]
EWS_USER = "svc-secrets"
EWS_PASSWORD = "ews-Pa55w0rd!" + uuid.uuid4().hex[:12]
REDACTED = "[redacted]"


# ------------------------------------------------------------------ a CalDAV double


@dataclass
class DavDouble:
    """A CalDAV server over HTTPS (basic auth) whose failures quote the request."""

    user: str
    password: str
    missing: set[str] = field(default_factory=set)
    faults: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    events: dict[str, bytes] = field(default_factory=dict)
    answered: list[int] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self, ca: trustme.CA) -> None:
        app = web.Application()
        app.router.add_route("*", "/dav/{email}/calendar/{name:.*}", self._handle)
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(server_ssl)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_ssl)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"https://127.0.0.1:{port}/dav/{{email}}/calendar/"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _echo(self, request: web.Request, status: int, headers: dict[str, str]) -> web.Response:
        page = (f"<p>Authorization: {request.headers.get('Authorization', '')} - "
                f"upstream failed for {request.method} {request.path}</p>")
        self.answered.append(status)
        return web.Response(status=status, headers=headers, text=page)

    async def _handle(self, request: web.Request) -> web.Response:
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {expected}":
            return self._echo(request, 401, {"WWW-Authenticate": 'Basic realm="dav"'})
        email, name = request.match_info["email"], request.match_info["name"]
        if email in self.missing:
            return self._echo(request, 404, {})
        if self.faults:
            status, headers = self.faults.pop(0)
            return self._echo(request, status, headers)
        key = f"{email}/{name}"
        self.answered.append(200)
        if request.method == "PUT":
            exists = key in self.events
            if request.headers.get("If-None-Match") == "*" and exists:
                return web.Response(status=412)
            self.events[key] = await request.read()
            return web.Response(status=204 if exists else 201)
        if request.method == "DELETE":
            return web.Response(status=204 if self.events.pop(key, None) else 404)
        if request.method == "REPORT":
            mine = {k.split("/", 1)[1]: v for k, v in self.events.items()
                    if k.startswith(email + "/")}
            return web.Response(status=207, text=_multistatus(email, mine),
                                content_type="application/xml")
        return web.Response(status=405)


def _multistatus(email: str, events: dict[str, bytes]) -> str:
    responses = "".join(
        f"<D:response><D:href>/dav/{email}/calendar/{name}</D:href><D:propstat><D:prop>"
        f"<C:calendar-data>{escape(data.decode())}</C:calendar-data></D:prop>"
        "<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>"
        for name, data in events.items()
    )
    return ('<?xml version="1.0"?><D:multistatus xmlns:D="DAV:" '
            f'xmlns:C="urn:ietf:params:xml:ns:caldav">{responses}</D:multistatus>')


# ------------------------------------------------------------------ the world


@dataclass
class World:
    graph: GraphServer
    dav: DavDouble
    ews: EwsServer
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ProviderCase:
    """One provider's part: its configuration, its secrets, its faults and mailboxes.

    `secrets` are values that must appear nowhere; `setup` scripts the failures
    and throttling and returns (mailboxes that work, a mailbox that does not).
    """

    config_id: str
    provider: str
    block: Callable[[World], str]
    env: dict[str, str]
    secrets: Callable[[World], list[str]]
    setup: Callable[[World], tuple[list[str], str]]
    settled: Callable[[World], bool]


def _m365_setup(world: World) -> tuple[list[str], str]:
    graph = world.graph
    graph.echo_authorization = True
    # the login service fails once (retriable), quoting the client secret it received
    graph.script_token(DIRECTORY, 400, {
        "error": "temporarily_unavailable",
        "error_description": f"AADSTS50196: server busy; received client_secret="
                             f"{MS_CLIENT_SECRET}",
    }, headers={"Retry-After": "1"})
    boxes = [graph.add_mailbox(f"{name}@acme.test") for name in ("ann", "bob")]
    for box in boxes:  # throttled, then a gateway failure quoting the bearer token
        graph.script(box, 429, "ApplicationThrottled", "MailboxConcurrency limit",
                     retry_after="1")
        graph.script(box, 502, "BadGateway", "gateway failed")
    return boxes, "nobody@acme.test"


def _dav_setup(world: World) -> tuple[list[str], str]:
    world.dav.faults += [(429, {"Retry-After": "1"}), (503, {}), (500, {})]
    world.dav.missing.add("nobody@acme.test")
    return ["ann@acme.test", "bob@acme.test"], "nobody@acme.test"


def _ews_basic(world: World) -> str:
    return base64.b64encode(f"{world.ews.username}:{EWS_PASSWORD}".encode()).decode()


def _ews_setup(world: World) -> tuple[list[str], str]:
    ews = world.ews
    boxes = [ews.add_mailbox(f"{name}@acme.test") for name in ("ann", "bob")]
    # busy, then a gateway that quotes the request's credentials, twice
    ews.script("*", back_off_ms=500)
    echo = f"gateway error; request had Authorization: Basic {_ews_basic(world)}"
    ews.script("*", status=503, retry_after="1", message=echo)
    ews.script("*", status=500, message=f"{echo}; password={EWS_PASSWORD}")
    return boxes, "nobody@acme.test"


PROVIDER_CASES = [
    ProviderCase(
        config_id="acme-o365",
        provider="microsoft365",
        block=lambda w: f"{{tenant_id: {DIRECTORY}}}",
        env={},
        secrets=lambda w: [MS_CLIENT_SECRET, *w.graph.tokens],
        setup=_m365_setup,
        settled=lambda w: not any(w.graph.scripts.values())
        and not any(w.graph.token_scripts.values()),
    ),
    ProviderCase(
        config_id="acme-dav",
        provider="caldav",
        block=lambda w: (f'{{url: "{w.dav.url}", username: {DAV_USER}, '
                         "password_env: TEST_DAV_PASSWORD}"),
        env={"TEST_DAV_PASSWORD": DAV_PASSWORD},
        secrets=lambda w: [DAV_PASSWORD,
                           base64.b64encode(f"{DAV_USER}:{DAV_PASSWORD}".encode()).decode()],
        setup=_dav_setup,
        settled=lambda w: not w.dav.faults,
    ),
    ProviderCase(
        config_id="acme-ews",
        provider="exchange",
        block=lambda w: (f"{{url: '{w.ews.url}', username: '{w.ews.username}', "
                         "password_env: TEST_EWS_PASSWORD, auth: basic}"),
        env={"TEST_EWS_PASSWORD": EWS_PASSWORD},
        secrets=lambda w: [EWS_PASSWORD, _ews_basic(w)],
        setup=_ews_setup,
        settled=lambda w: not w.ews.scripts,
    ),
]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    ca = trustme.CA()
    graph = GraphServer(ca=ca)
    graph.client_secret = MS_CLIENT_SECRET
    graph.add_tenant(DIRECTORY)
    await graph.start(tmp_path)
    dav = DavDouble(DAV_USER, DAV_PASSWORD)
    await dav.start(ca)
    ews = EwsServer(ca=ca, auth=("basic",), user=EWS_USER, upn=f"{EWS_USER}@acme.test",
                    password=EWS_PASSWORD)
    await ews.start(tmp_path / "ews")
    try:
        yield World(graph, dav, ews, tmp_path)
    finally:
        await ews.stop()
        await dav.stop()
        await graph.stop()


async def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(SCRIPT), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def http_get(port: int, path: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as r:
        return f"{r.status} {dict(r.headers)} {await r.text()}"


async def test_no_secret_leaves_the_worker(
    world: World, settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    secret_keys = f"{Fernet.generate_key().decode()},{Fernet.generate_key().decode()}"
    assert world.graph.ca_path is not None
    configured = settings.model_copy(update={
        "ms_client_id": world.graph.client_id,
        "ms_client_secret": MS_CLIENT_SECRET,
        "ms_authority_host": world.graph.authority_host,
        "ms_graph_url": world.graph.graph_url,
        "ca_bundle": world.graph.ca_path,
        "secret_keys": secret_keys,
        "log_level": "DEBUG",
        "retry_base_seconds": 0.2,
        "retry_max_seconds": 1.5,
    })
    world.env = {k: v for k, v in os.environ.items() if not k.startswith("ABSENCE_SYNC_")}
    world.env.update(settings_env(configured))
    for case in PROVIDER_CASES:
        world.env.update(case.env)

    syncs = world.tmp / "syncs.yaml"
    syncs.write_text("syncs:\n" + "".join(
        f"  - id: {c.config_id}\n    tenant: acme\n    provider: {c.provider}\n"
        f"    {c.provider}: {c.block(world)}\n"
        for c in PROVIDER_CASES
    ))
    outputs: dict[str, str] = {}
    code, out, err = await cli(world.env, "config", "apply", "-f", str(syncs))
    assert code == 0, err
    outputs["config apply"] = out + err

    mailboxes: list[str] = []
    missing = ""
    for case in PROVIDER_CASES:
        good, missing = case.setup(world)
        mailboxes += [m for m in good if m not in mailboxes]
    for n, box in enumerate([*mailboxes, missing]):
        await publisher.send(event(f"abs-{n}", 1, email=box))
    await publisher.flush()

    worker = WorkerProcess(configured, world.tmp / "worker.log")
    try:
        async def settled() -> bool:
            assert worker.alive(), worker.log.read_text()[-5000:]
            if not all(case.settled(world) for case in PROVIDER_CASES):
                return False
            rows = await pool.fetch("SELECT status FROM sync_items")
            return len(rows) == len(PROVIDER_CASES) * (len(mailboxes) + 1) and all(
                r["status"] in ("synced", "failed") for r in rows
            )

        await wait_until(settled, timeout=120)
        statuses: dict[str, set[str]] = {}
        for row in await pool.fetch("SELECT config_id, status FROM sync_items"):
            statuses.setdefault(row["config_id"], set()).add(row["status"])
        port = _http_port(worker.log.read_text())
        for path in ("/metrics", "/healthz", "/readyz",
                     "/consent/microsoft365/callback?admin_consent=True"
                     f"&tenant={DIRECTORY}&state=forged"):
            outputs[f"GET {path}"] = await http_get(port, path)
    finally:
        assert worker.terminate() == 0, worker.log.read_text()[-5000:]
    outputs["worker log"] = worker.log.read_text(errors="replace")

    for args in (["config", "show", "acme-o365"], ["config", "show", "acme-dav"],
                 ["config", "list"], ["config", "list", "--json"], ["retry"]):
        code, out, err = await cli(world.env, *args)
        assert code == 0, err
        outputs[" ".join(args)] = out + err
    # what the monitoring API shows: item errors and the operation history
    outputs["sync_items"] = json.dumps(
        [dict(r) for r in await pool.fetch("SELECT * FROM sync_items")], default=str
    )
    outputs["sync_log"] = json.dumps(
        [dict(r) for r in await pool.fetch("SELECT * FROM sync_log")], default=str
    )

    # the run went through what the test meant: throttling, failures, echoes
    assert 429 in world.dav.answered and 500 in world.dav.answered
    assert world.graph.throttles, "Graph never throttled"
    assert all(s == {"synced", "failed"} for s in statuses.values()), statuses

    secrets = [MS_CLIENT_SECRET, *secret_keys.split(",")]
    for case in PROVIDER_CASES:
        secrets += case.secrets(world)
    assert len(world.graph.tokens) >= 1
    leaks = [
        f"{where}: {secret[:6]}..." for where, text in outputs.items() for secret in secrets
        if secret and secret in text
    ]
    assert not leaks, leaks
    # ... and not because nothing was there to leak: the echoes arrived, redacted
    log = outputs["worker log"]
    assert re.search(r"Authorization: Basic \[redacted\]", log), "no echoed CalDAV credentials"
    assert re.search(r"Authorization: Bearer \[redacted\]", log), "no echoed Graph token"
    assert f"client_secret={REDACTED}" in log, "no echoed client secret"
    assert "Authorization: Basic [redacted]" in outputs["sync_items"] + outputs["sync_log"]


def _http_port(log: str) -> int:
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            doc: dict[str, Any] = json.loads(line)
            if doc.get("event") == "worker started":
                return int(doc["http_port"])
    raise AssertionError("the worker never logged its HTTP port:\n" + log[-3000:])
