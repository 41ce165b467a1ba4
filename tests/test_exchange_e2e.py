"""End to end: the installed worker (`absence-sync run`) with `provider: exchange`
against the HTTPS EWS double (tests/ews_server.py).

Only the public contract is used: `absence-sync migrate`, `config apply -f`,
`config show`, `absence-sync run` in a subprocess configured by ABSENCE_SYNC_*
variables, CloudEvents on the real broker, SIGTERM. Outcomes are read from
the EWS double's mailboxes and records, and from `sync_items` / `sync_log`.
One EWS server serves the module; each test has its own database and topic.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import signal
import socket
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

from consumer.providers.exchange import MARK_PROPERTY_NAME, MARK_PROPERTY_SET
from consumer.settings import Settings
from tests.conftest import Publisher, event, settings_env, wait_until
from tests.ews_server import EwsServer, Item

SCRIPT = Path(sys.executable).parent / "absence-sync"
PASSWORD_ENV = "TEST_EWS_PASSWORD"
_boxes = itertools.count()


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    async def terminate(self, budget: float) -> None:
        assert self.proc.poll() is None, f"the worker died early:\n{self.output()[-4000:]}"
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + budget
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert self.proc.poll() == 0, f"exit {self.proc.poll()}:\n{self.output()[-4000:]}"


@dataclass
class E2E:
    ews: EwsServer
    settings: Settings
    publisher: Publisher
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        base = {k: v for k, v in os.environ.items() if not k.upper().startswith("ABSENCE_SYNC_")}
        assert self.ews.ca_path is not None
        self.env = {
            **base,
            **settings_env(self.settings),
            "ABSENCE_SYNC_CA_BUNDLE": str(self.ews.ca_path),
            "ABSENCE_SYNC_SECRET_KEYS": Fernet.generate_key().decode(),
            "ABSENCE_SYNC_HTTP_PORT": "0",
            "ABSENCE_SYNC_LOG_FORMAT": "json",
            PASSWORD_ENV: self.ews.password,
        }

    def mailbox(self, name: str, *, register: bool = True) -> str:
        address = f"{name}.{next(_boxes)}@acme.test"
        return self.ews.add_mailbox(address) if register else address

    async def cli(self, *args: str) -> str:
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

    async def stop(self, worker: Worker) -> None:
        await worker.terminate(self.settings.shutdown_timeout_seconds + 5)

    async def publish(self, docs: Iterable[dict[str, Any]]) -> None:
        for doc in docs:
            await self.publisher.send(doc)
        await self.publisher.flush()

    async def items(self) -> dict[str, asyncpg.Record]:
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            rows = await conn.fetch("SELECT * FROM sync_items")
        finally:
            await conn.close()
        return {f"{r['config_id']}/{r['absence_id']}": r for r in rows}

    async def log_codes(self) -> Counter[str]:
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            rows = await conn.fetch("SELECT error_code FROM sync_log WHERE outcome = 'error'")
        finally:
            await conn.close()
        return Counter(str(r["error_code"]) for r in rows)

    async def wait_settled(self, count: int, *, timeout: float = 40.0,
                           waiting: frozenset[str] = frozenset()) -> None:
        """`count` items, each done and unleased (or still retrying with one of the
        error codes in `waiting`)."""

        async def settled() -> bool:
            rows = (await self.items()).values()
            return len(rows) == count and all(
                r["lease_until"] is None and (
                    r["change_seq"] <= r["done_seq"] or r["last_error_code"] in waiting
                )
                for r in rows
            )

        try:
            await wait_until(settled, timeout=timeout)
        except AssertionError:
            rows = await self.items()
            states = {k: (r["status"], r["last_error_code"]) for k, r in rows.items()}
            logs = "\n".join(w.output()[-3000:] for w in self.workers)
            raise AssertionError(f"not settled: {states}\n{logs}") from None

    def by_mark(self, mailbox: str) -> dict[str, list[Item]]:
        return self.ews.marked(mailbox, MARK_PROPERTY_SET, MARK_PROPERTY_NAME)


def mark(absence_id: str, config_id: str = "acme-ews") -> str:
    return f"absence-sync:{config_id}:{absence_id}"


def absence(absence_id: str, version: int, mailbox: str, *, tenant: str = "acme",
            status: str = "approved", start: tuple[str, str] = ("2026-12-01", "am"),
            end: tuple[str, str] = ("2026-12-03", "pm"), time_zone: str | None = "Europe/Paris",
            account: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = event(absence_id, version, tenant=tenant, status=status, email=mailbox, start=start,
                end=end)
    if time_zone is None:
        del doc["data"]["employee"]["time_zone"]
    else:
        doc["data"]["employee"]["time_zone"] = time_zone
    if account is not None:
        doc["data"]["account"] = account
    return doc


def one(items: dict[str, list[Item]], value: str) -> Item:
    assert len(items.get(value, [])) == 1, f"{value}: {len(items.get(value, []))} items"
    return items[value][0]


@pytest.fixture(scope="module")
async def ews(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EwsServer]:
    server = EwsServer(version="2019")
    await server.start(tmp_path_factory.mktemp("ews-e2e"))
    yield server
    await server.stop()


@pytest.fixture
async def e2e(ews: EwsServer, settings: Settings, publisher: Publisher,
              tmp_path: Path) -> AsyncIterator[E2E]:
    world = E2E(ews, settings, publisher, tmp_path)
    try:
        yield world
    finally:
        ews.scripts.clear()
        for worker in world.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait(10)


def syncs(ews: EwsServer, config_id: str = "acme-ews", tenant: str = "acme", *,
          url: str | None = None, password_env: str = PASSWORD_ENV, extra: str = "") -> str:
    return f"""
  - id: {config_id}
    tenant: {tenant}
    provider: exchange
{extra}    exchange:
      url: {url or ews.url}
      username: {ews.username}
      password_env: {password_env}
