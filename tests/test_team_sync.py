"""Team calendars end to end with the real store and dispatcher (in-memory calendar):
every absence the configuration wants is also written to its team calendar, as its
own work item (target `team`), whatever the employee's calendar does."""

from __future__ import annotations

from typing import Any

import asyncpg

from consumer import store
from consumer.config import parse_sync
from consumer.providers.memory import MemoryCalendar, MemoryProvider, StoredEvent
from consumer.render import Mark
from consumer.secrets import SecretBox
from consumer.settings import Settings
from consumer.store import admin as admin_store
from tests.admin_world import Calendars, admin_settings, record, settle
from tests.conftest import Publisher, event, wait_until
from tests.harness import apply, settled, sync_config, worker
from tests.provider_contract import desired
from tests.test_feeds import doc

TEAM = "team-paris@acme.test"
BASE: dict[str, Any] = {
    "id": "acme-dav", "tenant": "acme", "provider": "caldav",
    "caldav": {"url": "https://dav.example.com/{email}/calendar/"},
    "category": "HR", "private": True,
    "team_calendar": {"address": "Team-Paris@Acme.test"},
}


def in_box(calendars: Calendars, mailbox: str) -> dict[str, StoredEvent]:
    """The events of one mailbox by absence id."""
    return {e.event.mark.absence_id: e for e in calendars.memory.events[mailbox].values()}


def team(calendars: Calendars, mailbox: str = TEAM) -> dict[str, tuple[str, str]]:
    return {a: (e.event.subject, e.event.show_as) for a, e in in_box(calendars, mailbox).items()}


async def items(pool: asyncpg.Pool, config_id: str = "acme-dav") -> dict[tuple[str, str], Any]:
    rows = await pool.fetch(
        "SELECT * FROM sync_items WHERE config_id = $1", config_id
    )
    return {(r["absence_id"], r["target"]): r for r in rows}


async def apply_doc(pool: asyncpg.Pool, raw: dict[str, Any]) -> dict[str, str]:
    return await store.apply_configs(pool, [parse_sync("t", raw)], SecretBox(None))


async def test_every_wanted_absence_reaches_the_team_calendar_whatever_the_employees_do(
    dsn: str, pool: asyncpg.Pool
) -> None:
    settings = admin_settings(dsn)
    calendars = Calendars(settings, unknown={"ghost@acme.test"})
    assert await apply_doc(pool, BASE) == {"acme-dav": "created"}
    await record(pool, [
        doc("jane", display_name="Jane Doe"),
        doc("ghost", email="ghost@acme.test", display_name=None),  # no such mailbox
        doc("john", email="john@acme.test", display_name="John Roe", status="pending"),
        doc("denied", email="ann@acme.test", status="denied"),
        doc("gone", email="ann@acme.test", deleted=True),
    ])
    await settle(pool, settings, calendars)

    assert team(calendars) == {
        "jane": ("Jane Doe: Absent", "free"),
        "ghost": ("ghost: Absent", "free"),  # the e-mail's local part names them
        "john": ("John Roe: Absent", "free"),  # pending: still free on the team calendar
    }
    for stored in in_box(calendars, TEAM).values():
        written = stored.event
        assert written.private is False and written.category == "HR"
        assert written.mark == Mark("acme-dav", written.mark.absence_id, team=True)
        assert written.mark.value.startswith("absence-sync-team:acme-dav:")
        assert stored.transaction_id is not None and "/team/" in stored.transaction_id
    # the employees' own calendars are written as before (private, busy or tentative)
    assert in_box(calendars, "jane@acme.test")["jane"].event.private is True
    assert in_box(calendars, "john@acme.test")["john"].event.show_as == "tentative"
    assert in_box(calendars, "ghost@acme.test") == {}

    state = {k: r["status"] for k, r in (await items(pool)).items()}
    assert state == {
        ("jane", "calendar"): "synced", ("jane", "team"): "synced",
        ("ghost", "calendar"): "failed", ("ghost", "team"): "synced",
        ("john", "calendar"): "synced", ("john", "team"): "synced",
        ("denied", "calendar"): "deleted", ("denied", "team"): "deleted",
        ("gone", "calendar"): "deleted", ("gone", "team"): "deleted",
    }
    team_row = (await items(pool))[("jane", "team")]
    assert team_row["mailbox"] == TEAM and team_row["event_id"] == next(
        e.id for e in calendars.memory.events[TEAM].values()
        if e.event.mark.absence_id == "jane"
    )

    # monitoring: items carry their target; the history names it too
    page, more = await admin_store.items_page(
        pool, "acme", "acme-dav", state=None, after=None, limit=100, team_address=TEAM
    )
    assert not more
    assert [(i.absence_id, i.target) for i in page][:2] == [
        ("denied", "calendar"), ("denied", "team")]
    ghost = {i.target: i for i in page if i.absence_id == "ghost"}
    assert ghost["calendar"].state == "failed" and ghost["calendar"].code == "mailbox_not_found"
    assert ghost["team"].state == "synced" and ghost["team"].mailbox == TEAM
    logged = await pool.fetch(
        "SELECT target, operation, mailbox FROM sync_log WHERE absence_id = 'jane'"
        " ORDER BY target"
    )
    assert [(r["target"], r["operation"], r["mailbox"]) for r in logged] == [
        ("calendar", "create", "jane@acme.test"), ("team", "create", TEAM)]
    by_target = await store.status_counts_by_target(pool, "acme-dav")
    assert by_target == {"calendar": {"synced": 2, "failed": 1, "deleted": 2},
                         "team": {"synced": 3, "deleted": 2}}
    summary = (await admin_store.summaries(pool, "acme", ["acme-dav"]))["acme-dav"]
    assert summary.by_target["team"]["synced"] == 3
    assert summary.counts["synced"] == 5


