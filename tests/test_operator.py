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


# --- consent wins over the file -------------------------------------------------------

CONSENTED = "6f1e2d3c-0000-4000-8000-00000000c0de"
OTHER = "7a2b3c4d-0000-4000-8000-0000000000ff"


def _o365_file(tmp_path: Path, tenant_id: str | None) -> Path:
    block = f"{{tenant_id: {tenant_id}}}" if tenant_id else "{}"
    path = tmp_path / "o365.yaml"
    path.write_text(
        "syncs:\n  - id: acme-o365\n    tenant: acme\n    provider: microsoft365\n"
        f"    microsoft365: {block}\n",
        encoding="utf-8",
    )
    return path


async def test_consent_wins_over_the_file(dsn: str, pool: object, tmp_path: Path) -> None:
    import datetime as dt

    import asyncpg

    from consumer import store
    from consumer.admin import Admin, AdminError

    assert isinstance(pool, asyncpg.Pool)
    created = run(dsn, "config", "apply", "-f", str(_o365_file(tmp_path, None)))
    assert created.returncode == 0, created.stderr
    await store.new_consent_state(pool, "acme-o365", "state-0123456789-abcdef")
    assert await store.grant_consent(pool, "state-0123456789-abcdef", CONSENTED) == "acme-o365"

    path = _o365_file(tmp_path, OTHER)
    refused = run(dsn, "config", "apply", "-f", str(path))
    assert_clean_failure(refused, 2)
    message = refused.stderr
    assert f"{path}: sync 'acme-o365': field 'microsoft365.tenant_id': '{OTHER}'" in message
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    assert f"({CONSENTED}, on {today} " in message and " UTC)" in message  # who and when
    assert "leave tenant_id out" in message and "consent-url acme-o365" in message  # the fix
    stored = await store.get_config(pool, "acme-o365")
    assert stored is not None and stored.config.provider_settings["tenant_id"] == CONSENTED

    for tenant_id in (CONSENTED.upper(), None):  # the same directory, or none: fine
        fine = run(dsn, "config", "apply", "-f", str(_o365_file(tmp_path, tenant_id)))
        assert fine.returncode == 0, fine.stderr
    shown = json.loads(run(dsn, "config", "show", "acme-o365").stdout)
    assert shown["provider_settings"]["tenant_id"] == CONSENTED
    assert shown["granted_tenant_id"] == CONSENTED and shown["granted_at"].startswith(today)

    with pytest.raises(AdminError) as api:  # the API's PUT, the same rule
        await Admin(pool).put("acme", "acme-o365", {
            "provider": "microsoft365", "microsoft365": {"tenant_id": OTHER}})
    assert api.value.status == 409 and CONSENTED in api.value.message


async def test_a_later_consent_replaces_the_directory_of_the_file(pool: object) -> None:
    import asyncpg

    from consumer import store
    from consumer.config import SyncConfig
    from tests.harness import apply as apply_configs

    assert isinstance(pool, asyncpg.Pool)
    await apply_configs(pool, SyncConfig(id="acme-o365", tenant="acme", provider="microsoft365",
                                         provider_settings={"tenant_id": OTHER}))
    await store.new_consent_state(pool, "acme-o365", "state-0123456789-abcdef")
    await store.grant_consent(pool, "state-0123456789-abcdef", CONSENTED)
    stored = await store.get_config(pool, "acme-o365")
    assert stored is not None and stored.config.provider_settings["tenant_id"] == CONSENTED


# --- the key trap ---------------------------------------------------------------------


def test_a_lost_secret_key_names_the_configuration_and_the_way_out(
    dsn: str, tmp_path: Path
) -> None:
    from cryptography.fernet import Fernet

    from tests.test_cli import PASSWORD, syncs_file

    path = syncs_file(tmp_path)
    first = {"ABSENCE_SYNC_SECRET_KEYS": Fernet.generate_key().decode(),
             "TEST_CLI_DAV_PASSWORD": PASSWORD}
    assert run(dsn, "config", "apply", "-f", str(path), **first).returncode == 0
    # a new shell, a new key (the README's old trap)
    second = {**first, "ABSENCE_SYNC_SECRET_KEYS": Fernet.generate_key().decode()}
    refused = run(dsn, "config", "apply", "-f", str(path), **second)
    assert_clean_failure(refused, 1)
    assert f"{path}: configuration 'acme-dav': stored secrets cannot be decrypted" in (
        refused.stderr)
    assert "ABSENCE_SYNC_SECRET_KEYS" in refused.stderr
    assert "absence-sync config apply -f FILE --replace-secrets" in refused.stderr

    tested = run(dsn, "config", "test", "acme-dav", "--mailbox", "jane@acme.com", **second)
    assert_clean_failure(tested, 1)
    assert "configuration 'acme-dav'" in tested.stderr and "--replace-secrets" in tested.stderr
    rotated = run(dsn, "config", "reencrypt", **second)
    assert_clean_failure(rotated, 1)
    assert "configuration 'acme-dav'" in rotated.stderr

    replaced = run(dsn, "config", "apply", "-f", str(path), "--replace-secrets", **second)
    assert replaced.returncode == 0, replaced.stderr
    assert replaced.stdout.splitlines() == ["acme-dav: updated", "globex-o365: unchanged"]
    again = run(dsn, "config", "apply", "-f", str(path), **second)
    assert again.stdout.splitlines() == ["acme-dav: unchanged", "globex-o365: unchanged"]
    for done in (refused, tested, rotated, replaced, again):
        assert PASSWORD not in done.stdout + done.stderr


