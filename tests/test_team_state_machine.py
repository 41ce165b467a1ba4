"""The sync state machine (tests/test_state_machine.py) with a team calendar:
random versions, redeliveries, reorderings, dispatcher runs and crashes right
after a calendar write must end with exactly one employee event and one team
event per wanted absence, with the latest content, and none for the others."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
from hypothesis import HealthCheck, settings

from consumer import store
from consumer.embedded import EmbeddedPostgres
from consumer.events import parse_event
from consumer.render import DesiredEvent, Mark, render, render_team
from consumer.secrets import SecretBox
from tests.conftest import dsn_for
from tests.harness import sync_config
from tests.test_state_machine import SyncMachine, _db

TEAM = "team@acme.com"
TEAM_CONFIG = sync_config(sync_pending=False, team_calendar={"address": TEAM})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def team_machine_dsn(postgres: EmbeddedPostgres) -> str:
    async def create() -> None:
        conn = await asyncpg.connect(postgres.dsn)
        try:
            await conn.execute("DROP DATABASE IF EXISTS team_state_machine")
            await conn.execute("CREATE DATABASE team_state_machine")
        finally:
            await conn.close()

    runner = asyncio.Runner()
    runner.run(create())
    runner.close()
    return dsn_for(postgres.dsn, "team_state_machine")


class TeamSyncMachine(SyncMachine):
    async def _setup(self) -> asyncpg.Pool:
        pool = await store.connect(_db["dsn"])
        await store.migrate(pool)
        await pool.execute("TRUNCATE sync_items, absences, sync_log, sync_configs CASCADE")
        await store.apply_configs(pool, [TEAM_CONFIG], SecretBox(None))
        return pool

    def _check_calendar(self) -> None:
        expected: dict[Mark, DesiredEvent] = {}
        for doc in self.latest.values():
            absence = parse_event(json.dumps(doc).encode()).absence
            for desired in (render(absence, TEAM_CONFIG),
                            render_team(absence, TEAM_CONFIG, TEAM)):
                if desired is not None:
                    expected[desired.mark] = desired
        stored = self.calendar.all()
        marks = [s.event.mark for s in stored]
        assert len(marks) == len(set(marks)), "a duplicate event"
        assert {s.event.mark: s.event for s in stored} == expected
        assert all(s.event.mailbox == TEAM for s in stored if s.event.mark.team)


def test_team_sync_state_machine(team_machine_dsn: str) -> None:
    _db["dsn"] = team_machine_dsn
    TeamSyncMachine.TestCase.settings = settings(
        max_examples=25, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    TeamSyncMachine.TestCase().runTest()
