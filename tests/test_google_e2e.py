"""End to end: the installed worker (`absence-sync run`) with `provider: google`
against the HTTPS Google double (token endpoint and Calendar API).

The product is driven only through its public contract: `absence-sync
migrate`, `config apply -f FILE` (the service account key given as a file
and as an environment variable), `absence-sync run` configured by
ABSENCE_SYNC_* variables (ABSENCE_SYNC_GOOGLE_TOKEN_URL and _API_URL point
at the double), CloudEvents published to the real broker, SIGTERM to stop.
Outcomes are read from the double's calendars and from `sync_items`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.fernet import Fernet

from consumer.providers.google import MARK_KEY
from consumer.settings import Settings
from tests.conftest import Publisher, event, settings_env, wait_until
from tests.google_server import GoogleServer

SCRIPT = Path(sys.executable).parent / "absence-sync"
ACCOUNT = "absence-sync@acme-e2e.iam.gserviceaccount.com"
UNDELEGATED = "forgotten@acme-e2e.iam.gserviceaccount.com"
CONFIG_ID = "acme-google"
_boxes = itertools.count()


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    async def terminate(self, budget: float) -> None:
        assert self.proc.poll() is None, f"the worker died early:\n{self.output()[-8000:]}"
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + budget
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert self.proc.poll() == 0, self.output()[-8000:]


@dataclass
class E2E:
    google: GoogleServer
    settings: Settings
    publisher: Publisher
    tmp: Path
    prefix: str
    key: str
    env: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        base = {k: v for k, v in os.environ.items() if not k.upper().startswith("ABSENCE_SYNC_")}
        assert self.google.ca_path is not None
        self.env = {
            **base,
            **settings_env(self.settings),
            "ABSENCE_SYNC_GOOGLE_TOKEN_URL": self.google.token_url,
            "ABSENCE_SYNC_GOOGLE_API_URL": self.google.api_url,
            "ABSENCE_SYNC_CA_BUNDLE": str(self.google.ca_path),
            "ABSENCE_SYNC_SECRET_KEYS": Fernet.generate_key().decode(),
            "ABSENCE_SYNC_HTTP_PORT": "0",
            "ABSENCE_SYNC_LOG_FORMAT": "json",
            "GOOGLE_KEY_JSON": self.key,
        }

    def user(self, name: str, *, register: bool = True) -> str:
        address = f"{name}.{self.prefix}{next(_boxes)}@acme.test"
        if register:
            self.google.add_user(address)
        return address

    async def cli(self, *args: str) -> str:
        assert SCRIPT.is_file(), f"{SCRIPT}: the project is not installed in this venv"
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPT), *args, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, f"absence-sync {' '.join(args)}: {err.decode()}"
        return out.decode()

    async def apply(self, syncs: str) -> None:
        path = self.tmp / "syncs.yaml"
        path.write_text(textwrap.dedent(syncs), encoding="utf-8")
        await self.cli("migrate")
        await self.cli("config", "apply", "-f", str(path))

    def start(self, **env: str) -> Worker:
        log = self.tmp / f"worker-{len(self.workers)}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen([str(SCRIPT), "run"], env={**self.env, **env},
                                    stdout=sink, stderr=subprocess.STDOUT)
        worker = Worker(proc, log)
        self.workers.append(worker)
        return worker

    async def publish(self, docs: Iterable[dict[str, Any]]) -> None:
        for doc in docs:
            await self.publisher.send(doc)
        await self.publisher.flush()

    async def items(self) -> dict[str, asyncpg.Record]:
        assert self.settings.database_url
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            rows = await conn.fetch("SELECT * FROM sync_items")
        finally:
            await conn.close()
        return {f"{r['config_id']}/{r['absence_id']}": r for r in rows}

    async def settled(self, count: int) -> bool:
        rows = (await self.items()).values()
        return len(rows) == count and all(
            r["change_seq"] <= r["done_seq"] and r["lease_until"] is None for r in rows
        )

    async def wait_settled(self, count: int, timeout: float = 40.0) -> None:
        try:
            await wait_until(lambda: self.settled(count), timeout=timeout)
        except AssertionError:
            rows = await self.items()
            states = Counter(str(r["status"]) for r in rows.values())
            logs = "\n".join(w.output()[-3000:] for w in self.workers)
            raise AssertionError(f"not settled: {len(rows)} items {dict(states)}\n{logs}") from None

    def by_mark(self, user: str) -> dict[str, list[dict[str, Any]]]:
        """Live events of `user`'s primary calendar, by ownership mark."""
        found: dict[str, list[dict[str, Any]]] = {}
        for stored in self.google.events(user):
            value = stored["extendedProperties"]["private"][MARK_KEY]
            found.setdefault(value, []).append(stored)
        return found

    @property
    def shutdown_budget(self) -> float:
        return self.settings.shutdown_timeout_seconds + 1.0