# --- configuration files in our words ------------------------------------------------

MISTAKES = [
    # (case, entry lines, field, words that must be in the message)
    ("a yes-or-no in words", "hide_labels: yes please",
     "hide_labels", ["must be true or false", "got 'yes please'"]),
    ("a misspelt field", "hide_label: true",
     "hide_label", ["unknown field", "did you mean 'hide_labels'?", "docs/configuration.md"]),
    ("a value of a list of choices", "busy_as: Busy",
     "busy_as", ["must be one of busy, oof", "got 'Busy'"]),
    ("a number for text", "hidden_label: 42",
     "hidden_label", ["must be text", "got 42", 'quote it: "42"']),
    ("a time span", "morning: 9-12",
     "morning", ["'9-12' is not a time span like 09:00-12:30"]),
    ("a zone", "time_zone: Paris",
     "time_zone", ["unknown IANA time zone 'Paris'", "Europe/Paris"]),
    ("a list", "establishments: paris",
     "establishments", ["must be a list", "got 'paris'"]),
    ("a misspelt block key", "caldav: {url: 'https://dav.example/{email}/', usernme: bot}",
     "caldav.usernme", ["unknown key", "did you mean 'username'?"]),
]


@pytest.mark.parametrize(("entry", "field", "words"), [m[1:] for m in MISTAKES],
                         ids=[m[0] for m in MISTAKES])
def test_configuration_mistakes_name_file_sync_field_value_and_form(
    tmp_path: Path, entry: str, field: str, words: list[str]
) -> None:
    path = tmp_path / "syncs.yaml"
    block = "" if entry.startswith("caldav:") else (
        "    caldav: {url: 'https://dav.example/{email}/'}\n")
    path.write_text("syncs:\n  - id: acme-dav\n    tenant: acme\n    provider: caldav\n"
                    f"    {entry}\n{block}", encoding="utf-8")
    for command in (("config", "validate"), ("config", "apply")):
        done = run(None, *command, "-f", str(path))
        assert_clean_failure(done, 2)
        message = done.stderr.removeprefix("absence-sync: error: ").strip()
        assert message.startswith(f"{path}: sync 'acme-dav': field '{field}': "), message
        for word in words:
            assert word in message, message
        for pydantic in ("Input should be", "Extra inputs are not permitted", "validation error",
                         "pydantic", "type=", "[type"):
            assert pydantic not in message


def test_a_misspelt_syncs_key_gets_a_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "syncs.yaml"
    path.write_text("sync:\n  - id: acme-dav\n", encoding="utf-8")
    done = run(None, "config", "validate", "-f", str(path))
    assert_clean_failure(done, 2)
    assert f"{path}: no top-level 'syncs:' list; found 'sync': did you mean 'syncs'?" in (
        done.stderr)


def _commands() -> list[tuple[str, ...]]:
    import click

    from consumer.cli import main

    found: list[tuple[str, ...]] = []

    def walk(group: click.Group, path: tuple[str, ...]) -> None:
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                walk(command, (*path, name))
            else:
                found.append((*path, name))

    walk(main, ())
    return sorted(found)


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_help_says_what_it_does_and_which_settings_it_reads(
    command: tuple[str, ...],
) -> None:
    from click.testing import CliRunner

    from consumer.cli import main

    result = CliRunner().invoke(main, [*command, "--help"], prog_name="absence-sync")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    description = text.split("Options:")[0].split(" ".join(command), 1)[-1]
    assert len(description.split()) >= 8, f"{command}: {description!r}"
    assert "ABSENCE_SYNC_" in text or "Reads no setting" in text, text
    if command[0] == "config" and command[-1] in ("apply", "validate", "list", "show"):
        assert "docs/configuration.md" in text
