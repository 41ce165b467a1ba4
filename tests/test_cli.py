"""The `absence-sync` console script, run as operators run it (README, 'Running it')."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import pytest
from cryptography.fernet import Fernet, InvalidToken

from consumer import store
from consumer.embedded import EmbeddedPostgres
from tests.conftest import dsn_for, event

SCRIPT = Path(sys.executable).parent / "absence-sync"
PASSWORD = "dav-S3cret-a8d0e2f4"


def run(dsn: str | None, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, with only the given ABSENCE_SYNC_* settings."""
    assert SCRIPT.is_file(), f"{SCRIPT}: the project is not installed in this venv"
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("ABSENCE_SYNC_")}
    if dsn is not None:
        base["ABSENCE_SYNC_DATABASE_URL"] = dsn
    return subprocess.run(
        [str(SCRIPT), *args], env={**base, **env},
        capture_output=True, text=True, timeout=120, check=False,
    )


def assert_clean_failure(done: subprocess.CompletedProcess[str], code: int | None = None) -> None:
    """A readable refusal: non-zero exit, a one-line cause, no Python traceback."""
    assert done.returncode != 0, done.stdout
    if code is not None:
        assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("absence-sync: error: "), done.stderr


def syncs_file(tmp_path: Path, *, broken: bool = False) -> Path:
    path = tmp_path / ("broken.yaml" if broken else "syncs.yaml")
    path.write_text(
        textwrap.dedent(
            f"""
            syncs:
              - id: acme-dav
                tenant: acme
                provider: caldav
                hidden_label: Away
                caldav:
                  url: "https://dav.example.com/{{email}}/calendar/"
                  username: sync-bot
                  password_env: TEST_CLI_DAV_PASSWORD
              - id: globex-o365
                tenant: globex
                provider: microsoft365
                {"time_zone: Europe/Nowhere" if broken else "time_zone: Europe/Paris"}
                microsoft365:
                  tenant_id: 6f1e2d3c-0000-4000-8000-123456789abc
            """
        ),
        encoding="utf-8",
    )
    return path


@pytest.fixture
def key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
def env(key: str) -> dict[str, str]:
    return {"ABSENCE_SYNC_SECRET_KEYS": key, "TEST_CLI_DAV_PASSWORD": PASSWORD}