def mark(absence_id: str, config_id: str = CONFIG_ID) -> str:
    return f"absence-sync:{config_id}:{absence_id}"


def absence(absence_id: str, version: int, user: str, *, status: str = "approved",
            start: tuple[str, str] = ("2026-12-01", "am"),
            end: tuple[str, str] = ("2026-12-03", "pm"),
            account: dict[str, Any] | None = None, tenant: str = "acme") -> dict[str, Any]:
    doc = event(absence_id, version, tenant=tenant, status=status, email=user, start=start,
                end=end)
    if account is not None:
        doc["data"]["account"] = account
    return doc


@pytest.fixture(scope="module")
async def google(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GoogleServer]:
    server = GoogleServer()
    await server.start(tmp_path_factory.mktemp("google-e2e"))
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def key(google: GoogleServer) -> str:
    return google.add_account(ACCOUNT)


@pytest.fixture
async def e2e(google: GoogleServer, key: str, settings: Settings, publisher: Publisher,
              tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[E2E]:
    world = E2E(google, settings, publisher, tmp_path,
                request.node.name[5:12].replace("_", ""), key)
    try:
        yield world
    finally:
        for worker in world.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait(10)


def syncs(e2e: E2E) -> str:
    key_file = e2e.tmp / "google-key.json"
    key_file.write_text(e2e.key, encoding="utf-8")
    return f"""
        syncs:
          - id: {CONFIG_ID}
            tenant: acme
            provider: google
            busy_as: oof
            free_as: workingElsewhere
            private: true
            google:
              service_account_file: {key_file}
              autodecline: all
    """


REMOTE = {"id": "remote", "name": "Remote work", "counted_as_absence": False,
          "public_reason": True}


async def test_life_of_absences_in_google_calendar(e2e: E2E) -> None:
    """Pending -> approved (tentative event -> out-of-office: a new event) ->
    cancelled (gone); several days; a half day; remote work; nothing left behind."""
    await e2e.apply(syncs(e2e))
    jane, john = e2e.user("jane"), e2e.user("john")
    await e2e.publish([
        absence("a-flow", 1, jane, status="pending", start=("2026-12-14", "am"),
                end=("2026-12-15", "pm")),
        absence("a-days", 1, jane),
        absence("a-half", 1, john, start=("2026-12-07", "pm"), end=("2026-12-07", "pm")),
        absence("a-remote", 1, john, start=("2026-12-08", "am"), end=("2026-12-08", "pm"),
                account=REMOTE),
    ])
    worker = e2e.start()
    await e2e.wait_settled(4)
    [pending] = e2e.by_mark(jane)[mark("a-flow")]
    assert (pending["eventType"], pending["status"], pending["transparency"]) == (
        "default", "tentative", "opaque")
    assert pending["start"] == {"date": "2026-12-14"} and pending["end"] == {"date": "2026-12-16"}

    await e2e.publish([absence("a-flow", 2, jane, start=("2026-12-14", "am"),
                               end=("2026-12-15", "pm"))])

    async def approved() -> bool:
        events = e2e.by_mark(jane).get(mark("a-flow"), [])
        return len(events) == 1 and events[0]["eventType"] == "outOfOffice"

    await wait_until(approved, timeout=30)
    [oof] = e2e.by_mark(jane)[mark("a-flow")]
    assert oof["start"] == {"dateTime": "2026-12-14T00:00:00", "timeZone": "Europe/Paris"}
    assert oof["end"] == {"dateTime": "2026-12-16T00:00:00", "timeZone": "Europe/Paris"}
    assert oof["outOfOfficeProperties"]["autoDeclineMode"] == "declineAllConflictingInvitations"

    await e2e.publish([absence("a-flow", 3, jane, status="cancelled",
                               start=("2026-12-14", "am"), end=("2026-12-15", "pm"))])
    await wait_until(lambda: _async(mark("a-flow") not in e2e.by_mark(jane)), timeout=30)
    await e2e.wait_settled(4)
    await worker.terminate(e2e.shutdown_budget)

    at_jane, at_john = e2e.by_mark(jane), e2e.by_mark(john)
    assert sorted(at_jane) == [mark("a-days")]
    assert sorted(at_john) == sorted([mark("a-half"), mark("a-remote")])
    assert all(len(events) == 1 for events in (*at_jane.values(), *at_john.values()))
    [days] = at_jane[mark("a-days")]
    assert (days["eventType"], days["start"], days["end"]) == (
        "outOfOffice", {"dateTime": "2026-12-01T00:00:00", "timeZone": "Europe/Paris"},
        {"dateTime": "2026-12-04T00:00:00", "timeZone": "Europe/Paris"})
    [half] = at_john[mark("a-half")]
    assert (half["eventType"], half["start"], half["end"]) == (
        "outOfOffice", {"dateTime": "2026-12-07T13:30:00", "timeZone": "Europe/Paris"},
        {"dateTime": "2026-12-07T18:00:00", "timeZone": "Europe/Paris"})
    [remote] = at_john[mark("a-remote")]
    assert (remote["eventType"], remote["transparency"], remote["summary"]) == (
        "default", "transparent", "Remote work")
    assert remote["start"] == {"date": "2026-12-08"}
    for stored in (days, half, remote):
        assert stored["visibility"] == "private"
        assert stored["reminders"] == {"useDefault": False}
        assert "attendees" not in stored
    rows = await e2e.items()
    assert rows[f"{CONFIG_ID}/a-flow"]["status"] == "deleted"
    assert {rows[f"{CONFIG_ID}/{a}"]["status"] for a in ("a-days", "a-half", "a-remote")} == {
        "synced"}
    assert not e2e.google.unexpected
    assert "PRIVATE KEY" not in worker.output()


async def _async(value: bool) -> bool:
    return value


async def test_lost_insert_response_leaves_one_event(e2e: E2E) -> None:
    await e2e.apply(syncs(e2e))
    lost = e2e.user("lost")
    e2e.google.lose_insert[lost.lower()] = 1
    await e2e.publish([absence("a-lost", 1, lost)])
    worker = e2e.start(ABSENCE_SYNC_RETRY_BASE_SECONDS="0.2")
    await e2e.wait_settled(1)
    await worker.terminate(e2e.shutdown_budget)
    assert {k: len(v) for k, v in e2e.by_mark(lost).items()} == {mark("a-lost"): 1}
    row = (await e2e.items())[f"{CONFIG_ID}/a-lost"]
    assert row["status"] == "synced"
    assert row["event_id"] == e2e.google.events(lost)[0]["id"]


async def test_permanent_failures_carry_code_and_hint(e2e: E2E, google: GoogleServer) -> None:
    other = google.add_account(UNDELEGATED, scopes=(), client_id="555666777888999000111")
    e2e.env["OTHER_KEY_JSON"] = other
    await e2e.apply(syncs(e2e) + """
          - id: globex-google
            tenant: globex
            provider: google
            google:
              service_account_env: OTHER_KEY_JSON
    """)
    ok, ghost = e2e.user("ok"), e2e.user("ghost", register=False)
    await e2e.publish([absence("a-ok", 1, ok), absence("a-ghost", 1, ghost),
                       absence("g-1", 1, e2e.user("globex"), tenant="globex")])
    worker = e2e.start()
    await e2e.wait_settled(3)
    await worker.terminate(e2e.shutdown_budget)
    rows = await e2e.items()
    assert rows[f"{CONFIG_ID}/a-ok"]["status"] == "synced"
    missing = rows[f"{CONFIG_ID}/a-ghost"]
    assert (missing["status"], missing["last_error_code"]) == ("failed", "mailbox_not_found")
    assert ghost.lower() in missing["last_error_hint"].lower()
    denied = rows["globex-google/g-1"]
    assert (denied["status"], denied["last_error_code"]) == ("failed", "access_denied")
    assert "555666777888999000111" in denied["last_error_hint"]
    assert "https://www.googleapis.com/auth/calendar.events" in denied["last_error_hint"]
    assert {r["attempts"] for r in rows.values() if r["status"] == "failed"} == {1}
    shown = await e2e.cli("config", "show", "globex-google")
    assert "PRIVATE KEY" not in shown and "PRIVATE KEY" not in worker.output()


async def test_rate_limit_answers_are_retried_and_writes_are_batched(e2e: E2E) -> None:
    await e2e.apply(syncs(e2e))
    busy = e2e.user("busy")
    e2e.google.script(busy, 403, "rateLimitExceeded", "Rate Limit Exceeded", times=2,
                      domain="usageLimits")
    e2e.google.script(busy, 503, "backendError", "Backend Error")
    batches_before = len(e2e.google.batch_sizes)
    docs = [absence(f"a-{n:02}", 1, busy, start=(f"2027-01-{n + 1:02}", "am"),
                    end=(f"2027-01-{n + 1:02}", "pm")) for n in range(20)]
    await e2e.publish(docs)
    worker = e2e.start(ABSENCE_SYNC_RETRY_BASE_SECONDS="0.2")
    await e2e.wait_settled(len(docs))
    await worker.terminate(e2e.shutdown_budget)
    assert {k: len(v) for k, v in e2e.by_mark(busy).items()} == {
        mark(f"a-{n:02}"): 1 for n in range(20)}
    rows = await e2e.items()
    assert {r["status"] for r in rows.values()} == {"synced"}
    sizes = e2e.google.batch_sizes[batches_before:]
    assert sizes and max(sizes) > 1 and max(sizes) <= 4  # 4 in flight per mailbox
    conn = await asyncpg.connect(settings_dsn(e2e))
    try:
        codes = Counter(r["error_code"] for r in await conn.fetch(
            "SELECT error_code FROM sync_log WHERE outcome = 'error'"))
    finally:
        await conn.close()
    assert codes == {"throttled": 2, "provider_error": 1}


def settings_dsn(e2e: E2E) -> str:
    assert e2e.settings.database_url
    return e2e.settings.database_url


async def test_sigkill_mid_way_leaves_exactly_one_event_per_absence(
    e2e: E2E, monkeypatch: pytest.MonkeyPatch
) -> None:
    await e2e.apply(syncs(e2e))
    users = [e2e.user(f"crash{n}") for n in range(8)]
    monkeypatch.setattr(e2e.google, "latency", 0.05)
    docs = [absence(f"a-{n:03}", 1, users[n % len(users)],
                    start=(f"2027-02-{n % 28 + 1:02}", "am"),
                    end=(f"2027-02-{n % 28 + 1:02}", "pm")) for n in range(120)]
    await e2e.publish(docs)
    # short leases, so the killed worker's leases expire quickly
    env = {"ABSENCE_SYNC_REQUEST_TIMEOUT_SECONDS": "2", "ABSENCE_SYNC_LEASE_SECONDS": "5"}
    worker = e2e.start(**env)

    async def some_written() -> bool:
        return sum(len(e2e.google.events(u)) for u in users) >= 25

    await wait_until(some_written, timeout=30, interval=0.005)
    worker.proc.kill()
    assert worker.proc.wait(10) == -signal.SIGKILL
    assert sum(len(e2e.google.events(u)) for u in users) < len(docs), "finished too early"
    worker = e2e.start(**env)
    await e2e.wait_settled(len(docs), timeout=60)
    await worker.terminate(e2e.shutdown_budget)

    counts = Counter(m for u in users for m, events in e2e.by_mark(u).items()
                     for _ in events)
    assert counts == {mark(f"a-{n:03}"): 1 for n in range(120)}, {
        k: v for k, v in counts.items() if v != 1}
    rows = await e2e.items()
    assert {r["status"] for r in rows.values()} == {"synced"}
    live = {e["id"] for u in users for e in e2e.google.events(u)}
    assert {r["event_id"] for r in rows.values()} == live
