"""Crash safety with the real worker process (docs/guarantees.md, 'Crash safety').

The worker is SIGKILLed at random moments while events stream in (so kills
land between the database commit and the offset commit, and between a
calendar write and its mapping update), then restarted; the end state must
be exact: every absence at its latest version, exactly one calendar event
per wanted absence, none for the others.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumer import caldav_tools
from consumer.providers.base import ProviderContext
from consumer.providers.caldav import CalDAVProvider
from consumer.radicale_server import RadicaleServer
from consumer.settings import Settings
from tests.conftest import Publisher, event, wait_until
from tests.harness import apply, settled, sync_config
from tests.workerproc import WorkerProcess


async def _versions(pool: asyncpg.Pool) -> dict[str, int]:
    return {r["id"]: r["version"] for r in await pool.fetch("SELECT id, version FROM absences")}


async def test_sigkill_during_intake_leaves_exact_state(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    rng = random.Random(7)
    expected: dict[str, int] = {}
    chunks: list[list[dict[str, Any]]] = []
    for chunk in range(4):
        docs = []
        for i in range(750):
            absence_id = f"abs-{rng.randrange(400)}"
            version = chunk * 1000 + i + 1
            expected[absence_id] = version
            docs.append(event(absence_id, version))
        chunks.append(docs)
    worker = WorkerProcess(settings.model_copy(update={"batch_size": 100}), tmp_path / "w.log")
    try:
        for docs in chunks:
            for doc in docs:
                await publisher.send(doc)
            await publisher.flush()
            await asyncio.sleep(rng.uniform(0.5, 4.0))  # a random moment to kill at
            worker.kill()
            worker = WorkerProcess(settings, tmp_path / "w.log")
        await wait_until(lambda: _matches(pool, expected), timeout=120)
    finally:
        if worker.alive():
            assert worker.terminate() == 0
    assert await _versions(pool) == expected


async def _matches(pool: asyncpg.Pool, expected: dict[str, int]) -> bool:
    return await _versions(pool) == expected


async def test_sigterm_drains_and_exits_cleanly(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    for i in range(200):
        await publisher.send(event(f"abs-{i}", 1))
    await publisher.flush()
    worker = WorkerProcess(settings.model_copy(update={"batch_size": 20}), tmp_path / "w.log")

    async def some() -> bool:
        return bool(await pool.fetchval("SELECT count(*) FROM absences"))

    await wait_until(some, timeout=60)
    loop = asyncio.get_running_loop()
    started = loop.time()
    code = await asyncio.to_thread(worker.terminate, 30)
    assert code == 0
    assert loop.time() - started < settings.shutdown_timeout_seconds * 3
    # what was recorded was committed: a fresh worker finishes the rest
    worker = WorkerProcess(settings, tmp_path / "w2.log")
    try:
        await wait_until(lambda: _matches(pool, {f"abs-{i}": 1 for i in range(200)}), 60)
        await wait_until(_started(worker), 60)
    finally:
        assert worker.terminate() == 0
    for name in ("w.log", "w2.log"):
        assert "Traceback" not in (tmp_path / name).read_text()


def _started(worker: WorkerProcess) -> Any:
    async def check() -> bool:
        return worker.started()

    return check


@pytest.fixture
def radicale(tmp_path: Path) -> Any:
    with RadicaleServer.start(tmp_path / "dav") as server:
        yield server


MAILBOXES = [f"user{i}@acme.com" for i in range(8)]


def _final_event(rng: random.Random, absence_id: str, version: int) -> dict[str, Any]:
    status = rng.choice(["approved", "approved", "approved", "pending", "cancelled", "denied"])
    email = rng.choice(MAILBOXES)
    day = 1 + rng.randrange(20)
    half = rng.random() < 0.3
    doc = event(
        absence_id, version, status=status, email=email,
        start=(f"2026-12-{day:02d}", "pm" if half else "am"),
        end=(f"2026-12-{day + rng.randrange(3):02d}", "pm"),
    )
    if rng.random() < 0.1:
        doc = event(absence_id, version, deleted=True)
    return doc


async def test_sigkill_during_calendar_writes_no_duplicate_no_loss(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool, tmp_path: Path,
    radicale: RadicaleServer,
) -> None:
    config = sync_config(provider_settings={"url": radicale.url.rstrip("/") + "/{email}/calendar/"})
    await apply(pool, config)
    caldav = CalDAVProvider.from_config(config, ProviderContext(settings))
    assert isinstance(caldav, CalDAVProvider)
    for mailbox in MAILBOXES:
        await caldav_tools.ensure_calendar(caldav, mailbox)
    rng = random.Random(11)
    latest: dict[str, dict[str, Any]] = {}
    chunks: list[list[dict[str, Any]]] = []
    version = 0
    for _ in range(4):
        docs = []
        for _ in range(500):
            version += 1
            absence_id = f"abs-{rng.randrange(150)}"
            doc = _final_event(rng, absence_id, version)
            latest[absence_id] = doc
            docs.append(doc)
        chunks.append(docs)
    fast = settings.model_copy(
        update={"lease_seconds": 3, "request_timeout_seconds": 1, "batch_size": 50}
    )
    worker = WorkerProcess(fast, tmp_path / "w.log")
    try:
        for docs in chunks:
            for doc in docs:
                await publisher.send(doc)
            await publisher.flush()
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            worker.kill()
            worker = WorkerProcess(fast, tmp_path / "w.log")
        await wait_until(lambda: settled(pool, len(latest)), timeout=180)
    finally:
        if worker.alive():
            assert worker.terminate() == 0
    wanted = {
        a: d for a, d in latest.items()
        if d["type"] == "absence.upserted" and d["data"]["status"] in ("approved", "pending")
    }
    found: Counter[tuple[str, str]] = Counter()
    for mailbox in MAILBOXES:
        for listed in await caldav_tools.list_events(caldav, mailbox):
            assert listed["mark"] is not None
            found[(mailbox, listed["mark"].rsplit(":", 1)[-1])] += 1
    await caldav.close()
    duplicates = {k: n for k, n in found.items() if n > 1}
    assert duplicates == {}
    assert set(found) == {(d["data"]["employee"]["email"], a) for a, d in wanted.items()}
