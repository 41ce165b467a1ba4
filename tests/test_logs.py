"""The one redaction point of logging: structured events, standard `logging`
records and provider errors lose every credential."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer import logs
from consumer.logs import REDACTED, redact_event, redact_text
from consumer.providers.base import PROVIDER_ERROR, ProviderError


@pytest.fixture(autouse=True)
def isolated_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Values registered here stay here: other tests' texts are not redacted."""
    monkeypatch.setattr(logs, "_secrets", set(logs._secrets))
    monkeypatch.setattr(logs, "_secrets_pattern", None)


LEAKS = [
    # (text, the secret part)
    ("Authorization: Bearer eyJ0eXAiOiJKV1Qi.abc.def-token", "eyJ0eXAiOiJKV1Qi.abc.def-token"),
    ("authorization=Bearer 0123456789abcdefXYZ", "0123456789abcdefXYZ"),
    ("{'Authorization': 'Basic c3luYzpodW50ZXIy'}", "c3luYzpodW50ZXIy"),
    ("Authorization: Basic c3luYzpodW50ZXIyIQ==", "c3luYzpodW50ZXIyIQ=="),
    ('"authorization": "NTLM TlRMTVNTUAABAAAAB4IIog"', "TlRMTVNTUAABAAAAB4IIog"),
    ("sent Basic dXNlcjpwYXNzd29yZA== to the proxy", "dXNlcjpwYXNzd29yZA=="),
    ("token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl expired",
     "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"),
    ("connect to postgresql://sync:hunter2-db@db.internal:5432/sync failed", "hunter2-db"),
    ("https://bob:s3cr3t%21@dav.example.com/bob/calendar/", "s3cr3t%21"),
    ("client_id=abc&client_secret=hunter2-form&scope=x", "hunter2-form"),
    ('{"password": "hunter2-json", "user": "bob"}', "hunter2-json"),
    ("sasl_password: hunter2-yaml", "hunter2-yaml"),
    ("postgresql://sync@db/sync?password=hunter2-query&sslmode=require", "hunter2-query"),
]


@pytest.mark.parametrize(("text", "secret"), LEAKS, ids=[s for _, s in LEAKS])
def test_credentials_are_removed_from_text(text: str, secret: str) -> None:
    cleaned = redact_text(text)
    assert secret not in cleaned
    assert REDACTED in cleaned


KEPT = [
    "Basic auth failed for user bob",
    "token request failed: invalid_client: AADSTS7000215: Invalid client secret provided.",
    "check the secret (ABSENCE_SYNC_MS_CLIENT_SECRET) or the certificate",
    "absence-sync:acme%3Ao365:abs-1",
    "PUT https://dav.example.com/jane@acme.com/calendar/absence-sync-1.ics answered 500",
    "4 passwords rotated",
]


@pytest.mark.parametrize("text", KEPT)
def test_ordinary_text_is_kept(text: str) -> None:
    assert redact_text(text) == text


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    secret=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~", min_size=6, max_size=40),
    before=st.text(max_size=30),
    after=st.text(max_size=30),
)
def test_registered_secret_values_never_survive(secret: str, before: str, after: str) -> None:
    logs.register_secret_value(secret)
    assert secret not in redact_text(before + secret + after)


def test_short_values_are_not_searched_for() -> None:
    logs.register_secret_value("abc")
    assert redact_text("abc is a word") == "abc is a word"


def test_structured_events_lose_secret_fields_and_values() -> None:
    logs.register_secret_value("correct-horse-battery")
    event = redact_event(None, "info", {
        "event": "calendar write failed",
        "password": "hunter2-field",
        "client_secret": "hunter2-field",
        "error": "HTTP 401: Authorization: Basic c3luYzpodW50ZXIy rejected",
        "detail": {"token": "abc", "url": "https://u:hunter2-url@h/x", "n": 3},
        "items": ["correct-horse-battery", 7, None],
        "exception": "Traceback ...\nValueError: password=hunter2-trace",
        "attempts": 3,
        "retriable": True,
        "retry_after": None,
    })
    text = json.dumps(event)
    for secret in ("hunter2", "c3luYzpodW50ZXIy", "correct-horse-battery", '"abc"'):
        assert secret not in text
    assert (event["attempts"], event["retriable"], event["retry_after"]) == (3, True, None)
    assert event["event"] == "calendar write failed"


def test_provider_errors_lose_echoed_credentials() -> None:
    logs.register_secret_value("client-secret-value-42")
    error = ProviderError(
        PROVIDER_ERROR,
        "HTTP 502 from proxy: request was PUT /x Authorization: Basic c3luYzpodW50ZXIy; "
        "invalid secret client-secret-value-42",
        retriable=True,
        hint="echoed client-secret-value-42",
    )
    for text in (error.message, str(error), error.hint):
        assert "c3luYzpodW50ZXIy" not in text and "client-secret-value-42" not in text


def test_configured_logging_redacts_both_paths() -> None:
    """The real configuration, in a fresh process: structlog and stdlib output."""
    code = """
import logging
from consumer import logs
logs.configure("DEBUG", "json")
log = logs.get("t")
log.info("structured", password="hunter2-a", detail="Authorization: Bearer hunter2-b")
logging.getLogger("aiohttp.client").warning("stdlib %s", "postgresql://u:hunter2-c@db/x")
try:
    raise RuntimeError("token=hunter2-d")
except RuntimeError:
    log.exception("failed")
    logging.getLogger("asyncio").exception("also failed")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert "hunter2" not in done.stderr + done.stdout
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    events = {line["event"]: line for line in lines}
    assert events["structured"]["password"] == REDACTED
    assert events["stdlib postgresql://u:[redacted]@db/x"]["logger"] == "aiohttp.client"
    assert all("RuntimeError" in events[e]["exception"] for e in ("failed", "also failed"))


def test_fields_that_name_a_secret_are_kept() -> None:
    event = redact_event(None, "info", {
        "event": "resync started", "token_id": "tok_3f9a", "secret_names": ["password"],
        "token": "s3cr3t-value", "access_token": "abc",
    })
    assert event["token_id"] == "tok_3f9a" and event["secret_names"] == ["password"]
    assert event["token"] == event["access_token"] == REDACTED


@pytest.mark.parametrize("text", [
    "field 'caldav.password': give secrets as 'password_env' or 'password_file', never inline",
    "field 'caldav.password_env': environment variable 'DAV_PASSWORD' is not set",
    "token_id=tok_3f9a password_file=/run/secrets/dav",
])
def test_messages_about_secrets_are_kept(text: str) -> None:
    """Configuration errors name the keys and variables; only values are secret."""
    assert redact_text(text) == text