@pytest.fixture
async def empty_dsn(postgres: EmbeddedPostgres) -> str:
    """A database without any table, as on a first deployment."""
    name = f"empty_{os.getpid()}_{os.urandom(4).hex()}"
    conn = await asyncpg.connect(postgres.dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return dsn_for(postgres.dsn, name)


async def test_migrate_creates_then_is_idempotent(empty_dsn: str) -> None:
    first = run(empty_dsn, "migrate")
    assert first.returncode == 0, first.stderr
    assert "applied migrations: 0001_initial.sql" in first.stdout
    second = run(empty_dsn, "migrate")
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(
            store._migrations()
        )
        assert await conn.fetchval("SELECT count(*) FROM sync_configs") == 0
    finally:
        await conn.close()


def test_missing_database_is_reported(postgres: EmbeddedPostgres) -> None:
    missing = dsn_for(postgres.dsn, "no_such_database")
    for command in (["migrate"], ["config", "list"]):
        done = run(missing, *command)
        assert_clean_failure(done, 1)
        assert "no_such_database" in done.stderr


async def test_apply_list_show(
    dsn: str, tmp_path: Path, env: dict[str, str], pool: asyncpg.Pool
) -> None:
    path = syncs_file(tmp_path)
    applied = run(dsn, "config", "apply", "-f", str(path), **env)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == ["acme-dav: created", "globex-o365: created"]
    again = run(dsn, "config", "apply", "--file", str(path), **env)
    assert again.stdout.splitlines() == ["acme-dav: unchanged", "globex-o365: unchanged"]

    listed = run(dsn, "config", "list", **env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "TENANT", "PROVIDER", "REVISION", "STATE"]
    assert [line.split() for line in lines[1:]] == [
        ["acme-dav", "acme", "caldav", "1", "active"],
        ["globex-o365", "globex", "microsoft365", "1", "active"],
    ]
    as_json = run(dsn, "config", "list", "--json", **env)
    assert as_json.returncode == 0, as_json.stderr
    docs = json.loads(as_json.stdout)
    assert [d["id"] for d in docs] == ["acme-dav", "globex-o365"]
    assert docs[0]["secrets"] == ["password"]

    shown = run(dsn, "config", "show", "acme-dav", **env)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["id"] == "acme-dav"
    assert doc["tenant"] == "acme"
    assert doc["provider"] == "caldav"
    assert doc["hidden_label"] == "Away"
    assert doc["hide_labels"] is True
    assert doc["provider_settings"] == {
        "url": "https://dav.example.com/{email}/calendar/", "username": "sync-bot",
    }
    assert doc["secrets"] == ["password"]  # the name, never the value
    assert doc["revision"] == 1

    for done in (applied, again, listed, as_json, shown):
        assert PASSWORD not in done.stdout + done.stderr
    token = await pool.fetchval("SELECT secrets FROM sync_configs WHERE id = 'acme-dav'")
    assert PASSWORD.encode() not in bytes(token)


def test_show_unknown_config(dsn: str) -> None:
    done = run(dsn, "config", "show", "nope")
    assert_clean_failure(done)
    assert "no configuration with id 'nope'" in done.stderr
    assert done.stdout == ""


async def test_bad_config_file_refused(
    dsn: str, tmp_path: Path, env: dict[str, str], pool: asyncpg.Pool
) -> None:
    path = syncs_file(tmp_path, broken=True)
    done = run(dsn, "config", "apply", "-f", str(path), **env)
    assert_clean_failure(done, 2)
    assert str(path) in done.stderr
    assert "'globex-o365'" in done.stderr
    assert "field 'time_zone'" in done.stderr
    assert await pool.fetchval("SELECT count(*) FROM sync_configs") == 0


def test_missing_config_file_refused(dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    done = run(dsn, "config", "apply", "-f", str(path))
    assert_clean_failure(done, 2)
    assert str(path) in done.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ABSENCE_SYNC_HTTP_PORT", "abc"),
        ("ABSENCE_SYNC_SECRET_KEYS", "notakey-but-private"),
        ("ABSENCE_SYNC_LOG_LEVEL", "chatty"),
        ("ABSENCE_SYNC_DATABASE_URL", "db.internal:5432/sync"),
    ],
)
@pytest.mark.parametrize("command", [("config", "list"), ("migrate",)], ids=" ".join)
def test_bad_setting_names_the_variable(
    dsn: str, variable: str, value: str, command: tuple[str, ...]
) -> None:
    done = run(dsn, *command, **{variable: value})
    assert_clean_failure(done, 2)
    assert variable in done.stderr
    if variable == "ABSENCE_SYNC_SECRET_KEYS":
        assert value not in done.stderr
    assert done.stdout == ""


async def test_secrets_without_keys_refused(
    dsn: str, tmp_path: Path, pool: asyncpg.Pool
) -> None:
    path = syncs_file(tmp_path)
    done = run(dsn, "config", "apply", "-f", str(path), TEST_CLI_DAV_PASSWORD=PASSWORD)
    assert_clean_failure(done)
    assert "ABSENCE_SYNC_SECRET_KEYS is not set" in done.stderr
    assert "'acme-dav'" in done.stderr
    assert "generate-key" in done.stderr
    assert PASSWORD not in done.stderr
    assert await pool.fetchval("SELECT count(*) FROM sync_configs") == 0


