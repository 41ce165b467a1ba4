"""ABSENCE_SYNC_* settings (README, 'Settings'): defaults, overrides, readable errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from consumer.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an environment without any ABSENCE_SYNC_* variable."""
    for name in list(os.environ):
        if name.upper().startswith("ABSENCE_SYNC_"):
            monkeypatch.delenv(name)


def test_defaults_are_those_of_the_spec() -> None:
    settings = load_settings()
    assert settings.kafka_bootstrap_servers is None  # embedded broker
    assert settings.database_url is None  # embedded PostgreSQL
    assert settings.topic == "absences"
    assert settings.dlq_topic == "absences.dlq"
    assert settings.group_id == "absence-sync"
    assert settings.http_port == 8080
    assert settings.secret_keys is None
    assert settings.ca_bundle is None
    assert settings.ms_client_id is None
    assert settings.ms_client_secret is None
    assert settings.ms_authority_host == "https://login.microsoftonline.com"
    assert settings.ms_graph_url == "https://graph.microsoft.com/v1.0"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here\n")
    key_a, key_b = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    env = {
        "ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9092,kafka-2:9092",
        "ABSENCE_SYNC_TOPIC": "hr.absences",
        "ABSENCE_SYNC_DLQ_TOPIC": "hr.absences.dead",
        "ABSENCE_SYNC_GROUP_ID": "calendars",
        "ABSENCE_SYNC_DATABASE_URL": "postgresql://sync@db.internal:5432/sync",
        "ABSENCE_SYNC_HTTP_PORT": "9100",
        "ABSENCE_SYNC_SECRET_KEYS": f"{key_a}, {key_b}",
        "ABSENCE_SYNC_CA_BUNDLE": str(ca),
        "ABSENCE_SYNC_MS_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
        "ABSENCE_SYNC_MS_CLIENT_SECRET": "app-secret",
        "ABSENCE_SYNC_MS_AUTHORITY_HOST": "https://login.microsoftonline.us/",
        "ABSENCE_SYNC_MS_GRAPH_URL": "https://graph.microsoft.us/v1.0/",
        "ABSENCE_SYNC_LOG_LEVEL": "debug",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.kafka_bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert settings.topic == "hr.absences"
    assert settings.dlq_topic == "hr.absences.dead"
    assert settings.group_id == "calendars"
    assert settings.database_url == "postgresql://sync@db.internal:5432/sync"
    assert settings.http_port == 9100
    assert settings.secret_keys == f"{key_a}, {key_b}"
    assert settings.ca_bundle == ca
    assert settings.ms_client_id == "11111111-2222-3333-4444-555555555555"
    assert settings.ms_client_secret == "app-secret"
    # a trailing slash would double the '/' when paths are appended
    assert settings.ms_authority_host == "https://login.microsoftonline.us"
    assert settings.ms_graph_url == "https://graph.microsoft.us/v1.0"
    assert settings.log_level == "DEBUG"


def test_empty_database_url_means_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABSENCE_SYNC_DATABASE_URL", "")
    monkeypatch.setenv("ABSENCE_SYNC_SECRET_KEYS", " ")
    settings = load_settings()
    assert settings.database_url is None
    assert settings.secret_keys is None


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("ABSENCE_SYNC_HTTP_PORT", "abc", "valid integer"),
        ("ABSENCE_SYNC_HTTP_PORT", "70000", "less than or equal to 65535"),
        ("ABSENCE_SYNC_SECRET_KEYS", "notakey", "key #1 is not a Fernet key"),
        ("ABSENCE_SYNC_CA_BUNDLE", "/nonexistent/ca.pem", "does not exist"),
        ("ABSENCE_SYNC_MS_GRAPH_URL", "ftp://graph.example.com", "https://"),
        ("ABSENCE_SYNC_MS_AUTHORITY_HOST", "login.microsoftonline.com", "https://"),
        ("ABSENCE_SYNC_DATABASE_URL", "mysql://db/sync", "postgresql://"),
        ("ABSENCE_SYNC_LOG_LEVEL", "chatty", "DEBUG, INFO"),
        ("ABSENCE_SYNC_LOG_FORMAT", "xml", "'json' or 'console'"),
        ("ABSENCE_SYNC_TOPIC_PARTITIONS", "0", "greater than or equal to 1"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert f"{variable}: " in message
    assert expected in message
    # only the bad variable is reported
    assert message.count("ABSENCE_SYNC_") == 1


def test_every_bad_variable_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABSENCE_SYNC_HTTP_PORT", "abc")
    monkeypatch.setenv("ABSENCE_SYNC_BATCH_SIZE", "0")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "ABSENCE_SYNC_HTTP_PORT" in str(info.value)
    assert "ABSENCE_SYNC_BATCH_SIZE" in str(info.value)


def test_second_key_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABSENCE_SYNC_SECRET_KEYS", f"{Fernet.generate_key().decode()},oops")
    with pytest.raises(SettingsError, match=r"ABSENCE_SYNC_SECRET_KEYS: key #2 is not"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # a mistyped key is still (most of) a key: never echoed to a terminal or a log
        ("ABSENCE_SYNC_SECRET_KEYS", "Zm9vYmFyLXRoaXMtaXMtYWxtb3N0LWEta2V5LXNlY3JldA"),
        ("ABSENCE_SYNC_DATABASE_URL", "pg://sync:hunter2-db-password@db/sync"),
    ],
)
def test_errors_never_echo_secret_values(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert variable in str(info.value)
    assert value not in str(info.value)
    assert "hunter2" not in str(info.value)


def test_non_secret_errors_show_the_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABSENCE_SYNC_HTTP_PORT", "80a80")
    with pytest.raises(SettingsError, match="80a80"):
        load_settings()


def test_settings_accept_python_values() -> None:
    """Tests and embedders build Settings directly; the same checks apply."""
    settings = Settings(http_port=0, database_url="postgres://u@h/db", log_level="warning")
    assert settings.http_port == 0
    assert settings.log_level == "WARNING"


@pytest.mark.parametrize(
    "variable", ["ABSENCE_SYNC_MS_GRAPH_URL", "ABSENCE_SYNC_MS_AUTHORITY_HOST"]
)
def test_microsoft_urls_must_be_https(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    for refused in ("http://graph.example.com/v1.0", "http://localhost:8443",
                    "https://", "https://svc:hunter2-in-url@login.example.com"):
        monkeypatch.setenv(variable, refused)
        with pytest.raises(SettingsError) as info:
            load_settings()
        assert f"{variable}: must" in str(info.value)
        assert "hunter2" not in str(info.value)
    monkeypatch.setenv(variable, "http://localhost:8443")
    with pytest.raises(SettingsError, match="ABSENCE_SYNC_ALLOW_INSECURE_LOCALHOST=true"):
        load_settings()
    # a test double on this machine may speak plain http when a setting says so
    monkeypatch.setenv("ABSENCE_SYNC_ALLOW_INSECURE_LOCALHOST", "true")
    assert load_settings().model_dump()[variable.removeprefix("ABSENCE_SYNC_").lower()] == (
        "http://localhost:8443"
    )
    monkeypatch.setenv(variable, "http://graph.example.com")
    with pytest.raises(SettingsError):
        load_settings()


def test_create_topics_defaults_to_embedded_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().create_topics is None
    monkeypatch.setenv("ABSENCE_SYNC_CREATE_TOPICS", "true")
    assert load_settings().create_topics is True


@pytest.mark.parametrize(
    ("dsn", "warned", "words"),
    [
        ("postgresql://sync@db.internal/sync", True, "sslmode=prefer"),
        ("postgresql://sync@db.internal/sync?sslmode=disable", True, "without verified TLS"),
        ("postgresql://sync@db.internal:5432/sync?sslmode=require", True, "server's name"),
        ("postgresql://sync@db.internal/sync?sslmode=verify-ca", True, "server's name"),
        ("postgresql://sync@db.internal/sync?sslmode=verify-full", False, ""),
        ("postgresql://sync@a.internal:5432,b.internal:5433/sync", True, "a.internal, b.internal"),
        ("postgresql://sync@localhost/sync", False, ""),
        ("postgresql://sync@127.0.0.1:5432/sync?sslmode=disable", False, ""),
        ("postgresql://sync@[::1]:5432/sync", False, ""),
        ("postgresql:///sync?host=/var/run/postgresql", False, ""),
        ("postgresql://sync@/sync?host=db.internal", True, "db.internal"),
    ],
)
def test_database_without_verified_tls_is_named(dsn: str, warned: bool, words: str) -> None:
    from consumer.settings import database_tls_warning

    warning = database_tls_warning(dsn)
    assert (warning is not None) == warned
    if warning is not None:
        assert words in warning and "sslmode=verify-full" in warning


async def test_worker_warns_about_a_database_without_verified_tls() -> None:
    import structlog

    from consumer.errors import Unreachable
    from consumer.worker import Endpoints, run_worker

    endpoints = Endpoints("127.0.0.1:1", "postgresql://sync@db.invalid:5432/sync")
    with structlog.testing.capture_logs() as logged, pytest.raises(Unreachable):
        await run_worker(Settings(), endpoints)
    warnings = [e["event"] for e in logged if e["log_level"] == "warning"]
    assert any("db.invalid" in w and "sslmode=verify-full" in w for w in warnings), logged
