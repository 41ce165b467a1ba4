"""Operator mistakes, run as an operator makes them: each ends with a readable
message naming the variable, the component and the fix, and a non-zero exit."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from consumer.embedded import EmbeddedKafka, EmbeddedPostgres
from consumer.settings import Settings
from tests.conftest import Publisher, dsn_for, event, wait_until
from tests.harness import apply, sync_config, worker
from tests.test_cli import assert_clean_failure, run


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "command",
    [("migrate",), ("config", "list"), ("config", "show", "x"), ("retry",), ("run",)],
    ids=" ".join,
)
def test_missing_database_url_is_an_error_not_an_embedded_server(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    done = run(None, *command, ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9",
               ABSENCE_SYNC_LOG_FORMAT="console", HOME=str(tmp_path))
    assert_clean_failure(done, 2)
    assert "ABSENCE_SYNC_DATABASE_URL is not set" in done.stderr
    assert "--embedded" in done.stderr
    assert not (tmp_path / ".local").exists()  # no embedded data directory was made


def test_missing_broker_is_an_error_for_run(dsn: str) -> None:
    done = run(dsn, "run", ABSENCE_SYNC_LOG_FORMAT="console")
    assert_clean_failure(done, 2)
    assert "ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS is not set" in done.stderr
    assert "--embedded" in done.stderr


def test_misspelt_variable_is_named_with_the_closest_setting(dsn: str) -> None:
    done = run(None, "config", "list", ABSENCE_SYNC_DATABSE_URL=dsn)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: ABSENCE_SYNC_DATABASE_URL is not set" in done.stderr
    assert (
        "absence-sync: warning: ABSENCE_SYNC_DATABSE_URL is not a known setting;"
        " did you mean ABSENCE_SYNC_DATABASE_URL?" in done.stderr
    )
    fine = run(dsn, "config", "list", ABSENCE_SYNC_TOTALLY_UNRELATED="1")
    assert fine.returncode == 0, fine.stderr
    assert "ABSENCE_SYNC_TOTALLY_UNRELATED is not a known setting" in fine.stderr
    assert "did you mean" not in fine.stderr


def test_unreachable_database_is_one_line_naming_component_address_and_setting() -> None:
    port = _closed_port()
    dsn = f"postgresql://sync:Pa55-word-9f@127.0.0.1:{port}/absences"
    done = run(dsn, "config", "list")
    assert_clean_failure(done, 1)
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"PostgreSQL at 127.0.0.1:{port}/absences" in done.stderr
    assert "ABSENCE_SYNC_DATABASE_URL" in done.stderr
    assert "Pa55-word-9f" not in done.stderr


def test_missing_database_is_named(postgres: EmbeddedPostgres) -> None:
    done = run(dsn_for(postgres.dsn, "no_such_db"), "migrate")
    assert_clean_failure(done, 1)
    assert "no_such_db" in done.stderr and "ABSENCE_SYNC_DATABASE_URL" in done.stderr


def test_unreachable_broker_ends_run_with_one_json_line(dsn: str) -> None:
    port = _closed_port()
    done = run(dsn, "run", ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}",
               ABSENCE_SYNC_HTTP_PORT="0")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    docs = [json.loads(line) for line in lines]  # nothing but JSON with JSON logging
    fatal = docs[-1]
    assert fatal["level"] == "error"
    assert f"Kafka at 127.0.0.1:{port}" in fatal["event"]
    assert "ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS" in fatal["event"]


def test_debug_shows_the_traceback() -> None:
    dsn = f"postgresql://sync@127.0.0.1:{_closed_port()}/absences"
    done = run(dsn, "--debug", "config", "list")
    assert done.returncode == 1
    assert "Traceback" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("absence-sync: error: ")


def test_embedded_database_survives_a_second_start(tmp_path: Path) -> None:
    """As root, the data directory must stay private to the server's user (0700)."""
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    first = run(None, "migrate", "--embedded", **env)
    assert first.returncode == 0, first.stderr
    assert "applied migrations" in first.stdout
    second = run(None, "config", "list", "--embedded", **env)
    assert second.returncode == 0, second.stderr
    assert "no configurations" in second.stdout
    data = tmp_path / "data" / "absence-sync" / "pg"
    assert (data / "PG_VERSION").is_file()
    assert data.stat().st_mode & 0o077 == 0
    third = run(None, "migrate", ABSENCE_SYNC_EMBEDDED="true", **env)
    assert third.returncode == 0, third.stderr
    assert "up to date" in third.stdout


def test_consent_url_needs_a_public_https_address(dsn: str) -> None:
    env = {"ABSENCE_SYNC_MS_CLIENT_ID": "11111111-2222-3333-4444-555555555555"}
    missing = run(dsn, "consent-url", "acme-o365", **env)
    assert_clean_failure(missing, 2)
    assert "ABSENCE_SYNC_PUBLIC_URL is not set" in missing.stderr
    plain = run(dsn, "consent-url", "acme-o365", ABSENCE_SYNC_PUBLIC_URL="http://sync.example",
                **env)
    assert_clean_failure(plain, 2)
    assert "https://" in plain.stderr