def test_config_without_secrets_needs_no_key(dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "o365.yaml"
    path.write_text(
        "syncs:\n  - {id: acme-o365, tenant: acme, provider: microsoft365,"
        " microsoft365: {tenant_id: t}}\n"
    )
    done = run(dsn, "config", "apply", "-f", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "acme-o365: created"


async def test_generate_key_gives_usable_keys(
    dsn: str, tmp_path: Path, pool: asyncpg.Pool
) -> None:
    first, second = run(None, "generate-key"), run(None, "generate-key")
    assert first.returncode == 0 and second.returncode == 0
    key = first.stdout.strip()
    assert first.stdout == key + "\n"
    assert key != second.stdout.strip()
    assert Fernet(key.encode()).decrypt(Fernet(key.encode()).encrypt(b"x")) == b"x"
    # ...and the settings accept it: secrets get stored with it
    done = run(dsn, "config", "apply", "-f", str(syncs_file(tmp_path)),
               ABSENCE_SYNC_SECRET_KEYS=key, TEST_CLI_DAV_PASSWORD=PASSWORD)
    assert done.returncode == 0, done.stderr
    token = await pool.fetchval("SELECT secrets FROM sync_configs WHERE id = 'acme-dav'")
    assert json.loads(Fernet(key.encode()).decrypt(bytes(token))) == {"password": PASSWORD}


async def test_reencrypt_rotates_keys(
    dsn: str, tmp_path: Path, env: dict[str, str], key: str, pool: asyncpg.Pool
) -> None:
    assert run(dsn, "config", "apply", "-f", str(syncs_file(tmp_path)), **env).returncode == 0
    new_key = Fernet.generate_key().decode()

    done = run(dsn, "config", "reencrypt", ABSENCE_SYNC_SECRET_KEYS=f"{new_key},{key}")
    assert done.returncode == 0, done.stderr
    assert "re-encrypted the secrets of 1 configuration(s)" in done.stdout

    token = bytes(await pool.fetchval("SELECT secrets FROM sync_configs WHERE id = 'acme-dav'"))
    assert json.loads(Fernet(new_key.encode()).decrypt(token)) == {"password": PASSWORD}
    with pytest.raises(InvalidToken):
        Fernet(key.encode()).decrypt(token)
    # the old key can now be dropped
    again = run(dsn, "config", "apply", "-f", str(syncs_file(tmp_path)),
                ABSENCE_SYNC_SECRET_KEYS=new_key, TEST_CLI_DAV_PASSWORD=PASSWORD)
    assert again.stdout.splitlines() == ["acme-dav: unchanged", "globex-o365: unchanged"]


async def test_reencrypt_refusals(
    dsn: str, tmp_path: Path, env: dict[str, str], pool: asyncpg.Pool
) -> None:
    assert_clean_failure(run(dsn, "config", "reencrypt"))
    assert run(dsn, "config", "apply", "-f", str(syncs_file(tmp_path)), **env).returncode == 0
    before = await pool.fetchval("SELECT secrets FROM sync_configs WHERE id = 'acme-dav'")
    unrelated = Fernet.generate_key().decode()
    done = run(dsn, "config", "reencrypt", ABSENCE_SYNC_SECRET_KEYS=unrelated)
    assert_clean_failure(done, 1)
    assert "cannot be decrypted" in done.stderr
    assert await pool.fetchval("SELECT secrets FROM sync_configs WHERE id = 'acme-dav'") == before


async def test_retry_requeues_failed_items(
    dsn: str, tmp_path: Path, env: dict[str, str], pool: asyncpg.Pool
) -> None:
    assert run(dsn, "config", "apply", "-f", str(syncs_file(tmp_path)), **env).returncode == 0
    for absence_id in ("abs-1", "abs-2"):
        await pool.execute(
            "INSERT INTO absences (tenant, id, version, deleted, data) VALUES"
            " ('acme', $1, 1, false, $2::jsonb)",
            absence_id, json.dumps(event(absence_id, 1)["data"]),
        )
    await pool.execute(
        "INSERT INTO sync_items (config_id, tenant, absence_id, change_seq, done_seq, status,"
        " attempts, last_error_code) VALUES"
        " ('acme-dav', 'acme', 'abs-1', 2, 2, 'failed', 7, 'auth_failed'),"
        " ('acme-dav', 'acme', 'abs-2', 2, 2, 'synced', 0, NULL)"
    )

    unknown = run(dsn, "retry", "--config", "nope")
    assert_clean_failure(unknown, 1)
    assert "nope" in unknown.stderr

    done = run(dsn, "retry", "--config", "acme-dav")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "re-queued 1 failed item(s)"
    rows = {
        r["absence_id"]: r
        for r in await pool.fetch("SELECT * FROM sync_items WHERE config_id = 'acme-dav'")
    }
    assert rows["abs-1"]["change_seq"] > rows["abs-1"]["done_seq"]
    assert (rows["abs-1"]["status"], rows["abs-1"]["attempts"]) == ("pending", 0)
    assert rows["abs-2"]["change_seq"] == rows["abs-2"]["done_seq"]
    assert run(dsn, "retry").stdout.strip() == "re-queued 0 failed item(s)"
