"""Resync beside the live worker, as operators run it: the console script
against a CalDAV server (Radicale), and the live group replayed from the
beginning with the standard Kafka means."""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from consumer import caldav_tools, store
from consumer.providers.base import ProviderContext
from consumer.providers.caldav import CalDAVProvider
from consumer.providers.memory import MemoryCalendar
from consumer.radicale_server import RadicaleServer
from consumer.settings import Settings
from tests.conftest import Publisher, event, settings_env, wait_until
from tests.harness import apply, settled, sync_config, worker
from tests.resync_support import SCRIPT, committed, configs, last_json, publish, run_cli
from tests.workerproc import WorkerProcess

MAILBOXES = ["ann@acme.example", "bob@acme.example", "eve@acme.example"]


@pytest.fixture
def radicale(tmp_path: Path) -> Iterator[RadicaleServer]:
    with RadicaleServer.start(tmp_path / "dav") as server:
        yield server


async def _caldav(
    settings: Settings, pool: asyncpg.Pool, radicale: RadicaleServer
) -> CalDAVProvider:
    config = sync_config(
        "acme-dav", provider_settings={"url": radicale.url.rstrip("/") + "/{email}/calendar/"}
    )
    await apply(pool, config)
    caldav = CalDAVProvider.from_config(config, ProviderContext(settings))
    assert isinstance(caldav, CalDAVProvider)
    for mailbox in MAILBOXES:
        await caldav_tools.ensure_calendar(caldav, mailbox)
    return caldav


async def _held(caldav: CalDAVProvider) -> Counter[str]:
    """Absence id -> events of ours in the calendars."""
    found: Counter[str] = Counter()
    for mailbox in MAILBOXES:
        for listed in await caldav_tools.list_events(caldav, mailbox):
            assert listed["mark"] is not None
            found[listed["mark"].rsplit(":", 1)[-1]] += 1
    return found


def _done(pool: asyncpg.Pool) -> Any:
    """The latest job's marked pairs are all done."""
    async def check() -> bool:
        job = await pool.fetchval("SELECT id FROM resync_jobs ORDER BY created_at DESC LIMIT 1")
        return (await store.resync_outcomes(pool, job)).outstanding == 0

    return check


async def test_cli_beside_the_live_worker_dry_run_plain_and_force(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool, radicale: RadicaleServer,
    tmp_path: Path,
) -> None:
    caldav = await _caldav(settings, pool, radicale)
    wanted = {f"abs-{i}" for i in range(12)}
    for i in range(15):
        status = "approved" if i < 12 else "cancelled"
        await publisher.send(event(f"abs-{i}", 1, status=status, email=MAILBOXES[i % 3]))
    await publisher.flush()
    live = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        await wait_until(lambda: settled(pool, 15), timeout=120)
        assert await _held(caldav) == Counter(dict.fromkeys(wanted, 1))

        code, out, err = await run_cli(settings, "resync", "--tenant", "acme", "--dry-run",
                                       "--json")
        assert code == 0, err
        assert last_json(out) == {"read": 15, "in_scope": 12, "marked": 0, "written": 0,
                                  "unchanged": 0, "failed": 0, "dry_run": True}

        # an employee deletes three events by hand
        gone = ["abs-0", "abs-4", "abs-8"]
        for absence_id in gone:
            row = await pool.fetchrow(
                "SELECT mailbox, event_id FROM sync_items WHERE absence_id = $1", absence_id
            )
            assert await caldav.delete(row["mailbox"], row["event_id"])

        # plain: the recorded content is unchanged, so nothing is written
        code, out, err = await run_cli(settings, "resync", "--tenant", "acme", "--json")
        assert code == 0, err
        assert last_json(out)["marked"] == 12
        await wait_until(_done(pool), timeout=60)
        assert await _held(caldav) == Counter(dict.fromkeys(wanted - set(gone), 1))

        # forced: every event rewritten, the deleted ones back exactly once
        code, out, err = await run_cli(settings, "resync", "--config", "acme-dav", "--force",
                                       "--json")
        assert code == 0, err
        assert last_json(out)["marked"] == 12
        await wait_until(_done(pool), timeout=60)
        assert await _held(caldav) == Counter(dict.fromkeys(wanted, 1))
        outcomes = await pool.fetch("SELECT DISTINCT resync_outcome FROM sync_items"
                                    " WHERE resync_job IS NOT NULL")
        assert [r["resync_outcome"] for r in outcomes] == ["written"]
    finally:
        assert live.terminate() == 0
        await caldav.close()