async def test_items_pages_run_through_both_targets_of_an_absence(
    dsn: str, pool: asyncpg.Pool
) -> None:
    settings = admin_settings(dsn)
    calendars = Calendars(settings)
    await apply_doc(pool, BASE)
    await record(pool, [doc(f"abs-{i}", email=f"u{i}@acme.test") for i in range(3)])
    await settle(pool, settings, calendars)
    seen: list[tuple[str, str]] = []
    after: tuple[str, str | None] | None = None
    while True:
        page, more = await admin_store.items_page(
            pool, "acme", "acme-dav", state=None, after=after, limit=4
        )
        seen += [(i.absence_id, i.target) for i in page]
        if not more:
            break
        after = (page[-1].absence_id, page[-1].target)
    assert seen == [(f"abs-{i}", t) for i in range(3) for t in ("calendar", "team")]
    # a cursor naming an absence only (made before targets) goes on after all its items
    page, _ = await admin_store.items_page(
        pool, "acme", "acme-dav", state=None, after=("abs-0", None), limit=10
    )
    assert page[0].absence_id == "abs-1"


async def test_pending_then_approved_then_cancelled_follows_on_the_team_calendar(
    dsn: str, pool: asyncpg.Pool
) -> None:
    settings = admin_settings(dsn)
    calendars = Calendars(settings)
    await apply_doc(pool, {**BASE, "hide_labels": False})
    await record(pool, [doc("jane", status="pending", name="Paid leave")])
    await settle(pool, settings, calendars)
    assert team(calendars) == {"jane": ("Jane Doe: Paid leave", "free")}
    assert in_box(calendars, "jane@acme.test")["jane"].event.show_as == "tentative"
    calls = len(calendars.memory.calls)

    await record(pool, [doc("jane", version=2, status="approved", name="Paid leave")])
    await settle(pool, settings, calendars)
    # the team event is the same on approval (free either way): only the employee's changes
    assert calendars.memory.calls[calls:] == [("update", "jane@acme.test")]
    assert in_box(calendars, "jane@acme.test")["jane"].event.show_as == "busy"
    assert team(calendars) == {"jane": ("Jane Doe: Paid leave", "free")}

    await record(pool, [doc("jane", version=3, status="cancelled", name="Paid leave")])
    await settle(pool, settings, calendars)
    assert calendars.memory.all() == []
    assert {k: r["status"] for k, r in (await items(pool)).items()} == {
        ("jane", "calendar"): "deleted", ("jane", "team"): "deleted"}


