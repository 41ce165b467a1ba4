"""Sync configurations (SPEC section 4): the model and the YAML file loader.

A configuration file holds a top-level `syncs:` list. Secrets are given as
`*_env` (an environment variable name) or `*_file` (a path) and resolved at
load time; the resolved values travel in `SyncConfig.secrets` and are stored
encrypted, never printed.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Provider = Literal["microsoft365", "exchange", "google", "caldav"]
PROVIDERS: tuple[str, ...] = ("microsoft365", "exchange", "google", "caldav")
_SPAN = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")


class ConfigError(Exception):
    """A configuration file or field that cannot be used; the message says where."""


@dataclass(frozen=True, slots=True)
class TimeSpan:
    start: dt.time
    end: dt.time


def parse_span(value: str) -> TimeSpan:
    match = _SPAN.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a time span like 09:00-12:30")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    try:
        span = TimeSpan(dt.time(h1, m1), dt.time(h2, m2))
    except ValueError as exc:
        raise ValueError(f"{value!r} holds an impossible time") from exc
    if span.end <= span.start:
        raise ValueError(f"{value!r} ends before it starts")
    return span


class SyncConfig(BaseModel):
    """One sync configuration. `provider_settings` excludes secrets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    tenant: str = Field(min_length=1, max_length=200)
    provider: Provider
    establishments: list[str] | None = None
    hide_labels: bool = True
    hidden_label: str = Field(default="Absent", min_length=1, max_length=255)
    whole_days_as_timed: bool = False
    morning: str = "09:00-12:30"
    afternoon: str = "13:30-18:00"
    time_zone: str = "UTC"
    sync_pending: bool = True
    busy_as: Literal["busy", "oof"] = "busy"
    free_as: Literal["free", "workingElsewhere"] = "free"
    private: bool = False
    category: str | None = Field(default=None, max_length=255)
    provider_settings: dict[str, Any] = Field(default_factory=dict)
    secrets: dict[str, str] = Field(default_factory=dict, repr=False)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("must be 1-100 letters, digits, '.', '_', ':' or '-'")
        return value

    @field_validator("morning", "afternoon")
    @classmethod
    def _check_span(cls, value: str) -> str:
        parse_span(value)
        return value

    @field_validator("time_zone")
    @classmethod
    def _check_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
            # OSError: a name such as "Europe" that is a folder of the zone database
            raise ValueError(f"unknown IANA time zone {value!r}") from exc
        return value

    @property
    def morning_span(self) -> TimeSpan:
        return parse_span(self.morning)

    @property
    def afternoon_span(self) -> TimeSpan:
        return parse_span(self.afternoon)

    def public_dict(self) -> dict[str, Any]:
        """Everything but secret values (secret names are shown, not values)."""
        data = self.model_dump(exclude={"secrets"})
        data["secrets"] = sorted(self.secrets)
        return data

    def render_dict(self) -> dict[str, Any]:
        """The fields that change how events render (part of the content hash)."""
        return self.model_dump(
            include={
                "hide_labels", "hidden_label", "whole_days_as_timed", "morning",
                "afternoon", "time_zone", "sync_pending", "busy_as", "free_as",
                "private", "category", "establishments",
            }
        )


# provider -> keys that must be present in its block (secrets after resolution)
_REQUIRED: dict[str, tuple[str, ...]] = {
    "microsoft365": (),
    "exchange": ("url", "username", "password"),
    "caldav": ("url",),
    "google": ("service_account",),
}
_SECRET_KEYS = {"password", "client_secret", "service_account", "private_key", "token"}
EXCHANGE_AUTH = ("ntlm", "basic")
EXCHANGE_MAX_CONNECTIONS = 16
# Exchange Online's EWS hosts (worldwide, GCC High / DoD, 21Vianet)
EXCHANGE_ONLINE_HOSTS = frozenset({
    "outlook.office365.com", "outlook.office.com", "outlook.office365.us",
    "outlook-dod.office365.us", "partner.outlook.cn",
})


def _resolve_block(where: str, provider: str, block: Any) -> tuple[dict[str, Any], dict[str, str]]:
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: field '{provider}': must be a mapping")
    plain: dict[str, Any] = {}
    secrets: dict[str, str] = {}
    for key, value in block.items():
        key = str(key)
        if key.endswith("_env"):
            name = key[: -len("_env")]
            if not isinstance(value, str) or value not in os.environ:
                raise ConfigError(
                    f"{where}: field '{provider}.{key}': environment variable {value!r} is not set"
                )
            if not os.environ[value].strip():
                raise ConfigError(
                    f"{where}: field '{provider}.{key}': environment variable {value!r} is empty"
                )
            secrets[name] = os.environ[value]
        elif key.endswith("_file") and key != "cert_file":
            name = key[: -len("_file")]
            path = Path(str(value)).expanduser()
            try:
                secrets[name] = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError(
                    f"{where}: field '{provider}.{key}': cannot read {path}: {reason}"
                ) from exc
            if not secrets[name]:
                raise ConfigError(f"{where}: field '{provider}.{key}': {path} is empty")
        elif key in _SECRET_KEYS:
            raise ConfigError(
                f"{where}: field '{provider}.{key}': give secrets as '{key}_env' or "
                f"'{key}_file', never inline"
            )
        else:
            plain[key] = value
    for key in _REQUIRED.get(provider, ()):
        if key not in plain and key not in secrets:
            raise ConfigError(f"{where}: field '{provider}.{key}' is required")
    url = plain.get("url")
    if url is not None and not _acceptable_url(str(url), provider):
        raise ConfigError(
            f"{where}: field '{provider}.url': must be an https:// URL"
            + ("" if provider == "exchange" else " (plain http only on localhost)")
        )
    if provider == "exchange":
        _check_exchange(where, plain)
    return plain, secrets