async def test_cli_wait_writes_itself_reports_failures_and_draws_a_bar(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool, radicale: RadicaleServer,
) -> None:
    """No worker runs: --wait writes with a dispatcher of its own; writes to a
    mailbox without a calendar fail, which the exit status says."""
    caldav = await _caldav(settings, pool, radicale)
    for i in range(6):
        await publisher.send(event(f"abs-{i}", 1, email=MAILBOXES[i % 3]))
    for i in range(2):
        await publisher.send(event(f"ghost-{i}", 1, email="ghost@acme.example",
                                   establishment_id="lyon"))
    await publisher.flush()
    try:
        code, out, err = await _run_on_a_terminal(settings, "resync", "--tenant", "acme",
                                                  "--wait", "--json")
        assert code == 3, err
        assert last_json(out) == {"read": 8, "in_scope": 8, "marked": 8, "written": 6,
                                  "unchanged": 0, "failed": 2, "dry_run": False}
        assert "reading records" in err and "writing events" in err and "8/8" in err
        assert await _held(caldav) == Counter({f"abs-{i}": 1 for i in range(6)})
        codes = await pool.fetch("SELECT last_error_code FROM sync_items WHERE status = 'failed'")
        assert [r["last_error_code"] for r in codes] == ["mailbox_not_found"] * 2

        code, out, err = await run_cli(settings, "resync", "--tenant", "acme", "--wait",
                                       "--establishment", "paris")
        assert code == 0, err
        assert "written 0, unchanged 6, failed 0" in out
    finally:
        await caldav.close()


async def _run_on_a_terminal(settings: Settings, *args: str) -> tuple[int, str, str]:
    """The console script with stderr on a pseudo-terminal (stdout a pipe)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSENCE_SYNC_")}
    env.update(settings_env(settings))
    env["COLUMNS"] = "100"
    leader, follower = os.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPT), *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=follower,
        )
        os.close(follower)
        out, _ = await asyncio.wait_for(proc.communicate(), 300)
        await asyncio.to_thread(reader.join, 10)
    finally:
        os.close(leader)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


async def test_replaying_the_live_group_from_the_beginning_writes_nothing(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """Operators rewind the live group to the earliest offsets (with
    `kafka-consumer-groups --reset-offsets`, or a consumer of the group
    committing them): the worker re-reads everything, every event is stale,
    and no calendar request is made."""
    await apply(pool, *configs())
    topic = await publish(publisher, 300, seed=13)
    calendar = MemoryCalendar()
    async with worker(_roomy(settings), calendar=calendar):
        await wait_until(lambda: _synced(pool, len(topic.latest)), timeout=120)
        await wait_until(lambda: _consumed_all(settings, topic.records), timeout=60)
    calls = len(calendar.calls)
    assert calls > 0
    ends = await committed(settings, settings.group_id)

    # rewind the live group as a consumer of it does: join, commit the earliest
    # offsets of every partition, leave (tansu keeps a stopped member in the
    # group, so the tools' inactive-group reset is refused there)
    reset = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                             group_id=settings.group_id, enable_auto_commit=False)
    reset.subscribe([settings.topic])
    await reset.start()
    try:
        async with asyncio.timeout(60):
            while len(reset.assignment()) < len(ends):
                await reset.getmany(timeout_ms=200)
        await reset.commit(dict.fromkeys(reset.assignment(), 0))
    finally:
        await reset.stop()
    assert set((await committed(settings, settings.group_id)).values()) == {0}

    async with worker(settings, calendar=calendar) as running:
        await wait_until(lambda: _consumed_all(settings, topic.records), timeout=120)
        await wait_until(lambda: _synced(pool, len(topic.latest)), timeout=60)
        events = running.metrics.events
        assert events.labels("stale")._value.get() == topic.records - topic.invalid
        assert events.labels("applied")._value.get() == 0
    assert len(calendar.calls) == calls


def _roomy(settings: Settings) -> Settings:
    return settings.model_copy(update={"tenant_concurrency": 64, "dispatch_concurrency": 256})


async def _synced(pool: asyncpg.Pool, absences: int) -> bool:
    count = await pool.fetchval("SELECT count(*) FROM absences")
    return bool(count == absences and await settled(pool))


async def _consumed_all(settings: Settings, records: int) -> bool:
    offsets = await committed(settings, settings.group_id)
    return sum(o or 0 for o in offsets.values()) == records