async def test_a_type_that_stops_being_wanted_leaves_the_team_calendar(
    dsn: str, pool: asyncpg.Pool
) -> None:
    settings = admin_settings(dsn)
    calendars = Calendars(settings)
    await apply_doc(pool, BASE)
    await record(pool, [
        doc("sick", account="sick-leave", name="Sick leave"),
        doc("course", email="john@acme.test", display_name="John Roe", account="training"),
    ])
    await settle(pool, settings, calendars)
    assert sorted(team(calendars)) == ["course", "sick"]

    rules = {**BASE, "types": {"sick-leave": {"skip": True},
                               "training": {"label": "Training"}}}
    assert await apply_doc(pool, rules) == {"acme-dav": "updated"}
    await settle(pool, settings, calendars)
    assert team(calendars) == {"course": ("John Roe: Training", "free")}
    assert in_box(calendars, "jane@acme.test") == {}


async def test_a_new_team_address_moves_the_team_events_and_removing_it_deletes_them(
    dsn: str, pool: asyncpg.Pool
) -> None:
    settings = admin_settings(dsn)
    calendars = Calendars(settings)
    await apply_doc(pool, BASE)
    await record(pool, [doc("jane"), doc("john", email="john@acme.test", display_name="John")])
    await settle(pool, settings, calendars)
    assert sorted(team(calendars)) == ["jane", "john"]
    calls = len(calendars.memory.calls)

    lyon = "team-lyon@acme.test"
    assert await apply_doc(pool, {**BASE, "team_calendar": {"address": lyon}}) == {
        "acme-dav": "updated"}
    await settle(pool, settings, calendars)
    assert team(calendars) == {}  # the old team calendar holds nothing of ours any more
    assert team(calendars, lyon) == {"jane": ("Jane Doe: Absent", "free"),
                                     "john": ("John: Absent", "free")}
    moved = calendars.memory.calls[calls:]
    # employee calendars untouched; per team event one delete at the old, one create at the new
    assert sorted(moved) == sorted([("delete", TEAM), ("create", lyon)] * 2)
    assert {r["mailbox"] for k, r in (await items(pool)).items() if k[1] == "team"} == {lyon}
    calls = len(calendars.memory.calls)

    without = {k: v for k, v in BASE.items() if k != "team_calendar"}
    assert await apply_doc(pool, without) == {"acme-dav": "updated"}
    await settle(pool, settings, calendars)
    assert team(calendars, lyon) == {}
    assert sorted(calendars.memory.calls[calls:]) == [("delete", lyon)] * 2
    assert sorted(in_box(calendars, "jane@acme.test")) == ["jane"]
    rows = await items(pool)
    assert {k: r["status"] for k, r in rows.items() if k[1] == "team"} == {
        ("jane", "team"): "deleted", ("john", "team"): "deleted"}
    assert await pool.fetchval(
        "SELECT targets FROM sync_configs WHERE id = 'acme-dav'") == ["calendar"]
    # a new absence gets no team item while the configuration has no team calendar
    await record(pool, [doc("ann", email="ann@acme.test")])
    assert ("ann", "team") not in await items(pool)

    # given again: every known absence gets its team item back (backfill)
    assert await apply_doc(pool, BASE) == {"acme-dav": "updated"}
    await settle(pool, settings, calendars)
    assert sorted(team(calendars)) == ["ann", "jane", "john"]


async def test_resync_marks_the_team_items_and_counts_each_absence_once(
    dsn: str, pool: asyncpg.Pool
) -> None:
    settings = admin_settings(dsn)
    calendars = Calendars(settings)
    await apply_doc(pool, BASE)
    await record(pool, [doc("jane"), doc("john", email="john@acme.test")])
    await settle(pool, settings, calendars)
    # someone deleted the team events by hand: a forced resync writes them again
    calendars.memory.events[TEAM].clear()
    calls = len(calendars.memory.calls)
    pairs = [("acme-dav", "acme", "jane"), ("acme-dav", "acme", "john")]
    assert await store.mark_for_resync(pool, "job-1", pairs, force=True) == 2
    marked = await pool.fetch("SELECT target FROM sync_items WHERE resync_job = 'job-1'")
    assert sorted(r["target"] for r in marked) == ["calendar", "calendar", "team", "team"]
    assert (await store.resync_outcomes(pool, "job-1")).outstanding == 2
    await settle(pool, settings, calendars)
    assert sorted(team(calendars)) == ["jane", "john"]
    new_calls = calendars.memory.calls[calls:]
    assert new_calls.count(("create", TEAM)) == 2  # update of a vanished event re-creates
    outcomes = await store.resync_outcomes(pool, "job-1")
    assert (outcomes.written, outcomes.unchanged, outcomes.failed, outcomes.outstanding) == (
        2, 0, 0, 0)


