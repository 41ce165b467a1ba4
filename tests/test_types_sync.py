"""Per leave type rules end to end: applying a configuration whose `types` change
re-renders its absences, and the real dispatcher updates, deletes and creates the
calendar events accordingly (in-memory calendar)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import asyncpg

from consumer import store
from consumer.config import parse_sync
from consumer.secrets import SecretBox
from tests.admin_world import Calendars, admin_settings, record, settle
from tests.test_feeds import doc

BASE: dict[str, Any] = {
    "id": "acme-dav", "tenant": "acme", "provider": "caldav",
    "caldav": {"url": "https://dav.example.com/{email}/calendar/"},
}


def events(calendars: Calendars) -> dict[str, tuple[str, str, bool]]:
    return {e.event.mark.absence_id: (e.event.subject, e.event.show_as, e.event.private)
            for e in calendars.memory.all()}


async def test_changing_the_rules_rewrites_existing_events(dsn: str, pool: asyncpg.Pool) -> None:
    settings = admin_settings(dsn)
    calendars = Calendars(settings)
    box = SecretBox(None)
    assert await store.apply_configs(pool, [parse_sync("t", BASE)], box) == {
        "acme-dav": "created"}
    await record(pool, [
        doc("sick", account="sick-leave", name="Sick leave"),
        doc("course", email="john@acme.test", account="training", name="Course"),
        doc("remote", email="ann@acme.test", account="remote", name="Remote", counted=False,
            status="pending"),
    ])
    await settle(pool, settings, calendars)
    assert events(calendars) == {
        "sick": ("Absent", "busy", False),
        "course": ("Absent", "busy", False),
        "remote": ("Absent", "free", False),
    }
    writes = len(calendars.memory.calls)

    with_rules = {**BASE, "types": {
        "sick-leave": {"skip": True},
        "training": {"label": "Training", "show_as": "free"},
        "remote": {"show_as": "workingElsewhere", "private": True},
    }}
    assert await store.apply_configs(pool, [parse_sync("t", with_rules)], box) == {
        "acme-dav": "updated"}
    await settle(pool, settings, calendars)
    assert events(calendars) == {
        "course": ("Training", "free", False),
        "remote": ("Absent", "workingElsewhere", True),
    }
    assert [op for op, _ in calendars.memory.calls[writes:]].count("delete") == 1

    # the same rules again: nothing to write; a rule for a type without absences: no write
    writes = len(calendars.memory.calls)
    assert await store.apply_configs(pool, [parse_sync("t", with_rules)], box) == {
        "acme-dav": "unchanged"}
    more = {**with_rules, "types": {**with_rules["types"], "parental": {"label": "Parental"}}}
    assert await store.apply_configs(pool, [parse_sync("t", more)], box) == {
        "acme-dav": "updated"}
    await settle(pool, settings, calendars)
    assert calendars.memory.calls[writes:] == []

    # the pending remote absence stops being wanted when its type says so
    no_pending = {**more, "types": {**more["types"],
                                    "remote": {"show_as": "workingElsewhere",
                                               "sync_pending": False}}}
    await store.apply_configs(pool, [parse_sync("t", no_pending)], box)
    await settle(pool, settings, calendars)
    assert sorted(events(calendars)) == ["course"]


async def test_a_file_without_types_keeps_its_render_hash(pool: asyncpg.Pool) -> None:
    """Configurations stored before leave type rules existed are not re-rendered."""
    config = parse_sync("t", BASE)
    await store.apply_configs(pool, [config], SecretBox(None))
    stored = await pool.fetchrow("SELECT settings, render_hash FROM sync_configs")
    assert '"types"' not in stored["settings"]
    # the hash as it was computed before `types` existed
    before = config.model_dump(include={
        "hide_labels", "hidden_label", "whole_days_as_timed", "morning", "afternoon",
        "time_zone", "sync_pending", "busy_as", "free_as", "private", "category",
        "establishments",
    })
    legacy = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert stored["render_hash"] == legacy
