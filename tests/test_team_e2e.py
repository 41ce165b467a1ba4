"""Team calendars with the real worker process against a real CalDAV server (Radicale):
SIGKILLed at random moments while events stream in and restarted, the worker must
leave the team collection with exactly one event per wanted absence (creates
caught in flight adopted by their team mark), besides each employee's own."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumer import caldav_tools
from consumer.providers.base import ProviderContext
from consumer.providers.caldav import CalDAVProvider
from consumer.radicale_server import RadicaleServer
from consumer.render import Mark
from consumer.settings import Settings
from tests.conftest import Publisher, event, wait_until
from tests.harness import apply, settled, sync_config
from tests.workerproc import WorkerProcess

TEAM = "team-paris@acme.com"
MAILBOXES = [f"user{i}@acme.com" for i in range(5)]
MISSING = "nobody@acme.com"  # no calendar collection: the employee's writes fail


@pytest.fixture
def radicale(tmp_path: Path) -> Iterator[RadicaleServer]:
    with RadicaleServer.start(tmp_path / "dav") as server:
        yield server


def _final_event(rng: random.Random, absence_id: str, version: int) -> dict[str, Any]:
    if rng.random() < 0.1:
        return event(absence_id, version, deleted=True)
    status = rng.choice(["approved", "approved", "approved", "pending", "cancelled", "denied"])
    email = rng.choice([*MAILBOXES, MISSING])
    day = 1 + rng.randrange(20)
    return event(
        absence_id, version, status=status, email=email,
        start=(f"2026-12-{day:02d}", "pm" if rng.random() < 0.3 else "am"),
        end=(f"2026-12-{day + rng.randrange(3):02d}", "pm"),
        display_name=f"Employee {absence_id}",
    )


async def _marks(caldav: CalDAVProvider, mailbox: str) -> Counter[str]:
    found: Counter[str] = Counter()
    for listed in await caldav_tools.list_events(caldav, mailbox):
        assert listed["mark"] is not None
        found[listed["mark"]] += 1
    return found


async def test_sigkill_during_team_writes_leaves_one_team_event_per_wanted_absence(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool, tmp_path: Path,
    radicale: RadicaleServer,
) -> None:
    config = sync_config(
        provider_settings={"url": radicale.url.rstrip("/") + "/{email}/calendar/"},
        team_calendar={"address": TEAM}, category="Team",
    )
    await apply(pool, config)
    caldav = CalDAVProvider.from_config(config, ProviderContext(settings))
    assert isinstance(caldav, CalDAVProvider)
    for mailbox in [*MAILBOXES, TEAM]:
        await caldav_tools.ensure_calendar(caldav, mailbox)
    rng = random.Random(13)
    latest: dict[str, dict[str, Any]] = {}
    chunks: list[list[dict[str, Any]]] = []
    version = 0
    for _ in range(3):
        docs = []
        for _ in range(300):
            version += 1
            absence_id = f"abs-{rng.randrange(100)}"
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
        await wait_until(lambda: settled(pool, 2 * len(latest)), timeout=180)
    finally:
        if worker.alive():
            assert worker.terminate() == 0
    try:
        wanted = {
            a: d for a, d in latest.items()
            if d["type"] == "absence.upserted" and d["data"]["status"] in ("approved", "pending")
        }
        team = await _marks(caldav, TEAM)
        assert {k: n for k, n in team.items() if n > 1} == {}
        expected = {Mark(config.id, a, team=True).value for a in wanted}
        if set(team) != expected:  # say what the work table thinks of the difference
            odd = sorted(Mark.parse(m).absence_id  # type: ignore[union-attr]
                         for m in set(team) ^ expected)
            rows = await pool.fetch(
                "SELECT absence_id, target, status, last_error_code, last_error_message,"
                " event_id, mailbox, attempts FROM sync_items WHERE absence_id = ANY($1)", odd)
            log = (tmp_path / "w.log").read_text(errors="replace")
            lines = [line for line in log.splitlines() if any(a in line for a in odd)]
            raise AssertionError(f"team calendar differs for {odd}: items {[dict(r) for r in rows]}"
                                 f"; worker log lines: {lines[-40:]}")
        for mailbox in MAILBOXES:
            own = await _marks(caldav, mailbox)
            assert {k: n for k, n in own.items() if n > 1} == {}
            assert set(own) == {
                Mark(config.id, a).value for a, d in wanted.items()
                if d["data"]["employee"]["email"] == mailbox
            }
        listed = await caldav_tools.list_events(caldav, TEAM)
        for shown in listed:
            absence_id = Mark.parse(shown["mark"] or "").absence_id  # type: ignore[union-attr]
            assert shown["summary"] == f"Employee {absence_id}: Absent"
            assert shown["transp"] == "TRANSPARENT"
            assert shown["classification"] in (None, "PUBLIC")
            assert shown["categories"] == "Team"
        # the employee without a calendar: their items failed, the team has their absences
        failed = await pool.fetch(
            "SELECT absence_id, target, last_error_code FROM sync_items WHERE status = 'failed'"
        )
        missing = {a for a, d in wanted.items() if d["data"]["employee"]["email"] == MISSING}
        assert {(r["absence_id"], r["target"]) for r in failed} == {
            (a, "calendar") for a in missing}
        assert {r["last_error_code"] for r in failed} <= {"mailbox_not_found"}
        assert {Mark(config.id, a, team=True).value for a in missing} <= set(team)
    finally:
        await caldav.close()
