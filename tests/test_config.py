"""Sync configurations (docs/configuration.md): the YAML file and its storage."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.fernet import Fernet, InvalidToken

from consumer import store
from consumer.config import (
    PROVIDER_BLOCKS,
    BlockSpec,
    ConfigError,
    SyncConfig,
    TimeSpan,
    load_file,
)
from consumer.secrets import SecretBox, SecretsError
from tests.conftest import event

SCRIPT = Path(sys.executable).parent / "absence-sync"
DAV_PASSWORD = "dav-Pa55word-7f3a91"
EWS_PASSWORD = "ews-Pa55word-c0ffee"
SERVICE_ACCOUNT = '{"type": "service_account", "private_key": "-----BEGIN-----x-----END-----"}'
DAV_URL = "https://dav.example.com/{email}/calendar/"
EWS_URL = "https://mail.acme.com/EWS/Exchange.asmx"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


@pytest.fixture
def secret_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("TEST_DAV_PASSWORD", DAV_PASSWORD)
    ews = tmp_path / "ews.password"
    ews.write_text(EWS_PASSWORD + "\n")  # the trailing newline of `echo x > file`
    google = tmp_path / "service-account.json"
    google.write_text(SERVICE_ACCOUNT + "\n")
    return {"ews": ews, "google": google}


def good_file(tmp_path: Path, secret_files: dict[str, Path]) -> Path:
    return write(
        tmp_path / "syncs.yaml",
        f"""
        syncs:
          - id: acme-dav
            tenant: acme
            provider: caldav
            caldav:
              url: "{DAV_URL}"
              username: sync-bot
              password_env: TEST_DAV_PASSWORD
          - id: acme-ews
            tenant: acme
            provider: exchange
            establishments: [paris, lyon]
            hide_labels: false
            hidden_label: Away
            whole_days_as_timed: true
            morning: "08:30-12:00"
            afternoon: "14:00-17:30"
            time_zone: Europe/Paris
            sync_pending: false
            busy_as: oof
            free_as: workingElsewhere
            private: true
            category: Absences
            exchange:
              url: {EWS_URL}
              username: svc-sync@acme.com
              password_file: {secret_files["ews"]}
          - id: acme-o365
            tenant: acme
            provider: microsoft365
            microsoft365:
              tenant_id: 6f1e2d3c-0000-4000-8000-123456789abc
          - id: globex-google
            tenant: globex
            provider: google
            google:
              service_account_file: {secret_files["google"]}
        """,
    )


# --- loading ----------------------------------------------------------------


def test_load_valid_file_for_every_provider(
    tmp_path: Path, secret_files: dict[str, Path]
) -> None:
    configs = {c.id: c for c in load_file(good_file(tmp_path, secret_files))}
    assert list(configs) == ["acme-dav", "acme-ews", "acme-o365", "globex-google"]

    dav = configs["acme-dav"]
    assert (dav.tenant, dav.provider) == ("acme", "caldav")
    assert dav.provider_settings == {"url": DAV_URL, "username": "sync-bot"}
    assert dav.secrets == {"password": DAV_PASSWORD}

    ews = configs["acme-ews"]
    assert ews.provider == "exchange"
    assert ews.provider_settings == {"url": EWS_URL, "username": "svc-sync@acme.com"}
    assert ews.secrets == {"password": EWS_PASSWORD}  # file content, newline stripped
    assert ews.establishments == ["paris", "lyon"]
    assert ews.hide_labels is False
    assert ews.hidden_label == "Away"
    assert ews.whole_days_as_timed is True
    assert ews.morning_span == TimeSpan(dt.time(8, 30), dt.time(12, 0))
    assert ews.afternoon_span == TimeSpan(dt.time(14, 0), dt.time(17, 30))
    assert ews.time_zone == "Europe/Paris"
    assert ews.sync_pending is False
    assert (ews.busy_as, ews.free_as) == ("oof", "workingElsewhere")
    assert ews.private is True
    assert ews.category == "Absences"

    o365 = configs["acme-o365"]
    assert o365.provider_settings == {"tenant_id": "6f1e2d3c-0000-4000-8000-123456789abc"}
    assert o365.secrets == {}

    google = configs["globex-google"]
    assert google.tenant == "globex"
    assert google.provider_settings == {}
    assert google.secrets == {"service_account": SERVICE_ACCOUNT}


def test_defaults_of_spec_section_4(tmp_path: Path, secret_files: dict[str, Path]) -> None:
    dav = load_file(good_file(tmp_path, secret_files))[0]
    assert dav.establishments is None  # all establishments
    assert dav.hide_labels is True
    assert dav.hidden_label == "Absent"
    assert dav.whole_days_as_timed is False
    assert dav.morning == "09:00-12:30"
    assert dav.morning_span == TimeSpan(dt.time(9, 0), dt.time(12, 30))
    assert dav.afternoon == "13:30-18:00"
    assert dav.afternoon_span == TimeSpan(dt.time(13, 30), dt.time(18, 0))
    assert dav.time_zone == "UTC"
    assert dav.sync_pending is True
    assert dav.busy_as == "busy"
    assert dav.free_as == "free"
    assert dav.private is False
    assert dav.category is None


def test_secret_values_never_in_public_views(
    tmp_path: Path, secret_files: dict[str, Path]
) -> None:
    for config in load_file(good_file(tmp_path, secret_files)):
        shown = json.dumps(config.public_dict()) + repr(config) + str(config)
        for secret in (DAV_PASSWORD, EWS_PASSWORD, "BEGIN-----x"):
            assert secret not in shown
        assert config.public_dict()["secrets"] == sorted(config.secrets)


@pytest.mark.parametrize(
    ("provider", "block"),
    [
        ("caldav", f'{{url: "{DAV_URL}", username: u, password: hunter2-inline}}'),
        ("exchange", f"{{url: {EWS_URL}, username: u, password: hunter2-inline}}"),
        ("google", "{service_account: hunter2-inline}"),
    ],
)
def test_inline_secrets_refused(tmp_path: Path, provider: str, block: str) -> None:
    path = write(
        tmp_path / "inline.yaml",
        f"""
        syncs:
          - id: leaky
            tenant: acme
            provider: {provider}
            {provider}: {block}
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "'leaky'" in message
    assert "never inline" in message
    assert "_env" in message and "_file" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("provider", "block", "key", "suggestion", "more"),
    [
        ("caldav", f'{{url: "{DAV_URL}", pasword_env: TEST_DAV_PASSWORD}}', "pasword_env",
         "password_env", ""),
        ("caldav", f'{{url: "{DAV_URL}", token: hunter2-inline}}', "token", None, ""),
        ("caldav", f'{{url: "{DAV_URL}", username_file: /run/secrets/u}}', "username_file",
         "username_env", ""),
        ("exchange", f"{{url: {EWS_URL}, usrname: u, password_env: TEST_DAV_PASSWORD}}",
         "usrname", "username", ""),
        ("microsoft365", "{tenantid: 6f1e2d3c-0000-4000-8000-123456789abc}", "tenantid",
         "tenant_id", ""),
        ("microsoft365", "{tenant_id: t, client_secret: hunter2-inline}", "client_secret",
         None, "ABSENCE_SYNC_MS_CLIENT_SECRET"),
        ("google", "{service_account_env: TEST_DAV_PASSWORD, calendarid: primary}",
         "calendarid", "calendar_id", ""),
        ("google", "{service_account_env: TEST_DAV_PASSWORD, private_key: hunter2-inline}",
         "private_key", None, ""),
    ],
)
def test_unknown_block_keys_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, provider: str, block: str, key: str,
    suggestion: str | None, more: str,
) -> None:
    """Only the keys a provider knows: nothing can slip into the plain, printed settings."""
    monkeypatch.setenv("TEST_DAV_PASSWORD", DAV_PASSWORD)
    path = write(
        tmp_path / "unknown.yaml",
        f"""
        syncs:
          - id: typo
            tenant: acme
            provider: {provider}
            {provider}: {block}
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_file(path)
    message = str(info.value)
    assert f"sync 'typo': field '{provider}.{key}': unknown key" in message
    if suggestion is not None:
        assert f"did you mean '{suggestion}'?" in message
    else:
        assert "did you mean" not in message
    assert more in message
    assert "hunter2" not in message and DAV_PASSWORD not in message


def test_block_values_have_their_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_DAV_PASSWORD", DAV_PASSWORD)
    for provider, block, field, words in [
        ("google", "{service_account_env: TEST_DAV_PASSWORD, calendar_id: [a, b]}",
         "google.calendar_id", "text"),
        ("caldav", "{url: 5}", "caldav.url", "text"),
        ("microsoft365", "{tenant_id: {nested: secret}}", "microsoft365.tenant_id", "text"),
    ]:
        path = write(tmp_path / "typed.yaml", f"""
            syncs:
              - {{id: typed, tenant: acme, provider: {provider}, {provider}: {block}}}
            """)
        with pytest.raises(ConfigError, match=rf"field '{field}': must be {words}"):
            load_file(path)


def test_caldav_username_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_DAV_USER", "sync-bot@acme.com")
    monkeypatch.setenv("TEST_DAV_PASSWORD", DAV_PASSWORD)
    path = write(tmp_path / "user.yaml", f"""
        syncs:
          - id: env-user
            tenant: acme
            provider: caldav
            caldav: {{url: "{DAV_URL}", username_env: TEST_DAV_USER,
                     password_env: TEST_DAV_PASSWORD}}
        """)
    (config,) = load_file(path)
    assert config.provider_settings == {"url": DAV_URL}
    assert config.secrets == {"username": "sync-bot@acme.com", "password": DAV_PASSWORD}

    both = write(tmp_path / "both.yaml", f"""
        syncs:
          - id: twice
            tenant: acme
            provider: caldav
            caldav: {{url: "{DAV_URL}", username: a, username_env: TEST_DAV_USER}}
        """)
    with pytest.raises(ConfigError, match=r"field 'caldav.username_env': 'username' already"):
        load_file(both)


def test_registry_is_what_other_providers_extend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_DAV_PASSWORD", DAV_PASSWORD)
    monkeypatch.setitem(PROVIDER_BLOCKS, "google", BlockSpec(
        plain={"calendar_id": str, "colour": str},
        secrets=frozenset({"service_account"}),
        required=("service_account",),
    ))
    path = write(tmp_path / "ext.yaml", """
        syncs:
          - id: ext
            tenant: acme
            provider: google
            google: {service_account_env: TEST_DAV_PASSWORD, colour: blue}
        """)
    (config,) = load_file(path)
    assert config.provider_settings == {"colour": "blue"}


def test_configurations_built_in_code_are_checked_too() -> None:
    """A backstop for configurations made without a file (the API, tests)."""
    with pytest.raises(ValueError, match="unknown caldav setting 'password'"):
        SyncConfig(id="x", tenant="acme", provider="caldav",
                   provider_settings={"url": DAV_URL, "password": "hunter2-inline"})
    with pytest.raises(ValueError, match="unknown microsoft365 secret 'client_secret'"):
        SyncConfig(id="x", tenant="acme", provider="microsoft365",
                   secrets={"client_secret": "hunter2-inline"})


def test_caldav_plain_http_allowed_on_localhost_only(tmp_path: Path) -> None:
    """The embedded demo CalDAV server listens on plain HTTP on this machine."""
    path = write(
        tmp_path / "demo.yaml",
        """
        syncs:
          - id: demo
            tenant: demo
            provider: caldav
            caldav: {url: "http://127.0.0.1:5232/{email}/calendar/"}
        """,
    )
    assert load_file(path)[0].provider_settings["url"].startswith("http://127.0.0.1:")


# --- bad files ---------------------------------------------------------------

BASE = {
    "id": "bad-one",
    "tenant": "acme",
    "provider": "caldav",
    "caldav": {"url": DAV_URL, "username": "u", "password_env": "TEST_DAV_PASSWORD"},
}
EXCHANGE = {
    "id": "bad-one",
    "tenant": "acme",
    "provider": "exchange",
    "exchange": {"url": EWS_URL, "username": "u", "password_env": "TEST_DAV_PASSWORD"},
}


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not None}


def syncs_doc(*entries: dict[str, Any]) -> str:
    good = with_(BASE, id="good-one")
    return json.dumps({"syncs": [good, *entries]})  # JSON is YAML


BAD_FILES: list[tuple[str, str, str | None, str | None, str]] = [
    # case, file text, sync id named, field named, other words
    ("unknown provider", syncs_doc(with_(BASE, provider="outlook")), "bad-one", "provider",
     "microsoft365, exchange, google"),
    ("missing tenant", syncs_doc(with_(BASE, tenant=None)), "bad-one", "tenant", "required"),
    ("empty tenant", syncs_doc(with_(BASE, tenant="")), "bad-one", "tenant", "at least 1"),
    ("bad time_zone", syncs_doc(with_(BASE, time_zone="Mars/Olympus_Mons")), "bad-one",
     "time_zone", "Mars/Olympus_Mons"),
    ("time_zone folder", syncs_doc(with_(BASE, time_zone="Europe")), "bad-one",
     "time_zone", "unknown IANA time zone"),
    ("backwards morning", syncs_doc(with_(BASE, morning="12:00-09:00")), "bad-one",
     "morning", "ends before it starts"),
    ("empty morning", syncs_doc(with_(BASE, morning="09:00-09:00")), "bad-one",
     "morning", "ends before it starts"),
    ("impossible afternoon", syncs_doc(with_(BASE, afternoon="13:30-25:00")), "bad-one",
     "afternoon", "impossible time"),
    ("busy_as away", syncs_doc(with_(BASE, busy_as="away")), "bad-one", "busy_as", "oof"),
    ("unknown field", syncs_doc(with_(BASE, colour="blue")), "bad-one", "colour", ""),
    ("secrets given directly", syncs_doc(with_(BASE, secrets={"password": "p"})), "bad-one",
     "secrets", "unknown field"),
    ("establishments not a list", syncs_doc(with_(BASE, establishments="paris")), "bad-one",
     "establishments", ""),
    ("duplicated id", syncs_doc(with_(BASE, id="good-one")), "good-one", "id", "duplicated"),
    ("exchange url http", syncs_doc(with_(EXCHANGE, exchange={
        "url": "http://mail.acme.com/EWS/Exchange.asmx", "username": "u",
        "password_env": "TEST_DAV_PASSWORD"})), "bad-one", "exchange.url", "https://"),
    ("exchange url http localhost", syncs_doc(with_(EXCHANGE, exchange={
        "url": "http://localhost:8443/EWS/Exchange.asmx", "username": "u",
        "password_env": "TEST_DAV_PASSWORD"})), "bad-one", "exchange.url", "https://"),
    ("exchange without username", syncs_doc(with_(EXCHANGE, exchange={
        "url": EWS_URL, "password_env": "TEST_DAV_PASSWORD"})), "bad-one",
     "exchange.username", "required"),
    ("caldav url http remote", syncs_doc(with_(BASE, caldav={
        "url": "http://dav.example.com/{email}/"})), "bad-one", "caldav.url", "https://"),
    ("caldav url with credentials", syncs_doc(with_(BASE, caldav={
        "url": f"https://bob:{DAV_PASSWORD}@dav.example.com/{{email}}/"})), "bad-one",
     "caldav.url", "must not hold a user name or password"),
    ("caldav url with a user name", syncs_doc(with_(BASE, caldav={
        "url": "https://bob@dav.example.com/{email}/"})), "bad-one",
     "caldav.url", "must not hold a user name or password"),
    ("exchange url with credentials", syncs_doc(with_(EXCHANGE, exchange={
        "url": f"https://svc:{DAV_PASSWORD}@mail.acme.com/EWS/Exchange.asmx", "username": "u",
        "password_env": "TEST_DAV_PASSWORD"})), "bad-one", "exchange.url", "user name"),
    ("misspelled secret key", syncs_doc(with_(BASE, caldav={
        "url": DAV_URL, "pasword_env": "TEST_DAV_PASSWORD"})), "bad-one",
     "caldav.pasword_env", "did you mean 'password_env'?"),
    ("secret given twice", syncs_doc(with_(BASE, caldav={
        "url": DAV_URL, "password_env": "TEST_DAV_PASSWORD",
        "password_file": "/run/secrets/dav"})), "bad-one", "caldav.password_file", "keep one"),
    ("missing env var", syncs_doc(with_(BASE, caldav={
        "url": DAV_URL, "password_env": "TEST_NO_SUCH_VARIABLE"})), "bad-one",
     "caldav.password_env", "TEST_NO_SUCH_VARIABLE"),
    ("empty env var", syncs_doc(with_(BASE, caldav={
        "url": DAV_URL, "password_env": "TEST_EMPTY_VARIABLE"})), "bad-one",
     "caldav.password_env", "empty"),
    ("unreadable file", syncs_doc(with_(EXCHANGE, exchange={
        "url": EWS_URL, "username": "u", "password_file": "/nonexistent/ews.password"})),
     "bad-one", "exchange.password_file", "/nonexistent/ews.password"),
    ("block for another provider", syncs_doc(with_(BASE, exchange={"url": EWS_URL})),
     "bad-one", "exchange", "does not match provider caldav"),
    ("provider block not a mapping", syncs_doc(with_(BASE, caldav="https://dav")),
     "bad-one", "caldav", "mapping"),
    ("id not text", syncs_doc(with_(BASE, id=["a", "b"])), None, "id", "syncs[1]"),
    ("bad id", syncs_doc(with_(BASE, id="no spaces please")), "no spaces please", "id", ""),
    ("top-level list", "- id: a\n  tenant: acme\n", None, None, "syncs:"),
    ("syncs not a list", "syncs:\n  id: a\n", None, None, "syncs:"),
    ("empty file", "", None, None, "syncs:"),
    ("entry not a mapping", "syncs:\n  - just-a-string\n", None, None, "syncs[0]"),
    ("YAML syntax error", "syncs:\n  - id: a\n    tenant: [acme\n", None, None, "YAML"),
]


@pytest.mark.parametrize(
    ("text", "sync_id", "field", "words"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_bad_file_message_names_file_sync_and_field(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    sync_id: str | None,
    field: str | None,
    words: str,
) -> None:
    monkeypatch.setenv("TEST_DAV_PASSWORD", DAV_PASSWORD)
    monkeypatch.setenv("TEST_EMPTY_VARIABLE", "")
    monkeypatch.delenv("TEST_NO_SUCH_VARIABLE", raising=False)
    path = tmp_path / "syncs.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    if sync_id is not None:
        assert f"sync {sync_id!r}" in message
    if field is not None:
        assert f"field '{field}'" in message
    assert words in message
    assert DAV_PASSWORD not in message
    assert "\n" not in message.split(": not valid YAML")[0]


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_file(tmp_path / "nope.yaml")


# --- storage -----------------------------------------------------------------


def box_with(*keys: bytes) -> SecretBox:
    return SecretBox(",".join(k.decode() for k in keys))


def dav(config_id: str = "acme-dav", tenant: str = "acme", **changes: Any) -> SyncConfig:
    fields: dict[str, Any] = {
        "id": config_id,
        "tenant": tenant,
        "provider": "caldav",
        "provider_settings": {"url": DAV_URL, "username": "sync-bot"},
        "secrets": {"password": DAV_PASSWORD},
    }
    fields.update(changes)
    return SyncConfig(**fields)


def o365(config_id: str = "acme-o365", tenant: str = "acme") -> SyncConfig:
    return SyncConfig(
        id=config_id, tenant=tenant, provider="microsoft365",
        provider_settings={"tenant_id": "6f1e2d3c-0000-4000-8000-123456789abc"},
    )


async def add_absences(pool: asyncpg.Pool, tenant: str, *ids: str) -> None:
    for absence_id in ids:
        await pool.execute(
            "INSERT INTO absences (tenant, id, version, deleted, data, event_time)"
            " VALUES ($1, $2, 1, false, $3::jsonb, now())",
            tenant, absence_id, json.dumps(event(absence_id, 1, tenant=tenant)["data"]),
        )


async def add_items(pool: asyncpg.Pool, config_id: str, tenant: str, **status: str) -> None:
    """Items for existing absences, as if already worked on: absence id -> status."""
    for absence_id, state in status.items():
        await pool.execute(
            "INSERT INTO sync_items (config_id, tenant, absence_id, change_seq, done_seq,"
            " status, attempts, event_id)"
            " VALUES ($1, $2, $3, 3, 3, $4, $5, $6)",
            config_id, tenant, absence_id, state, 5 if state == "failed" else 0,
            None if state == "failed" else f"evt-{absence_id}",
        )


async def items(pool: asyncpg.Pool, config_id: str) -> dict[str, dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT absence_id, tenant, change_seq, done_seq, status, attempts FROM sync_items"
        " WHERE config_id = $1",
        config_id,
    )
    return {r["absence_id"]: dict(r) for r in rows}


def pending(rows: dict[str, dict[str, Any]]) -> set[str]:
    return {k for k, r in rows.items() if r["change_seq"] > r["done_seq"]}


async def test_apply_created_updated_unchanged(pool: asyncpg.Pool) -> None:
    box = box_with(Fernet.generate_key())
    first = await store.apply_configs(pool, [dav(), o365()], box)
    assert first == {"acme-dav": "created", "acme-o365": "created"}

    again = await store.apply_configs(pool, [dav(), o365()], box)
    assert again == {"acme-dav": "unchanged", "acme-o365": "unchanged"}

    changed = await store.apply_configs(pool, [dav(hidden_label="Away"), o365()], box)
    assert changed == {"acme-dav": "updated", "acme-o365": "unchanged"}
    rotated = await store.apply_configs(
        pool, [dav(hidden_label="Away", secrets={"password": "new-one"})], box
    )
    assert rotated == {"acme-dav": "updated"}

    stored = {s.config.id: s for s in await store.list_configs(pool)}
    assert stored["acme-dav"].revision == 3
    assert stored["acme-o365"].revision == 1
    assert stored["acme-dav"].config.hidden_label == "Away"
    assert stored["acme-dav"].config.secrets == {}  # no box: secrets not even decrypted
    assert stored["acme-dav"].secret_names == ("password",)  # ...but their names are known
    assert stored["acme-o365"].secret_names == ()
    full = await store.get_config(pool, "acme-dav", box)
    assert full is not None
    assert full.config == dav(hidden_label="Away", secrets={"password": "new-one"})
    assert await store.get_config(pool, "nope") is None


async def test_secrets_stored_encrypted(pool: asyncpg.Pool) -> None:
    key = Fernet.generate_key()
    await store.apply_configs(pool, [dav(), o365()], box_with(key))
    rows = {r["id"]: r for r in await pool.fetch("SELECT id, secrets, settings FROM sync_configs")}
    token = bytes(rows["acme-dav"]["secrets"])
    assert DAV_PASSWORD.encode() not in token
    assert DAV_PASSWORD not in rows["acme-dav"]["settings"]
    assert json.loads(Fernet(key).decrypt(token)) == {"password": DAV_PASSWORD}
    assert rows["acme-o365"]["secrets"] is None  # nothing to hide


async def test_store_refuses_secrets_without_keys(pool: asyncpg.Pool) -> None:
    with pytest.raises(SecretsError, match="ABSENCE_SYNC_SECRET_KEYS"):
        await store.apply_configs(pool, [o365(), dav()], SecretBox(None))
    assert await store.list_configs(pool) == []
    # a configuration without secrets needs no key
    assert await store.apply_configs(pool, [o365()], SecretBox(None)) == {"acme-o365": "created"}


async def test_apply_is_one_transaction(pool: asyncpg.Pool) -> None:
    """A failure on the 3rd configuration leaves the first two unapplied."""
    old_key, new_key = Fernet.generate_key(), Fernet.generate_key()
    await store.apply_configs(pool, [dav("c-3")], box_with(old_key))
    with pytest.raises(SecretsError):
        # c-3's stored secrets cannot be compared: the key that encrypted them is gone
        await store.apply_configs(
            pool, [dav("c-1"), o365("c-2"), dav("c-3", hidden_label="X")], box_with(new_key)
        )
    assert [s.config.id for s in await store.list_configs(pool)] == ["c-3"]


@pytest.mark.parametrize(
    "change",
    [
        {"hide_labels": False},
        {"hidden_label": "Out of office"},
        {"whole_days_as_timed": True},
        {"morning": "08:00-12:00"},
        {"time_zone": "Europe/Paris"},
        {"sync_pending": False},
        {"busy_as": "oof"},
        {"private": True},
        {"category": "HR"},
        {"establishments": ["paris"]},
    ],
    ids=lambda change: next(iter(change)),
)
async def test_render_change_requeues_every_item(
    pool: asyncpg.Pool, change: dict[str, Any]
) -> None:
    box = box_with(Fernet.generate_key())
    await store.apply_configs(pool, [dav(), dav("other")], box)
    await add_absences(pool, "acme", "abs-1", "abs-2", "abs-3")
    await add_items(pool, "acme-dav", "acme", **{"abs-1": "synced", "abs-2": "failed",
                                                  "abs-3": "deleted"})
    await add_items(pool, "other", "acme", **{"abs-1": "synced", "abs-2": "failed"})

    assert await store.apply_configs(pool, [dav(**change)], box) == {"acme-dav": "updated"}

    rows = await items(pool, "acme-dav")
    assert pending(rows) == {"abs-1", "abs-2", "abs-3"}
    assert all(r["status"] == "pending" and r["attempts"] == 0 for r in rows.values())
    assert pending(await items(pool, "other")) == set()  # another configuration: untouched


async def test_unchanged_apply_requeues_nothing(pool: asyncpg.Pool) -> None:
    box = box_with(Fernet.generate_key())
    await store.apply_configs(pool, [dav()], box)
    await add_absences(pool, "acme", "abs-1", "abs-2")
    await add_items(pool, "acme-dav", "acme", **{"abs-1": "synced", "abs-2": "failed"})
    assert await store.apply_configs(pool, [dav()], box) == {"acme-dav": "unchanged"}
    assert pending(await items(pool, "acme-dav")) == set()


@pytest.mark.parametrize(
    "change",
    [
        {"secrets": {"password": "the-fixed-password"}},
        {"provider_settings": {"url": DAV_URL, "username": "fixed-bot"}},
    ],
    ids=["password", "username"],
)
async def test_credential_change_requeues_failed_items_only(
    pool: asyncpg.Pool, change: dict[str, Any]
) -> None:
    box = box_with(Fernet.generate_key())
    await store.apply_configs(pool, [dav()], box)
    await add_absences(pool, "acme", "abs-1", "abs-2", "abs-3")
    await add_items(pool, "acme-dav", "acme", **{"abs-1": "synced", "abs-2": "failed",
                                                  "abs-3": "failed"})

    assert await store.apply_configs(pool, [dav(**change)], box) == {"acme-dav": "updated"}

    rows = await items(pool, "acme-dav")
    assert pending(rows) == {"abs-2", "abs-3"}
    assert rows["abs-2"]["status"] == "pending"
    assert rows["abs-2"]["attempts"] == 0
    assert rows["abs-1"]["status"] == "synced"
    stored = await store.get_config(pool, "acme-dav", box)
    assert stored is not None and stored.config == dav(**change)


async def test_new_config_backfills_items_of_its_tenant(pool: asyncpg.Pool) -> None:
    await add_absences(pool, "acme", "abs-1", "abs-2")
    await add_absences(pool, "globex", "abs-9")
    box = box_with(Fernet.generate_key())
    await store.apply_configs(pool, [dav(), o365("globex-o365", "globex")], box)

    acme = await items(pool, "acme-dav")
    assert set(acme) == {"abs-1", "abs-2"}
    assert pending(acme) == {"abs-1", "abs-2"}
    assert {r["tenant"] for r in acme.values()} == {"acme"}
    assert set(await items(pool, "globex-o365")) == {"abs-9"}


async def test_another_tenants_configuration_id_is_refused(pool: asyncpg.Pool) -> None:
    """Ids are unique across tenants: reusing one is an error, never a silent move."""
    box = box_with(Fernet.generate_key())
    await store.apply_configs(pool, [dav()], box)
    await add_absences(pool, "acme", "abs-1", "abs-2")
    await add_absences(pool, "globex", "abs-7")
    await add_items(pool, "acme-dav", "acme", **{"abs-1": "synced", "abs-2": "synced"})
    before = await pool.fetch("SELECT * FROM sync_configs ORDER BY id")
    items_before = await items(pool, "acme-dav")

    with pytest.raises(store.ConflictError) as info:
        await store.apply_configs(pool, [dav("globex-new", tenant="globex"),
                                         dav(tenant="globex")], box)
    assert "'acme-dav' is taken by another tenant" in str(info.value)
    assert "acme" not in str(info.value).replace("acme-dav", "")  # the owner is not named
    assert await pool.fetch("SELECT * FROM sync_configs ORDER BY id") == before  # all or nothing
    assert await items(pool, "acme-dav") == items_before


async def test_another_tenants_directory_is_refused(pool: asyncpg.Pool) -> None:
    await store.apply_configs(pool, [o365()], SecretBox(None))
    with pytest.raises(store.ConflictError, match="linked to a configuration of another tenant"):
        await store.apply_configs(pool, [o365("globex-o365", "globex")], SecretBox(None))
    # the same tenant may point several configurations at its directory
    assert await store.apply_configs(pool, [o365("acme-o365-b")], SecretBox(None)) == {
        "acme-o365-b": "created"
    }
    assert [s.config.id for s in await store.list_configs(pool)] == ["acme-o365", "acme-o365-b"]


async def test_cli_refuses_another_tenants_id(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    first = write(tmp_path / "acme.yaml", """
        syncs:
          - {id: shared-id, tenant: acme, provider: microsoft365}
        """)
    assert cli(dsn, "config", "apply", "-f", str(first)).returncode == 0
    second = write(tmp_path / "globex.yaml", """
        syncs:
          - {id: shared-id, tenant: globex, provider: microsoft365}
        """)
    refused = cli(dsn, "config", "apply", "-f", str(second))
    assert refused.returncode == 2
    assert "'shared-id' is taken by another tenant" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert await pool.fetchval("SELECT tenant FROM sync_configs WHERE id = 'shared-id'") == "acme"


async def test_reencrypt_rotates_to_the_first_key(pool: asyncpg.Pool) -> None:
    key_a, key_b = Fernet.generate_key(), Fernet.generate_key()
    await store.apply_configs(pool, [dav(), o365()], box_with(key_a))

    assert await store.reencrypt(pool, box_with(key_b, key_a)) == 1  # o365 holds no secret

    token = bytes(await pool.fetchval("SELECT secrets FROM sync_configs WHERE id = 'acme-dav'"))
    assert json.loads(Fernet(key_b).decrypt(token)) == {"password": DAV_PASSWORD}
    with pytest.raises(InvalidToken):
        Fernet(key_a).decrypt(token)
    stored = await store.get_config(pool, "acme-dav", box_with(key_b))
    assert stored is not None and stored.config.secrets == {"password": DAV_PASSWORD}
    with pytest.raises(SecretsError):
        await store.get_config(pool, "acme-dav", box_with(key_a))
    # once rotated, the old key may go: applying the same file changes nothing
    assert await store.apply_configs(pool, [dav()], box_with(key_b)) == {"acme-dav": "unchanged"}


async def test_reencrypt_without_the_old_key_changes_nothing(pool: asyncpg.Pool) -> None:
    key_a, key_b = Fernet.generate_key(), Fernet.generate_key()
    await store.apply_configs(pool, [dav(), dav("acme-dav-2")], box_with(key_a))
    before = await pool.fetch("SELECT id, secrets FROM sync_configs ORDER BY id")
    with pytest.raises(SecretsError):
        await store.reencrypt(pool, box_with(key_b))
    assert await pool.fetch("SELECT id, secrets FROM sync_configs ORDER BY id") == before


# --- all or nothing, through the command ---------------------------------------


def cli(dsn: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("ABSENCE_SYNC_")}
    return subprocess.run(
        [str(SCRIPT), *args],
        env={**base, "ABSENCE_SYNC_DATABASE_URL": dsn, **env},
        capture_output=True, text=True, timeout=120, check=False,
    )


async def test_cli_apply_is_all_or_nothing(
    dsn: str, pool: asyncpg.Pool, tmp_path: Path, secret_files: dict[str, Path]
) -> None:
    keys = {"ABSENCE_SYNC_SECRET_KEYS": Fernet.generate_key().decode(),
            "TEST_DAV_PASSWORD": DAV_PASSWORD}
    good = good_file(tmp_path, secret_files)
    done = cli(dsn, "config", "apply", "-f", str(good), **keys)
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) >= {"acme-dav:", "acme-ews:", "acme-o365:", "created"}
    before = await pool.fetch("SELECT * FROM sync_configs ORDER BY id")
    assert [r["id"] for r in before] == ["acme-dav", "acme-ews", "acme-o365", "globex-google"]

    # two changes and a new configuration, then a bad 3rd entry
    bad = write(
        tmp_path / "bad.yaml",
        f"""
        syncs:
          - id: acme-dav
            tenant: acme
            provider: caldav
            hide_labels: false
            caldav: {{url: "{DAV_URL}"}}
          - id: acme-new
            tenant: acme
            provider: microsoft365
            microsoft365: {{tenant_id: x}}
          - id: acme-broken
            tenant: acme
            provider: caldav
            busy_as: away
            caldav: {{url: "{DAV_URL}"}}
          - id: acme-o365
            tenant: acme
            provider: microsoft365
            category: Later
            microsoft365: {{tenant_id: y}}
        """,
    )
    refused = cli(dsn, "config", "apply", "-f", str(bad), **keys)
    assert refused.returncode == 2
    assert str(bad) in refused.stderr
    assert "'acme-broken'" in refused.stderr and "busy_as" in refused.stderr
    assert await pool.fetch("SELECT * FROM sync_configs ORDER BY id") == before


async def test_provider_warnings_are_stored_without_a_new_revision(pool: asyncpg.Pool) -> None:
    from tests.harness import apply, sync_config

    await apply(pool, sync_config("warned"))
    assert await store.set_config_warnings(pool, "warned", ["Exchange 2010 is out of support"])
    assert not await store.set_config_warnings(pool, "warned", ["Exchange 2010 is out of support"])
    stored = await store.get_config(pool, "warned")
    assert stored is not None
    assert stored.warnings == ("Exchange 2010 is out of support",)
    assert stored.revision == 1
    assert await store.set_config_warnings(pool, "warned", [])
    stored = await store.get_config(pool, "warned")
    assert stored is not None and stored.warnings == ()