async def test_purging_a_configuration_empties_its_team_calendar_too(
    dsn: str, pool: asyncpg.Pool
) -> None:
    settings = admin_settings(dsn)
    calendars = Calendars(settings)
    await apply_doc(pool, BASE)
    await record(pool, [doc("jane")])
    await settle(pool, settings, calendars)
    stored = await store.get_config(pool, "acme-dav")
    assert stored is not None
    assert await admin_store.start_purge(pool, stored) == 2
    await settle(pool, settings, calendars)
    assert calendars.memory.all() == []
    assert await admin_store.finish_purges(pool) == ["acme-dav"]


async def _team_intent(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval(
        "SELECT count(*) FROM sync_items WHERE target = 'team' AND intent = 'create'"
    ))


async def _team_synced(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval(
        "SELECT count(*) FROM sync_items WHERE target = 'team' AND status = 'synced'"
    ))


async def test_a_team_event_written_before_a_crash_is_adopted_not_doubled(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    """The team create landed but its outcome was never recorded: the next attempt
    finds it by the team mark (not the employee's) and keeps it."""
    await apply(pool, sync_config(team_calendar={"address": TEAM}))  # type: ignore[arg-type]
    await publisher.send(event("abs-1", 1))
    await publisher.flush()
    calendar = MemoryCalendar()
    calendar.hanging.add(TEAM)
    short = settings.model_copy(update={"lease_seconds": 1.0, "shutdown_timeout_seconds": 0.2})
    async with worker(short, calendar=calendar):
        await wait_until(lambda: _team_intent(pool))
        # the employee's calendar is not held back by the hung team calendar
        await wait_until(lambda: _calendar_synced(pool))
    # the worker stopped with the team create in flight: it landed anyway
    landed = desired(TEAM, "abs-1", mark=Mark("acme-cal", "abs-1", team=True),
                     subject="Jane Doe: Absent", show_as="free")
    calendar.hanging.clear()
    await MemoryProvider(calendar).create(landed, transaction_id="lost-in-crash")
    calendar.calls.clear()
    async with worker(short, calendar=calendar):
        await wait_until(lambda: _team_synced(pool))
        await wait_until(lambda: settled(pool, 2))
    assert len(calendar.events[TEAM]) == 1
    assert calendar.calls[0] == ("find", TEAM)
    assert ("create", TEAM) not in calendar.calls
    (kept,) = calendar.events[TEAM].values()
    assert kept.transaction_id == "lost-in-crash"  # adopted, then brought up to date
    assert kept.event.mark.team and kept.event.show_as == "free"
    assert len(calendar.events["jane.doe@acme.com"]) == 1


async def _calendar_synced(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval(
        "SELECT count(*) FROM sync_items WHERE target = 'calendar' AND status = 'synced'"
    ))


async def test_intake_queues_both_targets_and_a_hung_team_calendar_holds_nothing_back(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    await apply(pool, sync_config(team_calendar={"address": TEAM}),  # type: ignore[arg-type]
                sync_config("acme-plain"))
    for i in range(5):
        await publisher.send(event(f"abs-{i}", 1, email=f"u{i}@acme.com"))
    await publisher.flush()
    calendar = MemoryCalendar()
    calendar.hanging.add(TEAM)
    short = settings.model_copy(update={"shutdown_timeout_seconds": 0.2})
    async with worker(short, calendar=calendar):
        async def employees_done() -> bool:
            return bool(await pool.fetchval(
                "SELECT count(*) FROM sync_items WHERE target = 'calendar'"
                " AND status = 'synced'") == 10)
        await wait_until(employees_done, timeout=30)
    rows = await pool.fetch("SELECT config_id, target, count(*) AS n FROM sync_items"
                            " GROUP BY 1, 2 ORDER BY 1, 2")
    assert [(r["config_id"], r["target"], r["n"]) for r in rows] == [
        ("acme-cal", "calendar", 5), ("acme-cal", "team", 5), ("acme-plain", "calendar", 5)]
    calendar.hanging.clear()
    calendar.released.set()
    async with worker(settings, calendar=calendar):
        await wait_until(lambda: settled(pool, 15), timeout=30)
    assert len(calendar.events[TEAM]) == 5