def _check_exchange(where: str, plain: dict[str, Any]) -> None:
    """The exchange block: a URL with a host, `auth` ntlm or basic, a bounded pool."""
    if not urlsplit(str(plain["url"])).hostname:
        raise ConfigError(f"{where}: field 'exchange.url': has no host name")
    if "username" in plain and (
        not isinstance(plain["username"], str) or not plain["username"].strip()
    ):
        raise ConfigError(f"{where}: field 'exchange.username': must be a non-empty string")
    auth = plain.get("auth", "ntlm")
    if not isinstance(auth, str) or auth.lower() not in EXCHANGE_AUTH:
        raise ConfigError(
            f"{where}: field 'exchange.auth': must be one of {', '.join(EXCHANGE_AUTH)}, "
            f"got {auth!r}"
        )
    if "auth" in plain:
        plain["auth"] = auth.lower()
    connections = plain.get("max_connections")
    if connections is not None and (
        isinstance(connections, bool) or not isinstance(connections, int)
        or not 1 <= connections <= EXCHANGE_MAX_CONNECTIONS
    ):
        raise ConfigError(
            f"{where}: field 'exchange.max_connections': must be an integer from 1 to "
            f"{EXCHANGE_MAX_CONNECTIONS}, got {connections!r}"
        )


def config_warnings(config: SyncConfig) -> list[str]:
    """What is doubtful about a valid configuration (shown by `config apply` and
    `config show`; the provider reports the same)."""
    if config.provider != "exchange":
        return []
    url = urlsplit(str(config.provider_settings.get("url", "")))
    host = (url.hostname or "").lower()
    if host in EXCHANGE_ONLINE_HOSTS:
        return [
            f"exchange.url points at Exchange Online ({host}): this provider is for Exchange "
            "Server on-premises. Microsoft has retired the ApplicationImpersonation role in "
            "Exchange Online and is shutting EWS down there: use the microsoft365 provider "
            "for Exchange Online mailboxes."
        ]
    if not url.path.rstrip("/").lower().endswith("/ews/exchange.asmx"):
        return [
            f"exchange.url ends in {url.path or '/'!r}, not /EWS/Exchange.asmx: the EWS "
            "endpoint of Exchange Server is https://HOST/EWS/Exchange.asmx."
        ]
    return []


def _acceptable_url(url: str, provider: str) -> bool:
    """Calendars are reached over verified TLS; plain HTTP only on this machine (demo).

    An EWS URL must be https, wherever it points (SPEC section 6).
    """
    if url.startswith("https://") and len(url) > len("https://"):
        return True
    if provider == "exchange":
        return False
    return url.startswith(("http://localhost:", "http://127.0.0.1:", "http://localhost/"))


def parse_sync(where: str, raw: Any) -> SyncConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: each entry of 'syncs' must be a mapping")
    provider = raw.get("provider")
    if provider not in PROVIDERS:
        raise ConfigError(
            f"{where}: field 'provider': must be one of {', '.join(PROVIDERS)}, got {provider!r}"
        )
    for key in raw:
        # `provider_settings` and `secrets` are built from the provider block, never given
        if not isinstance(key, str) or key in ("provider_settings", "secrets"):
            raise ConfigError(f"{where}: field '{key}': unknown field")
    fields = {k: v for k, v in raw.items() if k not in PROVIDERS}
    others = [p for p in PROVIDERS if p in raw and p != provider]
    if others:
        raise ConfigError(f"{where}: field '{others[0]}': block does not match provider {provider}")
    plain, secrets = _resolve_block(where, provider, raw.get(provider))
    try:
        return SyncConfig(**fields, provider_settings=plain, secrets=secrets)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(entry)"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: field '{field}': {msg}") from exc


def load_file(path: Path) -> list[SyncConfig]:
    """Load and validate every configuration of a file; all or nothing."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("syncs"), list):
        raise ConfigError(f"{path}: expected a top-level 'syncs:' list")
    configs: list[SyncConfig] = []
    seen: set[str] = set()
    for index, raw in enumerate(doc["syncs"]):
        sync_id = raw.get("id") if isinstance(raw, dict) else None
        if not isinstance(sync_id, str | int):
            sync_id = None  # a list or mapping: reported as a bad 'id' by parse_sync
        where = f"{path}: sync {sync_id!r}" if sync_id else f"{path}: syncs[{index}]"
        if sync_id in seen:
            raise ConfigError(f"{where}: field 'id': duplicated in this file")
        config = parse_sync(where, raw)
        seen.add(config.id)
        configs.append(config)
    return configs