async def test_consent_url_says_when_it_expires(dsn: str, pool: object) -> None:
    from consumer.config import SyncConfig
    from tests.harness import apply as apply_configs

    await apply_configs(pool, SyncConfig(  # type: ignore[arg-type]
        id="acme-o365", tenant="acme", provider="microsoft365",
        provider_settings={"tenant_id": "6f1e2d3c-0000-4000-8000-123456789abc"},
    ))
    done = run(dsn, "consent-url", "acme-o365",
               ABSENCE_SYNC_MS_CLIENT_ID="11111111-2222-3333-4444-555555555555",
               ABSENCE_SYNC_PUBLIC_URL="https://sync.vendor.example")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("https://") and len(done.stdout.splitlines()) == 1
    assert "expires at" in done.stderr and "UTC" in done.stderr


async def test_dlq_show_prints_dead_letters_with_their_reasons(
    settings: Settings, publisher: Publisher, pool: object, kafka: EmbeddedKafka
) -> None:
    await apply(pool, sync_config())  # type: ignore[arg-type]
    bad = event("abs-bad", 1, start=("2026-12-03", "pm"), end=("2026-12-01", "am"))
    async with worker(settings) as running:
        await publisher.send(b"{not json", key="abs-junk")
        await publisher.send(bad)
        await publisher.flush()

        async def dead_lettered() -> bool:
            return running.metrics.events.labels("invalid")._value.get() >= 2

        await wait_until(dead_lettered)
    env = {
        "ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "ABSENCE_SYNC_DLQ_TOPIC": settings.dlq_topic,
    }
    shown = run(None, "dlq", "show", "--json", **env)
    assert shown.returncode == 0, shown.stderr
    letters = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [d["reason"] for d in letters] == ["malformed_json", "end_before_start"], shown.stdout
    assert {d["original_topic"] for d in letters} == {settings.topic}
    assert all(isinstance(d["original_offset"], int) for d in letters)
    assert letters[0]["key"] == "abs-junk"
    text = run(None, "dlq", "show", "--limit", "1", **env)
    assert text.returncode == 0, text.stderr
    assert "reason=end_before_start" in text.stdout and "malformed_json" not in text.stdout
    # reading moved no group's offsets: a fresh look still sees both
    again = run(None, "dlq", "show", "--json", **env)
    assert len(again.stdout.splitlines()) == 2
    empty = run(None, "dlq", "show", **{**env, "ABSENCE_SYNC_DLQ_TOPIC": "no-such-dlq"})
    assert empty.returncode == 0, empty.stderr
    assert "no dead letters" in empty.stdout


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """The console script, without blocking the loop that serves the test doubles."""
    import asyncio
    import os
    import sys

    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("ABSENCE_SYNC_")}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "absence-sync"), *args, env={**base, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_config_test_reaches_the_calendar_without_writing(
    dsn: str, tmp_path: Path, pool: object
) -> None:
    from consumer.config import SyncConfig
    from tests.graph_server import GraphServer

    graph = GraphServer()
    consented = "3c9d2b1a-0000-4000-8000-0000000c0f1e"
    refused = "3c9d2b1a-0000-4000-8000-0000000c0f1f"
    graph.add_tenant(consented)
    graph.add_tenant(refused, consented=False)
    graph.add_mailbox("jane@acme.test")
    await graph.start(tmp_path)
    try:
        await apply(pool, *(  # type: ignore[arg-type]
            SyncConfig(id=cid, tenant="acme", provider="microsoft365",
                       provider_settings={"tenant_id": directory})
            for cid, directory in (("acme-ok", consented), ("acme-noconsent", refused))
        ))
        assert graph.ca_path is not None
        env = {
            "ABSENCE_SYNC_DATABASE_URL": dsn,
            "ABSENCE_SYNC_MS_CLIENT_ID": graph.client_id,
            "ABSENCE_SYNC_MS_CLIENT_SECRET": graph.client_secret,
            "ABSENCE_SYNC_MS_AUTHORITY_HOST": graph.authority_host,
            "ABSENCE_SYNC_MS_GRAPH_URL": graph.graph_url,
            "ABSENCE_SYNC_CA_BUNDLE": str(graph.ca_path),
        }
        code, out, err = await _cli(env, "config", "test", "acme-ok", "--mailbox",
                                    "Jane@acme.test")
        assert code == 0, err
        assert out.startswith("ok: microsoft365 reached the calendar of jane@acme.test")
        calendar_calls = [r for r in graph.requests if r.mailbox]
        assert calendar_calls and all(r.method == "GET" for r in calendar_calls)
        assert not graph.events.get("jane@acme.test")

        code, out, _ = await _cli(env, "config", "test", "acme-ok", "--mailbox",
                                  "nobody@acme.test", "--json")
        assert code == 1
        doc = json.loads(out)
        assert doc["ok"] is False and doc["code"] == "mailbox_not_found"
        assert "nobody@acme.test" in doc["hint"]

        code, out, _ = await _cli(env, "config", "test", "acme-noconsent", "--mailbox",
                                  "jane@acme.test")
        assert code == 1
        assert out.startswith("failed: consent_missing")
        assert "hint: " in out and "consent-url acme-noconsent" in out

        code, _, err = await _cli(env, "config", "test", "acme-ok")
        assert code == 2 and "give --mailbox" in err
        code, _, err = await _cli(env, "config", "test", "nope", "--mailbox", "jane@acme.test")
        assert code == 1 and "no configuration with id 'nope'" in err
    finally:
        await graph.stop()