"""


# ---------------------------------------------------------------- 1. lifecycle and payloads


async def test_lifecycle_writes_the_right_items_and_leaves_none_behind(e2e: E2E) -> None:
    options = "    busy_as: oof\n    free_as: workingElsewhere\n    private: true\n" \
              "    category: Absences\n"
    await e2e.apply("syncs:" + syncs(e2e.ews, extra=options))
    jane, john = e2e.mailbox("jane"), e2e.mailbox("john")
    remote = {"id": "remote", "name": "Remote work", "counted_as_absence": False,
              "public_reason": True}
    worker = e2e.start()
    # a request, approved later, then cancelled
    await e2e.publish([absence("a-life", 1, jane, status="pending")])
    await e2e.wait_settled(1)
    pending = one(e2e.by_mark(jane), mark("a-life"))
    assert pending.free_busy == "Tentative"
    await e2e.publish([
        absence("a-life", 2, jane),
        absence("a-half", 1, john, start=("2026-12-07", "pm"), end=("2026-12-07", "pm"),
                time_zone=None),  # the configuration's zone: UTC
        absence("a-span", 1, john, start=("2026-12-09", "pm"), end=("2026-12-10", "am")),
        absence("a-days", 1, john, start=("2026-12-14", "am"), end=("2026-12-18", "pm"),
                time_zone="America/New_York"),
        absence("a-remote", 1, jane, start=("2026-12-08", "am"), end=("2026-12-08", "pm"),
                account=remote),
        absence("a-denied", 1, jane, status="denied"),
    ])
    await e2e.wait_settled(6)
    approved = one(e2e.by_mark(jane), mark("a-life"))
    assert approved.id == pending.id and approved.free_busy == "OOF"  # updated, not recreated
    await e2e.publish([absence("a-life", 3, jane, status="cancelled")])

    async def cancelled() -> bool:
        return mark("a-life") not in e2e.by_mark(jane)

    await wait_until(cancelled, timeout=20)
    await e2e.wait_settled(6)
    # redelivered events write nothing (a sentinel shows they were consumed)
    requests_before = len(e2e.ews.requests)
    latest = [absence("a-life", 3, jane, status="cancelled"),
              absence("a-remote", 1, jane, start=("2026-12-08", "am"), end=("2026-12-08", "pm"),
                      account=remote)]
    sentinel = e2e.mailbox("sentinel")
    await e2e.publish([*latest, absence("a-sentinel", 1, sentinel)])

    async def sentinel_written() -> bool:
        return mark("a-sentinel") in e2e.by_mark(sentinel)

    await wait_until(sentinel_written, timeout=20)
    await e2e.wait_settled(7)
    await e2e.stop(worker)
    assert {r.mailbox for r in e2e.ews.requests[requests_before:]} == {sentinel.lower()}

    at_jane, at_john = e2e.by_mark(jane), e2e.by_mark(john)
    assert sorted(at_jane) == [mark("a-remote")]
    assert sorted(at_john) == sorted(mark(a) for a in ("a-half", "a-span", "a-days"))
    expected = {
        # absence: (mailbox items, subject, status, all day, local start, local end, zone)
        "a-half": (at_john, "Absent", "OOF", False, dt.datetime(2026, 12, 7, 13, 30),
                   dt.datetime(2026, 12, 7, 18, 0), "UTC"),
        "a-span": (at_john, "Absent", "OOF", False, dt.datetime(2026, 12, 9, 13, 30),
                   dt.datetime(2026, 12, 10, 12, 30), "Romance Standard Time"),
        "a-days": (at_john, "Absent", "OOF", True, dt.datetime(2026, 12, 14),
                   dt.datetime(2026, 12, 19), "Eastern Standard Time"),
        "a-remote": (at_jane, "Remote work", "WorkingElsewhere", True,
                     dt.datetime(2026, 12, 8), dt.datetime(2026, 12, 9), "Romance Standard Time"),
    }
    for absence_id, (box, subject, status, all_day, start, end, zone) in expected.items():
        item = one(box, mark(absence_id))
        got = (item.subject, item.free_busy, item.all_day, item.local_start, item.local_end,
               item.fields["StartTimeZone"])
        assert got == (subject, status, all_day, start, end, zone), absence_id
        assert item.fields["Sensitivity"] == "Private"
        assert item.categories == ["Absences"]
        assert item.fields["ReminderIsSet"] in ("0", "false")
    assert not e2e.ews.anomalies and not e2e.ews.unexpected
    mine = [r for r in e2e.ews.requests if r.mailbox in (jane.lower(), john.lower())]
    assert {r.user for r in mine} == {e2e.ews.username}  # NTLM by default
    writes = Counter(r.operation for r in mine if r.operation != "FindItem")
    assert writes["DeleteItem"] == 1 and writes["UpdateItem"] == 1
    rows = await e2e.items()
    assert rows["acme-ews/a-sentinel"]["status"] == "synced"
    assert rows["acme-ews/a-life"]["status"] == "deleted"
    assert rows["acme-ews/a-denied"]["status"] == "deleted"
    assert {rows[f"acme-ews/{a}"]["status"] for a in expected} == {"synced"}


# ---------------------------------------------------------------- 2. faults


async def test_faults_never_double_an_item(e2e: E2E) -> None:
    await e2e.apply("syncs:" + syncs(e2e.ews))
    after_503, busy, moved, gone = (e2e.mailbox(n) for n in ("after503", "busy", "moved", "gone"))
    e2e.ews.script("CreateItem", after_503, status=503, after=True)
    e2e.ews.script("CreateItem", busy, back_off_ms=1500)
    throttles = len(e2e.ews.throttles)
    worker = e2e.start()
    await e2e.publish([absence("a-503", 1, after_503), absence("a-busy", 1, busy),
                       absence("a-moved", 1, moved), absence("a-gone", 1, gone)])
    await e2e.wait_settled(4)
    assert len(e2e.ews.throttles) == throttles + 1
    # the employee deletes two items in Outlook; the HR system then changes and cancels them
    e2e.ews.items[moved.lower()].clear()
    e2e.ews.items[gone.lower()].clear()
    await e2e.publish([
        absence("a-moved", 2, moved, start=("2026-12-02", "am")),
        absence("a-gone", 2, gone, status="cancelled"),
    ])

    async def recreated() -> bool:
        return mark("a-moved") in e2e.by_mark(moved)

    await wait_until(recreated, timeout=20)
    await e2e.wait_settled(4)
    await e2e.stop(worker)

    for box, absence_id in ((after_503, "a-503"), (busy, "a-busy"), (moved, "a-moved")):
        assert {k: len(v) for k, v in e2e.by_mark(box).items()} == {mark(absence_id): 1}
    assert one(e2e.by_mark(moved), mark("a-moved")).local_start == dt.datetime(2026, 12, 2)
    assert e2e.ews.calendar(gone) == []
    assert not e2e.ews.early  # nothing was sent inside the server's back-off
    rows = await e2e.items()
    assert {k: r["status"] for k, r in rows.items()} == {
        "acme-ews/a-503": "synced", "acme-ews/a-busy": "synced", "acme-ews/a-moved": "synced",
        "acme-ews/a-gone": "deleted",
    }
    codes = await e2e.log_codes()
    assert codes["throttled"] == 1 and set(codes) == {"throttled"}


# ---------------------------------------------------------------- 3. error codes and warnings


async def test_error_codes_and_hints_land_in_the_sync_state(e2e: E2E, tmp_path: Path) -> None:
    rogue = EwsServer(self_signed=True)
    await rogue.start(tmp_path / "rogue")
    old = EwsServer(version="2013", ca=e2e.ews.ca)  # trusted: same CA as the module's server
    await old.start(tmp_path / "old")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    e2e.env["TEST_WRONG_PASSWORD"] = "not-the-password"
    try:
        await e2e.apply(
            "syncs:" + syncs(e2e.ews)
            + syncs(e2e.ews, "globex-ews", "globex", password_env="TEST_WRONG_PASSWORD")
            + syncs(e2e.ews, "initech-ews", "initech", url=rogue.url)
            + syncs(e2e.ews, "umbrella-ews", "umbrella",
                    url=f"https://127.0.0.1:{closed}/EWS/Exchange.asmx")
            + syncs(e2e.ews, "hooli-ews", "hooli", url=old.url)
        )
        ok, ghost, denied = e2e.mailbox("ok"), e2e.mailbox("ghost", register=False), \
            e2e.mailbox("denied")
        busy = e2e.mailbox("busy")
        e2e.ews.impersonation_denied.add(denied.lower())
        e2e.ews.script("CreateItem", busy, back_off_ms=600_000)
        rogue.add_mailbox("tls@acme.test")
        hooli = old.add_mailbox("hooli@acme.test")
        await e2e.publish([
            absence("a-ok", 1, ok), absence("a-ghost", 1, ghost),
            absence("a-denied", 1, denied), absence("a-busy", 1, busy),
            absence("g-1", 1, e2e.mailbox("globex"), tenant="globex"),
            absence("i-1", 1, "tls@acme.test", tenant="initech"),
            absence("u-1", 1, "unreachable@acme.test", tenant="umbrella"),
            absence("h-1", 1, hooli, tenant="hooli"),
        ])
        worker = e2e.start()
        await e2e.wait_settled(8, waiting=frozenset({"server_unreachable", "throttled"}))

        async def retried() -> bool:  # the unreachable server is retried, not given up
            return int((await e2e.items())["umbrella-ews/u-1"]["attempts"]) >= 2

        await wait_until(retried, timeout=20)
        await e2e.stop(worker)
        shown = json.loads(await e2e.cli("config", "show", "hooli-ews"))
    finally:
        await rogue.stop()
        await old.stop()

    rows = await e2e.items()
    assert rows["acme-ews/a-ok"]["status"] == "synced"
    expected = {
        "acme-ews/a-ghost": ("mailbox_not_found", ghost),
        "acme-ews/a-denied": ("access_denied", "ApplicationImpersonation"),
        "globex-ews/g-1": ("auth_failed", e2e.ews.username),
        "initech-ews/i-1": ("tls_untrusted_certificate", "ABSENCE_SYNC_CA_BUNDLE"),
    }
    for key, (code, words) in expected.items():
        row = rows[key]
        assert (row["status"], row["last_error_code"], row["attempts"]) == ("failed", code, 1), key
        assert words in row["last_error_hint"], key
    assert "management scope" in rows["acme-ews/a-denied"]["last_error_hint"]
    throttled = rows["acme-ews/a-busy"]
    assert (throttled["status"], throttled["last_error_code"]) == ("pending", "throttled")
    assert "ErrorServerBusy" in throttled["last_error_hint"]
    assert throttled["attempts"] == 1  # not before the server's back-off of ten minutes
    waited = (throttled["next_attempt_at"] - throttled["updated_at"]).total_seconds()
    assert 590 <= waited <= 660
    unreachable = rows["umbrella-ews/u-1"]
    assert (unreachable["status"], unreachable["last_error_code"]) == ("pending",
                                                                       "server_unreachable")
    assert rows["hooli-ews/h-1"]["status"] == "synced"
    [warning] = shown["warnings"]
    assert "Exchange Server 2013" in warning and "out of support" in warning
    log = "\n".join(w.output() for w in e2e.workers)
    assert "exchange server out of support" in log
    assert "not-the-password" not in log and e2e.ews.password not in log
    assert rogue.requests == []


# ---------------------------------------------------------------- 4. crash


async def test_sigkill_mid_way_leaves_exactly_one_item_per_absence(e2e: E2E) -> None:
    """EWS has no idempotency key: the items a killed worker wrote without recording
    them are found again by their mark and adopted, never written twice."""
    await e2e.apply("syncs:" + syncs(e2e.ews))
    boxes = [e2e.mailbox(f"crash{n}") for n in range(8)]
    docs = [
        absence(f"a-{n:03}", 1, boxes[n % len(boxes)],
                start=(f"2027-02-{n % 28 + 1:02}", "am"), end=(f"2027-02-{n % 28 + 1:02}", "pm"))
        for n in range(160)
    ]
    await e2e.publish(docs)
    e2e.ews.latency = 0.1
    env = {"ABSENCE_SYNC_REQUEST_TIMEOUT_SECONDS": "3", "ABSENCE_SYNC_LEASE_SECONDS": "7"}

    def written() -> int:
        return sum(len(v) for box in boxes for v in e2e.by_mark(box).values())

    try:
        worker = e2e.start(**env)

        async def some_written() -> bool:
            return written() >= 30

        await wait_until(some_written, timeout=40, interval=0.005)
        worker.proc.kill()
        worker.proc.wait(10)
        assert written() < len(docs), "the worker finished before it could be killed"
        worker = e2e.start(**env)
        await e2e.wait_settled(len(docs), timeout=90)
    finally:
        e2e.ews.latency = 0.0
    await e2e.stop(worker)
    # usually a few creates were caught in flight by the kill and adopted ("adopted
    # event written before a crash" in the log); the exact end state is what must hold

    counts = {k: len(v) for box in boxes for k, v in e2e.by_mark(box).items()}
    assert counts == {mark(f"a-{n:03}"): 1 for n in range(160)}, {
        k: v for k, v in counts.items() if v != 1
    }
    rows = await e2e.items()
    assert {r["status"] for r in rows.values()} == {"synced"}
    for r in rows.values():
        assert r["event_id"] in e2e.ews.items[r["mailbox"].lower()]
