"""The operator's commands, run through the installed console script against
the real broker, database and calendar test servers: `status`, `items`,
`config pause` / `resume`, `config delete [--purge]`, `config validate`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumer import store
from consumer.config import SyncConfig
from consumer.dispatch import Dispatcher
from consumer.events import parse_event
from consumer.metrics import Metrics
from consumer.providers.base import MAILBOX_NOT_FOUND, ProviderContext, ProviderError
from consumer.providers.base import make_ssl_context as ssl_for
from consumer.providers.memory import MemoryCalendar
from consumer.secrets import SecretBox
from consumer.settings import Settings
from tests.conftest import Publisher, event, wait_until
from tests.graph_server import GraphServer
from tests.harness import apply, settled, sync_config, worker

SCRIPT = Path(sys.executable).parent / "absence-sync"


async def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """The console script with only these ABSENCE_SYNC_* settings, without
    blocking the loop that serves the test doubles."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("ABSENCE_SYNC_")}
    proc = await asyncio.create_subprocess_exec(
        str(SCRIPT), *args, env={**base, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def env_of(settings: Settings) -> dict[str, str]:
    assert settings.kafka_bootstrap_servers and settings.database_url
    return {
        "ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "ABSENCE_SYNC_DATABASE_URL": settings.database_url,
        "ABSENCE_SYNC_TOPIC": settings.topic,
        "ABSENCE_SYNC_DLQ_TOPIC": settings.dlq_topic,
        "ABSENCE_SYNC_GROUP_ID": settings.group_id,
    }


async def record(pool: asyncpg.Pool, *docs: dict[str, Any]) -> None:
    """Absences as intake records them (for tests that need no broker)."""
    async with pool.acquire() as conn, conn.transaction():
        for doc in docs:
            parsed = parse_event(json.dumps(doc).encode())
            await store.record_absences(conn, [store.Incoming(parsed.absence, parsed.data, None)])


# --- status ------------------------------------------------------------------------


async def test_status_shows_reachability_lag_backlog_and_health(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    calendar = MemoryCalendar()
    await apply(pool, sync_config("acme-cal"), sync_config("acme-held"))
    await store.set_paused(pool, "acme-held", True)
    async with worker(settings, calendar=calendar):
        for n in range(3):
            await publisher.send(event(f"abs-{n}", 1, email=f"e{n}@acme.com"))
        await publisher.flush()

        async def written() -> bool:
            return len(calendar.all()) == 3 and (await store.backlog(pool)).pending == 3

        await wait_until(written)
    # after the worker stopped: three more records, sent as one batch (the broker's
    # ListOffsets then under-reports the end; lag must not)
    for n in range(3, 6):
        await publisher.send(event(f"abs-{n}", 1, email=f"e{n}@acme.com"))
    await publisher.flush()

    code, out, err = await cli(env_of(settings), "status", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True
    assert doc["kafka"]["ok"] and doc["database"]["ok"]
    assert doc["topic"] == settings.topic and doc["group"] == settings.group_id
    assert doc["lag"] == 3, doc["partitions"]
    assert sum(p["end"] for p in doc["partitions"]) == 6
    assert all(p["lag"] == p["end"] - (p["committed"] or 0) for p in doc["partitions"])
    assert doc["backlog"]["pending"] == 3  # the paused configuration's writes
    configs = {c["id"]: c for c in doc["configs"]}
    assert configs["acme-cal"]["health"] == "ok" and configs["acme-cal"]["paused"] is False
    assert configs["acme-cal"]["counts"]["synced"] == 3
    held = configs["acme-held"]
    assert held["paused"] is True and held["pending"] == 3
    assert held["oldest_pending_seconds"] is not None

    code, out, err = await cli(env_of(settings), "status")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Kafka:") and " ok " in lines[0]
    assert lines[1].startswith("PostgreSQL:") and " ok " in lines[1]
    assert f"consumer group {settings.group_id} on topic {settings.topic}: lag 3" in out
    assert any(line.split()[:5] == ["acme-held", "acme", "caldav", "idle", "paused"]
               for line in lines), out


async def test_connection_settings_are_also_flags(settings: Settings) -> None:
    """`--database-url`, `--kafka-bootstrap-servers`, `--topic`, `--group-id` override
    their variables, so a command needs no environment at all."""
    flags = ["--kafka-bootstrap-servers", settings.kafka_bootstrap_servers,
             "--database-url", settings.database_url or "", "--topic", settings.topic,
             "--dlq-topic", settings.dlq_topic, "--group-id", settings.group_id]
    code, out, err = await cli({}, "migrate", "--database-url", settings.database_url or "")
    assert code == 0, err
    code, out, err = await cli({}, "status", "--json", *flags)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True and doc["kafka"]["ok"] is True and doc["database"]["ok"] is True
    assert f"topic {settings.topic}: does not exist" in (await cli({}, "status", *flags))[1]
    # a flag wins over its variable
    env = {**env_of(settings), "ABSENCE_SYNC_DATABASE_URL": "postgresql://127.0.0.1:1/nothing"}
    code, _, err = await cli(env, "status", "--json", "--database-url", settings.database_url or "")
    assert code == 0, err
    code, _, err = await cli({}, "migrate")
    assert code == 2 and "ABSENCE_SYNC_DATABASE_URL" in err and "--embedded" in err


async def test_status_names_what_is_unreachable(settings: Settings, tmp_path: Path) -> None:
    from tests.test_operator import _closed_port

    port = _closed_port()
    env = {**env_of(settings),
           "ABSENCE_SYNC_DATABASE_URL": f"postgresql://sync:Pa55-word-9f@127.0.0.1:{port}/db"}
    code, out, err = await cli(env, "status", "--json")
    assert code == 1, err
    doc = json.loads(out)
    assert doc["ok"] is False and doc["kafka"]["ok"] is True
    assert doc["database"] == {
        "ok": False, "address": f"127.0.0.1:{port}/db", "setting": "ABSENCE_SYNC_DATABASE_URL",
        "error": doc["database"]["error"], "schema_behind": [],
    }
    assert "refused" in doc["database"]["error"]
    assert "Pa55-word-9f" not in out + err
    code, out, _ = await cli(env, "status")
    assert code == 1
    assert f"UNREACHABLE 127.0.0.1:{port}/db (check ABSENCE_SYNC_DATABASE_URL)" in " ".join(
        out.split())


# --- items, pause and resume ------------------------------------------------------------


async def test_items_lists_failures_with_code_message_and_hint(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    calendar = MemoryCalendar()
    calendar.fail_next(ProviderError(MAILBOX_NOT_FOUND, "no mailbox ghost@acme.com",
                                     retriable=False))
    await apply(pool, sync_config("acme-cal"))
    await record(pool, event("abs-ghost", 1, email="ghost@acme.com"))
    async with worker(settings, calendar=calendar):
        await wait_until(lambda: settled(pool))
    await record(pool, event("abs-jane", 1, email="jane@acme.com"))
    env = env_of(settings)

    code, out, err = await cli(env, "items", "--config", "acme-cal", "--state", "failed",
                               "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["config"] == "acme-cal" and doc["more"] is False
    (item,) = doc["items"]
    assert item["absence_id"] == "abs-ghost" and item["state"] == "failed"
    assert item["code"] == MAILBOX_NOT_FOUND
    assert item["message"] == "no mailbox ghost@acme.com"
    assert item["target"] == "calendar"
    assert item["hint"] and item["mailbox"] == "ghost@acme.com"

    code, out, err = await cli(env, "items", "--config", "acme-cal")
    assert code == 0, err
    assert out.splitlines()[0].split()[:5] == ["ABSENCE", "TARGET", "STATE", "MAILBOX", "CODE"]
    assert "abs-ghost" in out and "abs-jane" in out and "hint: " in out

    code, out, _ = await cli(env, "items", "--config", "acme-cal", "--limit", "1")
    assert code == 0 and "more items" in out
    code, _, err = await cli(env, "items", "--config", "nope")
    assert code == 1 and "no configuration with id 'nope'" in err
    code, _, err = await cli(env, "items", "--config", "acme-cal", "--state", "broken")
    assert code == 2 and "broken" in err


async def test_a_paused_configuration_records_but_writes_nothing_until_resumed(
    settings: Settings, publisher: Publisher, pool: asyncpg.Pool
) -> None:
    calendar = MemoryCalendar()
    await apply(pool, sync_config("acme-cal"), sync_config("acme-other"))
    env = env_of(settings)
    code, out, err = await cli(env, "config", "pause", "acme-cal")
    assert code == 0, err
    assert "paused acme-cal" in out and "absence-sync config resume acme-cal" in out
    code, out, _ = await cli(env, "config", "list")
    assert {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:]} == {
        "acme-cal": "paused", "acme-other": "active"}
    code, out, _ = await cli(env, "config", "show", "acme-cal")
    assert json.loads(out)["paused"] is True

    async with worker(settings, calendar=calendar):
        await publisher.send(event("abs-1", 1))
        await publisher.flush()

        async def other_written() -> bool:
            return len(calendar.all()) == 1  # the other configuration's event

        await wait_until(other_written)
        row = await pool.fetchrow(
            "SELECT status, change_seq > done_seq AS pending FROM sync_items"
            " WHERE config_id = 'acme-cal'"
        )
        assert row is not None and row["status"] == "pending" and row["pending"]
        # intake goes on: a newer version is recorded, and written for the other
        # configuration, while the paused one's write still waits
        await publisher.send(event("abs-1", 2, status="pending"))
        await publisher.flush()
        await wait_until(lambda: _written(pool, "acme-other", 2))
        assert len(calendar.all()) == 1
        row = await pool.fetchrow(
            "SELECT change_seq, done_seq FROM sync_items WHERE config_id = 'acme-cal'"
        )
        assert row is not None and row["done_seq"] == 0 and row["change_seq"] == 2

        code, out, err = await cli(env, "config", "resume", "acme-cal")
        assert code == 0, err
        assert "resumed acme-cal" in out and "1 pending" in out

        async def both_written() -> bool:
            return len(calendar.all()) == 2 and await settled(pool, 2)

        await wait_until(both_written)
    assert {e.event.show_as for e in calendar.all()} == {"tentative"}  # the latest version
    code, _, err = await cli(env, "config", "pause", "nope")
    assert code == 1 and "no configuration with id 'nope'" in err


async def _written(pool: asyncpg.Pool, config_id: str, changes: int) -> bool:
    """The configuration's item has had `changes` changes and all are done."""
    row = await pool.fetchrow(
        "SELECT change_seq, done_seq FROM sync_items WHERE config_id = $1", config_id
    )
    return row is not None and row["change_seq"] == changes == row["done_seq"]


async def test_resync_wait_refuses_a_paused_configuration(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    """It would wait forever: the paused configuration's writes never come."""
    await apply(pool, sync_config("acme-cal"))
    await store.set_paused(pool, "acme-cal", True)
    env = {"ABSENCE_SYNC_DATABASE_URL": str(settings.database_url)}
    for selection in (("--config", "acme-cal"), ("--tenant", "acme")):
        code, _, err = await cli(env, "resync", *selection, "--wait")
        assert code == 2, err
        assert "configuration 'acme-cal' is paused" in err
        assert "absence-sync config resume acme-cal" in err


async def test_paused_configurations_appear_in_the_api(pool: asyncpg.Pool) -> None:
    from consumer.admin import Admin

    await apply(pool, sync_config("acme-cal"))
    await store.set_paused(pool, "acme-cal", True)
    (view,) = await Admin(pool).syncs("acme", "https://sync.example")
    assert view.to_json()["paused"] is True
    await store.set_paused(pool, "acme-cal", False)
    (view,) = await Admin(pool).syncs("acme", "https://sync.example")
    assert view.to_json()["paused"] is False


# --- delete ------------------------------------------------------------------------------


@pytest.fixture
async def graph(tmp_path: Path) -> Any:
    server = GraphServer()
    server.add_tenant(DIRECTORY)
    server.add_mailbox("jane@acme.test")
    server.add_mailbox("john@acme.test")
    await server.start(tmp_path)
    yield server
    await server.stop()


DIRECTORY = "5e1d2c3b-0000-4000-8000-00000000d1e7"


def graph_settings(settings: Settings, graph: GraphServer) -> Settings:
    return settings.model_copy(update={
        "ms_client_id": graph.client_id, "ms_client_secret": graph.client_secret,
        "ms_authority_host": graph.authority_host, "ms_graph_url": graph.graph_url,
        "ca_bundle": graph.ca_path,
    })


def graph_env(settings: Settings, graph: GraphServer) -> dict[str, str]:
    return {
        "ABSENCE_SYNC_DATABASE_URL": str(settings.database_url),
        "ABSENCE_SYNC_MS_CLIENT_ID": graph.client_id,
        "ABSENCE_SYNC_MS_CLIENT_SECRET": graph.client_secret,
        "ABSENCE_SYNC_MS_AUTHORITY_HOST": graph.authority_host,
        "ABSENCE_SYNC_MS_GRAPH_URL": graph.graph_url,
        "ABSENCE_SYNC_CA_BUNDLE": str(graph.ca_path),
    }


async def write_all(settings: Settings, pool: asyncpg.Pool, config_id: str) -> None:
    """Run a real dispatcher (Graph double) until the configuration's items are done."""
    stop = asyncio.Event()
    dispatcher = Dispatcher(settings, pool, Metrics(), box=SecretBox(None),
                            context=ProviderContext(settings, ssl_for(settings)))
    task = asyncio.create_task(dispatcher.run(stop))
    async def done() -> bool:
        return bool(await pool.fetchval(
            "SELECT count(*) FILTER (WHERE change_seq = done_seq AND status = 'synced')"
            " = count(*) FROM sync_items WHERE config_id = $1", config_id))

    try:
        await wait_until(done)
    finally:
        stop.set()
        await task
        await dispatcher.drain(5)


async def test_delete_with_purge_wait_deletes_the_events_then_the_configuration(
    settings: Settings, pool: asyncpg.Pool, graph: GraphServer
) -> None:
    live = graph_settings(settings, graph)
    o365 = SyncConfig(id="acme-o365", tenant="acme", provider="microsoft365",
                      provider_settings={"tenant_id": DIRECTORY})
    await apply(pool, o365, sync_config("acme-cal"))
    await record(pool, event("abs-1", 1, email="jane@acme.test"),
                 event("abs-2", 1, email="john@acme.test"))
    await store.set_paused(pool, "acme-cal", True)  # only Graph is written here
    await write_all(live, pool, "acme-o365")
    assert len(graph.events["jane@acme.test"]) == 1 and len(graph.events["john@acme.test"]) == 1

    env = graph_env(settings, graph)
    code, out, err = await cli(env, "config", "delete", "acme-o365", "--purge", "--wait")
    assert code == 0, err
    assert "deleted configuration acme-o365 after deleting its 2 event(s)" in out
    assert not graph.events["jane@acme.test"] and not graph.events["john@acme.test"]
    assert await store.get_config(pool, "acme-o365") is None
    assert await pool.fetchval("SELECT count(*) FROM sync_items WHERE config_id = 'acme-o365'"
                               ) == 0

    # without --purge: removed at once, and the output says the events stay
    await store.set_paused(pool, "acme-cal", False)
    await pool.execute("UPDATE sync_items SET status = 'synced', done_seq = change_seq,"
                       " event_id = 'evt-' || absence_id WHERE config_id = 'acme-cal'")
    code, out, err = await cli(env, "config", "delete", "acme-cal")
    assert code == 0, err
    assert "deleted configuration acme-cal" in out
    assert "its 2 event(s) stay in the employees' calendars" in out
    assert await store.get_config(pool, "acme-cal") is None

    code, _, err = await cli(env, "config", "delete", "acme-cal")
    assert code == 1 and "no configuration with id 'acme-cal'" in err
    code, _, err = await cli(env, "config", "delete", "x", "--wait")
    assert code == 2 and "--wait goes with --purge" in err


async def test_purge_wait_stops_on_events_that_cannot_be_deleted(
    settings: Settings, pool: asyncpg.Pool, graph: GraphServer
) -> None:
    o365 = SyncConfig(id="acme-o365", tenant="acme", provider="microsoft365",
                      provider_settings={"tenant_id": DIRECTORY})
    await apply(pool, o365)
    await record(pool, event("abs-1", 1, email="jane@acme.test"),
                 event("abs-2", 1, email="john@acme.test"))
    await write_all(graph_settings(settings, graph), pool, "acme-o365")
    graph.access_denied.add("john@acme.test")  # rights revoked since
    code, out, err = await cli(graph_env(settings, graph), "config", "delete", "acme-o365",
                               "--purge", "--wait")
    assert code == 3, err
    assert "purging acme-o365: 1 event(s) could not be deleted" in out
    assert "absence-sync items --config acme-o365 --state failed" in out
    assert not graph.events["jane@acme.test"] and graph.events["john@acme.test"]
    stored = await store.get_config(pool, "acme-o365")
    assert stored is not None  # kept until its events are gone


async def test_purge_without_wait_is_finished_by_the_workers(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    calendar = MemoryCalendar()
    await apply(pool, sync_config("acme-cal"))
    await record(pool, event("abs-1", 1))
    async with worker(settings, calendar=calendar) as running:
        await wait_until(lambda: settled(pool))
        assert len(calendar.all()) == 1
        running.stop.set()  # a worker that is gone: the purge waits for one
        await running.task
    await store.set_paused(pool, "acme-cal", True)  # a purge deletes all the same
    code, out, err = await cli({"ABSENCE_SYNC_DATABASE_URL": str(settings.database_url)},
                               "config", "delete", "acme-cal", "--purge")
    assert code == 0, err
    assert "purging acme-cal: 1 event(s) to delete" in out
    assert await store.get_config(pool, "acme-cal") is not None
    async with worker(settings, calendar=calendar):

        async def gone() -> bool:
            return await store.get_config(pool, "acme-cal") is None

        await wait_until(gone)
    assert calendar.all() == []


# --- validate -----------------------------------------------------------------------------


def test_validate_checks_a_file_without_database_or_secrets(tmp_path: Path) -> None:
    from tests.test_cli import run

    path = tmp_path / "syncs.yaml"
    path.write_text(textwrap.dedent("""
        syncs:
          - id: acme-dav
            tenant: acme
            provider: caldav
            caldav:
              url: "https://dav.example.com/{email}/calendar/"
              username: sync-bot
              password_env: NOT_SET_IN_CI
          - id: acme-ews
            tenant: acme
            provider: exchange
            exchange:
              url: https://outlook.office365.com/EWS/Exchange.asmx
              username: svc
              password_file: /run/secrets/not-here
          - id: acme-o365
            tenant: acme
            provider: microsoft365
            microsoft365: {}
        """), encoding="utf-8")
    done = run(None, "config", "validate", "-f", str(path))  # no setting at all
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "acme-dav: valid (caldav, tenant acme; secrets not read: password)",
        "acme-ews: valid (exchange, tenant acme; secrets not read: password)",
        "acme-o365: valid (microsoft365, tenant acme)",
        f"{path}: 3 configuration(s) valid",
    ]
    assert "acme-ews: exchange.url points at Exchange Online" in done.stderr  # a warning

    read = run(None, "config", "validate", "-f", str(path), "--read-secrets")
    assert read.returncode == 2
    assert "environment variable 'NOT_SET_IN_CI' is not set" in read.stderr

    path.write_text(textwrap.dedent("""
        syncs:
          - id: x
            tenant: acme
            provider: caldav
            caldav: {url: "https://d.example/{email}/", password_env: not a name}
        """), encoding="utf-8")
    bad = run(None, "config", "validate", "-f", str(path))
    assert bad.returncode == 2
    assert bad.stderr.startswith(f"absence-sync: error: {path}: sync 'x': field "
                                 "'caldav.password_env': must name an environment variable")
