"""The `exchange` block of a configuration: validation, warnings, and what
`config apply` / `config show` say about them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from consumer.config import ConfigError, config_warnings, parse_sync

SCRIPT = Path(sys.executable).parent / "absence-sync"
URL = "https://mail.acme.test/EWS/Exchange.asmx"


def entry(**block: Any) -> dict[str, Any]:
    block.setdefault("url", URL)
    block.setdefault("username", "ACME\\svc-absence")
    block.setdefault("password_env", "TEST_EWS_PASSWORD")
    return {"id": "acme-ews", "tenant": "acme", "provider": "exchange",
            "exchange": {k: v for k, v in block.items() if v is not None}}


@pytest.fixture(autouse=True)
def password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_EWS_PASSWORD", "ews-secret-1")


def test_a_complete_block() -> None:
    config = parse_sync("f.yaml", entry(auth="Basic", max_connections=8))
    assert config.provider_settings == {
        "url": URL, "username": "ACME\\svc-absence", "auth": "basic", "max_connections": 8,
    }
    assert config.secrets == {"password": "ews-secret-1"}
    assert config_warnings(config) == []
    # ntlm by default: nothing to write
    assert "auth" not in parse_sync("f.yaml", entry()).provider_settings


@pytest.mark.parametrize(("block", "field", "words"), [
    ({"url": None}, "exchange.url", "required"),
    ({"username": None}, "exchange.username", "required"),
    ({"password_env": None}, "exchange.password", "required"),
    ({"url": "http://mail.acme.test/EWS/Exchange.asmx"}, "exchange.url", "https"),
    ({"url": "https://"}, "exchange.url", "https"),
    ({"url": "https:///EWS/Exchange.asmx"}, "exchange.url", "host"),
    ({"auth": "kerberos"}, "exchange.auth", "ntlm, basic"),
    ({"auth": 1}, "exchange.auth", "ntlm, basic"),
    ({"username": ""}, "exchange.username", "non-empty"),
    ({"max_connections": 0}, "exchange.max_connections", "1 to 16"),
    ({"max_connections": 17}, "exchange.max_connections", "1 to 16"),
    ({"max_connections": True}, "exchange.max_connections", "1 to 16"),
    ({"max_connections": "4"}, "exchange.max_connections", "1 to 16"),
])
def test_bad_blocks_name_the_field(block: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_sync("f.yaml", entry(**block))
    assert f"'{field}'" in str(info.value) and words in str(info.value)
    assert "ews-secret-1" not in str(info.value)


def test_inline_password_is_refused() -> None:
    with pytest.raises(ConfigError, match="password_env"):
        parse_sync("f.yaml", entry(password_env=None, password="inline"))


@pytest.mark.parametrize("host", ["outlook.office365.com", "OUTLOOK.OFFICE365.COM",
                                  "outlook.office365.us", "partner.outlook.cn"])
def test_exchange_online_urls_get_a_warning(host: str) -> None:
    config = parse_sync("f.yaml", entry(url=f"https://{host}/EWS/Exchange.asmx"))
    [warning] = config_warnings(config)
    assert "microsoft365" in warning and "on-premises" in warning
    assert "ApplicationImpersonation" in warning


def test_an_unusual_path_gets_a_warning() -> None:
    config = parse_sync("f.yaml", entry(url="https://mail.acme.test/owa/"))
    [warning] = config_warnings(config)
    assert "/EWS/Exchange.asmx" in warning
    assert config_warnings(parse_sync("f.yaml", entry(url=URL.lower() + "/"))) == []


def run(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ABSENCE_SYNC_")}
    env.update({"ABSENCE_SYNC_DATABASE_URL": dsn, "ABSENCE_SYNC_SECRET_KEYS": KEY})
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


KEY = Fernet.generate_key().decode()


def test_apply_prints_the_warning_and_show_lists_it(dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "syncs.yaml"
    path.write_text(textwrap.dedent("""
        syncs:
          - id: acme-ews
            tenant: acme
            provider: exchange
            exchange:
              url: https://outlook.office365.com/EWS/Exchange.asmx
              username: svc-absence@acme.test
              password_env: TEST_EWS_PASSWORD
    """), encoding="utf-8")
    applied = run(dsn, "config", "apply", "-f", str(path))
    assert applied.returncode == 0, applied.stderr
    assert "acme-ews: created" in applied.stdout
    assert "warning: acme-ews: exchange.url points at Exchange Online" in applied.stderr
    shown = run(dsn, "config", "show", "acme-ews")
    assert shown.returncode == 0, shown.stderr
    [warning] = json.loads(shown.stdout)["warnings"]
    assert "microsoft365" in warning
    assert "ews-secret-1" not in applied.stdout + applied.stderr + shown.stdout
    # fixing the URL clears it
    path.write_text(path.read_text().replace("outlook.office365.com", "mail.acme.test"))
    assert run(dsn, "config", "apply", "-f", str(path)).returncode == 0
    assert json.loads(run(dsn, "config", "show", "acme-ews").stdout)["warnings"] == []
