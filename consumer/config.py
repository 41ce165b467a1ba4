"""Sync configurations (docs/configuration.md): the model and the YAML file loader.

A configuration file holds a top-level `syncs:` list. Secrets are given as
`*_env` (an environment variable name) or `*_file` (a path) and resolved at
load time; the resolved values travel in `SyncConfig.secrets` and are stored
encrypted, never printed.

Every error names the file, the configuration, the field, the value given
(never a secret's) and the expected form, in our words: pydantic's messages
are reworded by `_explain`.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import os
import re
import zoneinfo
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from consumer.logs import register_secret_value
from consumer.replies import AutoReply

Provider = Literal["microsoft365", "exchange", "google", "caldav", "ics"]
PROVIDERS: tuple[str, ...] = ("microsoft365", "exchange", "google", "caldav", "ics")
#: providers that can set a mailbox's automatic reply (`auto_reply:`)
REPLY_PROVIDERS: tuple[str, ...] = ("microsoft365", "exchange", "google")
ShowAs = Literal["free", "tentative", "busy", "oof", "workingElsewhere"]
SHOW_AS: tuple[str, ...] = ("free", "tentative", "busy", "oof", "workingElsewhere")
_SPAN = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
#: the loose e-mail check of the event schema (one '@', a dot in the domain, no blanks)
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
#: a CalDAV collection named otherwise than by an address (one path segment)
_COLLECTION = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,199}$")
MAX_ADDRESS = 320
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: what a secret holds when a file is checked without reading its secrets
#: (`load_file(..., read_secrets=False)`, for `config validate`)
UNREAD_SECRET = "(not read)"  # noqa: S105 - a placeholder, not a password


class ConfigError(Exception):
    """A configuration file or field that cannot be used; the message says where."""


@dataclass(frozen=True, slots=True)
class TimeSpan:
    start: dt.time
    end: dt.time


@functools.lru_cache(maxsize=1024)  # rendering asks for a configuration's spans per event
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


class TypeRule(BaseModel):
    """Rules for one leave type (`types:` of a configuration, keyed by `account.id`).

    Every field is optional; a field left out (or null) keeps what the
    configuration says. `skip` makes the type never wanted; `label` is the
    subject whatever `hide_labels` says; `show_as` replaces the show-as of
    approved absences (pending ones show `tentative` unless that show-as is
    `free` or `workingElsewhere`); `sync_pending`, `private` and `category`
    override the configuration's values for the type (`category: ""`: none).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    skip: bool = False
    label: str | None = Field(default=None, max_length=255)
    show_as: ShowAs | None = None
    sync_pending: bool | None = None
    private: bool | None = None
    category: str | None = Field(default=None, max_length=255)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, raw: Any) -> Any:
        if raw is None:
            raise ValueError(
                "must be a mapping of rules (e.g. {skip: true}), not empty"
            )
        if not isinstance(raw, dict):
            raise ValueError("must be a mapping of rules (e.g. {skip: true})")
        for key in raw:
            if key not in cls.model_fields:
                close = difflib.get_close_matches(str(key), list(cls.model_fields), n=1,
                                                  cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(
                    f"unknown field {str(key)!r}{hint} (a leave type rule accepts: "
                    f"{', '.join(cls.model_fields)})"
                )
        return raw

    @field_validator("show_as", mode="before")
    @classmethod
    def _check_show_as(cls, value: Any) -> Any:
        if value is not None and value not in SHOW_AS:
            raise ValueError(f"must be one of {', '.join(SHOW_AS)}, got {value!r}")
        return value

    @field_validator("label")
    @classmethod
    def _check_label(cls, value: str | None) -> str | None:
        from consumer.render import clean_label  # render imports this module

        if value is None:
            return None
        cleaned = clean_label(value, fallback="")
        if not cleaned:
            raise ValueError("must hold visible text (control characters and blanks "
                             "are removed)")
        return cleaned

    @field_validator("category")
    @classmethod
    def _check_category(cls, value: str | None) -> str | None:
        from consumer.render import clean_label

        return None if value is None else clean_label(value, fallback="")

    def overrides(self) -> dict[str, Any]:
        """The fields this rule sets (what a file would hold)."""
        return self.model_dump(exclude_defaults=True)


class TeamCalendar(BaseModel):
    """A configuration's shared team calendar (`team_calendar: {address: ...}`).

    `address` names one shared mailbox (Microsoft 365, Exchange, Google: an
    e-mail address) or CalDAV collection (the `{email}` of the CalDAV URL
    template: an address, or a plain collection name), like an employee's
    calendar address: every absence the configuration wants is also written
    there, as the team view renders it. Kept in lower case, as calendar
    addresses are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise ValueError(
                "must be a mapping with the shared calendar's address, e.g. "
                "{address: team-paris@acme.example}"
            )
        for key in raw:
            if key not in cls.model_fields:
                raise ValueError(
                    f"unknown field {str(key)!r} (a team calendar accepts: address)"
                )
        return raw

    @field_validator("address", mode="before")
    @classmethod
    def _check_address(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("must be an e-mail address (text)")
        address = value.strip().lower()
        if len(address) > MAX_ADDRESS or not address.isprintable() or not (
            _ADDRESS.match(address) or _COLLECTION.match(address)
        ):
            raise ValueError(
                f"must be an e-mail address such as team-paris@acme.example, got {value!r}"
            )
        return address

    @property
    def is_mailbox(self) -> bool:
        """An e-mail address (what every provider but CalDAV needs)."""
        return bool(_ADDRESS.match(self.address))


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
    #: per leave type rules, keyed by the events' `account.id`
    types: dict[str, TypeRule] = Field(default_factory=dict)
    #: a shared calendar that also receives every wanted absence (the team view)
    team_calendar: TeamCalendar | None = None
    #: automatic out-of-office replies (docs/auto-replies.md); None: none
    auto_reply: AutoReply | None = None
    provider_settings: dict[str, Any] = Field(default_factory=dict)
    secrets: dict[str, str] = Field(default_factory=dict, repr=False)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError(
                f"must be 1-100 letters, digits, '.', '_', ':' or '-' (starting with a letter "
                f"or a digit), got {value!r}"
            )
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
            raise ValueError(
                f"unknown IANA time zone {value!r} (expected a name like Europe/Paris)"
            ) from exc
        return value

    @field_validator("types", mode="before")
    @classmethod
    def _check_types(cls, value: Any) -> Any:
        """Keys are leave type ids (`account.id`): YAML numbers become text."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of leave type ids (account.id) to rules")
        keys: dict[str, Any] = {}
        for key, rule in value.items():
            if isinstance(key, bool) or not isinstance(key, str | int):
                raise ValueError(f"{key!r} is not a leave type id (account.id)")
            text = str(key)
            if not text.strip() or len(text) > 500:
                raise ValueError(f"{text!r} is not a leave type id (1-500 characters)")
            keys[text] = rule
        return keys

    @field_serializer("types")
    def _dump_types(self, types: dict[str, TypeRule]) -> dict[str, dict[str, Any]]:
        return {key: rule.overrides() for key, rule in types.items()}

    @model_validator(mode="after")
    def _known_block_keys(self) -> SyncConfig:
        check_block(self.provider, self.provider_settings, self.secrets)
        return self

    @model_validator(mode="after")
    def _team_calendar_has_a_calendar(self) -> SyncConfig:
        problem = team_calendar_problem(self.provider, self.team_calendar)
        if problem is not None:
            raise ValueError(f"{problem[0]}: {problem[1]}")
        return self

    @field_validator("auto_reply", mode="before")
    @classmethod
    def _check_auto_reply(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, dict | AutoReply):
            raise ValueError("must be a mapping (internal, external, audience, types, "
                             "date_format, subject)")
        return value

    @model_validator(mode="after")
    def _auto_reply_provider(self) -> SyncConfig:
        if self.auto_reply is not None and self.provider not in REPLY_PROVIDERS:
            raise ValueError(
                f"auto_reply: automatic replies are set in Microsoft 365, Exchange or Gmail "
                f"mailboxes ({', '.join(REPLY_PROVIDERS)}), not by provider {self.provider}"
            )
        return self

    @property
    def morning_span(self) -> TimeSpan:
        return parse_span(self.morning)

    @property
    def afternoon_span(self) -> TimeSpan:
        return parse_span(self.afternoon)

    def public_dict(self) -> dict[str, Any]:
        """Everything but secret values (secret names are shown, not values).

        `types` and `team_calendar` are left out when not given, so
        configurations stored before they existed compare equal to the same
        file applied again."""
        data = self.model_dump(exclude={"secrets"})
        if not self.types:
            del data["types"]
        if self.team_calendar is None:
            del data["team_calendar"]
        if self.auto_reply is None:
            del data["auto_reply"]
        data["secrets"] = sorted(self.secrets)
        return data

    def render_dict(self) -> dict[str, Any]:
        """The fields that change how events render (part of the content hash).

        `types` and `team_calendar` count only when given, so the render hash
        of a configuration without them is what it was before they existed (no
        re-render)."""
        data = self.model_dump(
            include={
                "hide_labels", "hidden_label", "whole_days_as_timed", "morning",
                "afternoon", "time_zone", "sync_pending", "busy_as", "free_as",
                "private", "category", "establishments", "types", "team_calendar",
                "auto_reply",
            }
        )
        if not self.types:
            del data["types"]
        if self.team_calendar is None:
            del data["team_calendar"]
        if self.auto_reply is None:
            del data["auto_reply"]
        return data


# --- provider blocks -----------------------------------------------------------


@dataclass(frozen=True)
class BlockSpec:
    """The keys one provider block accepts; anything else is refused, so nothing
    secret can slip into the plain (stored, printed) part of a configuration.

    * `plain`: key -> accepted type(s); stored as given and shown by `config show`.
    * `secrets`: names given only as `<name>_env` (an environment variable) or
      `<name>_file` (a path), never inline; stored encrypted, never shown.
    * `from_env`: plain keys that may instead come as `<name>_env`; then kept
      with the secrets (not shown) under `<name>`.
    * `required`: names that must be present once resolved (plain or secret).
    * `check`: extra rules on the resolved plain values (which it may normalise);
      returns (key, problem) pairs.
    * `hint`: added to the error for an unknown key.
    """

    plain: Mapping[str, type | tuple[type, ...]]
    secrets: frozenset[str] = frozenset()
    from_env: frozenset[str] = frozenset()
    required: tuple[str, ...] = ()
    check: Callable[[dict[str, Any]], list[tuple[str, str]]] | None = None
    hint: str = ""

    def accepted_keys(self) -> list[str]:
        keys = list(self.plain)
        keys += [f"{name}_env" for name in sorted(self.from_env)]
        for name in sorted(self.secrets):
            keys += [f"{name}_env", f"{name}_file"]
        return keys


def _url_problems(
    key: str, url: Any, *, local_http: bool
) -> list[tuple[str, str]]:
    """Calendars are reached over verified TLS; plain HTTP only on this machine
    (the embedded demo server) where `local_http`. Credentials never ride in the URL."""
    if not isinstance(url, str):
        return [(key, "must be text")]
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return [(key, "is not a URL")]
    if parts.username is not None or parts.password is not None:
        return [(key, "must not hold a user name or password (user info before '@'); "
                      "give 'username' and 'password_env' or 'password_file' instead")]
    if parts.scheme == "https" and parts.hostname:
        return []
    if parts.scheme == "https" and len(url) > len("https://"):
        return [(key, "has no host name")]
    local = parts.scheme == "http" and parts.hostname in ("localhost", "127.0.0.1", "::1")
    if local and local_http:
        return []
    return [(key, "must be an https:// URL" + (" (plain http only on localhost)"
                                                 if local_http else "") + f", got {url!r}")]


def _caldav_rules(block: dict[str, Any]) -> list[tuple[str, str]]:
    return _url_problems("url", block.get("url"), local_http=True) if "url" in block else []


def _exchange_rules(block: dict[str, Any]) -> list[tuple[str, str]]:
    """An https EWS URL with a host (wherever it points), `auth` ntlm or basic
    (normalised to lower case), a bounded connection pool."""
    problems = _url_problems("url", block.get("url"), local_http=False) if "url" in block else []
    if problems:
        return problems
    if "url" in block and not urlsplit(str(block["url"])).hostname:
        return [("url", "has no host name")]
    if "username" in block and not block["username"].strip():
        return [("username", "must be a non-empty string")]
    auth = block.get("auth", "ntlm")
    if not isinstance(auth, str) or auth.lower() not in EXCHANGE_AUTH:
        return [("auth", f"must be one of {', '.join(EXCHANGE_AUTH)}, got {auth!r}")]
    if "auth" in block:
        block["auth"] = auth.lower()
    connections = block.get("max_connections")
    if connections is not None and (
        isinstance(connections, bool) or not isinstance(connections, int)
        or not 1 <= connections <= EXCHANGE_MAX_CONNECTIONS
    ):
        return [("max_connections", f"must be an integer from 1 to {EXCHANGE_MAX_CONNECTIONS}, "
                                    f"got {connections!r}")]
    return []


GOOGLE_AUTODECLINE = ("none", "all", "new")


def _google_rules(block: dict[str, Any]) -> list[tuple[str, str]]:
    """`autodecline` one of none/all/new (normalised to lower case); a non-empty
    `calendar_id`."""
    if "calendar_id" in block and not block["calendar_id"].strip():
        return [("calendar_id", "must be a non-empty string (default primary)")]
    if "autodecline" in block:
        value = block["autodecline"].strip().lower()
        if value not in GOOGLE_AUTODECLINE:
            return [("autodecline", f"must be one of {', '.join(GOOGLE_AUTODECLINE)}, "
                                    f"got {block['autodecline']!r}")]
        block["autodecline"] = value
    return []


#: provider -> the keys of its block. Providers add or extend their entry here.
PROVIDER_BLOCKS: dict[str, BlockSpec] = {
    "microsoft365": BlockSpec(
        plain={"tenant_id": str},
        hint="the vendor application's credentials are the settings ABSENCE_SYNC_MS_CLIENT_ID "
        "and ABSENCE_SYNC_MS_CLIENT_SECRET (or _CLIENT_CERT_FILE), not part of a sync",
    ),
    "exchange": BlockSpec(
        # auth and max_connections: checked (and named) by _exchange_rules
        plain={"url": str, "username": str, "auth": object, "max_connections": object},
        secrets=frozenset({"password"}),
        required=("url", "username", "password"),
        check=_exchange_rules,
    ),
    "caldav": BlockSpec(
        plain={"url": str, "username": str},
        secrets=frozenset({"password"}),
        from_env=frozenset({"username"}),
        required=("url",),
        check=_caldav_rules,
    ),
    "google": BlockSpec(
        plain={"calendar_id": str, "autodecline": str},
        secrets=frozenset({"service_account"}),
        required=("service_account",),
        check=_google_rules,
    ),
    # no remote calendar: the worker serves the events as iCalendar feeds
    "ics": BlockSpec(
        plain={},
        hint="an ics configuration has no settings: its feeds are created with "
        "'absence-sync feed create'",
    ),
}


def register_block(provider: str, spec: BlockSpec) -> None:
    """Declare (or replace) the block of `provider`."""
    PROVIDER_BLOCKS[provider] = spec


def secret_names(provider: str) -> frozenset[str]:
    """The secrets a provider's block holds (`password`, `service_account`...)."""
    spec = PROVIDER_BLOCKS.get(provider)
    return spec.secrets if spec is not None else frozenset()


def _type_name(types: type | tuple[type, ...]) -> str:
    names = {str: "text", bool: "true or false", int: "a whole number", float: "a number"}
    options = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in options)


def _did_you_mean(key: str, spec: BlockSpec) -> str:
    close = difflib.get_close_matches(key, spec.accepted_keys(), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _read_secret(field: str, key: str, value: Any) -> str:
    """The value behind a `*_env` or `*_file` key; ConfigError naming `field` otherwise."""
    if key.endswith("_env"):
        if not isinstance(value, str) or value not in os.environ:
            raise ConfigError(f"field '{field}': environment variable {value!r} is not set")
        if not os.environ[value].strip():
            raise ConfigError(f"field '{field}': environment variable {value!r} is empty")
        return os.environ[value]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"field '{field}': must be a file path")
    path = Path(value).expanduser()
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"field '{field}': cannot read {path}: {reason}") from exc
    if not text:
        raise ConfigError(f"field '{field}': {path} is empty")
    return text


def _check_secret_source(field: str, key: str, value: Any) -> str:
    """The form of a `*_env` or `*_file` key, without reading the value (for
    `config validate`, which runs without the secrets)."""
    if key.endswith("_env"):
        if not isinstance(value, str) or not _ENV_NAME.match(value):
            raise ConfigError(
                f"field '{field}': must name an environment variable (letters, digits and "
                f"'_', not starting with a digit), got {_shown(value)}"
            )
    elif not isinstance(value, str) or not value.strip():
        raise ConfigError(f"field '{field}': must be a file path, got {_shown(value)}")
    return UNREAD_SECRET


EXCHANGE_AUTH = ("ntlm", "basic")
EXCHANGE_MAX_CONNECTIONS = 16
# Exchange Online's EWS hosts (worldwide, GCC High / DoD, 21Vianet)
EXCHANGE_ONLINE_HOSTS = frozenset({
    "outlook.office365.com", "outlook.office.com", "outlook.office365.us",
    "outlook-dod.office365.us", "partner.outlook.cn",
})


def _resolve_block(
    where: str, provider: str, block: Any, *, read_secrets: bool = True
) -> tuple[dict[str, Any], dict[str, str]]:
    """(plain settings, secrets) of a provider block, checked against its `BlockSpec`.
    Without `read_secrets`, secrets hold `UNREAD_SECRET` and only their form is checked."""
    spec = PROVIDER_BLOCKS[provider]
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise ConfigError(
            f"{where}: field '{provider}': must be a mapping of the {provider} settings "
            f"(e.g. {provider}: {{{', '.join(spec.accepted_keys()[:2])}: ...}}), "
            f"got {_shown(block)}"
        )
    plain: dict[str, Any] = {}
    secrets: dict[str, str] = {}
    given: dict[str, str] = {}  # resolved name -> the key that gave it
    for raw_key, value in block.items():
        key = str(raw_key)
        field = f"{provider}.{key}"
        stem, _, suffix = key.rpartition("_")
        indirect = suffix in ("env", "file") and (
            stem in spec.secrets or (suffix == "env" and stem in spec.from_env)
        )
        name = stem if indirect else key
        if name in given and (indirect or key in spec.plain):
            raise ConfigError(
                f"{where}: field '{field}': '{given[name]}' already gives {name}; keep one"
            )
        given[name] = key
        if key in spec.plain:
            if not isinstance(value, spec.plain[key]) or (
                isinstance(value, bool) and spec.plain[key] in (int, float)
            ):
                raise ConfigError(
                    f"{where}: field '{field}': must be {_type_name(spec.plain[key])}, "
                    f"got {_shown(value)}"
                )
            plain[key] = value
        elif indirect:
            try:
                secrets[name] = (
                    register_secret_value(_read_secret(field, key, value)) if read_secrets
                    else _check_secret_source(field, key, value)
                )
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        elif key in spec.secrets:
            raise ConfigError(
                f"{where}: field '{field}': give secrets as '{key}_env' or "
                f"'{key}_file', never inline"
            )
        else:
            known = ", ".join(spec.accepted_keys()) or "none"
            raise ConfigError(
                f"{where}: field '{field}': unknown key{_did_you_mean(key, spec)}"
                f" (a {provider} block accepts: {known})"
                + (f"; {spec.hint}" if spec.hint else "")
            )
    for name in spec.required:
        if name not in plain and name not in secrets:
            forms = (f"'{name}_env' (an environment variable) or '{name}_file' (a path)"
                     if name in spec.secrets else f"'{name}'")
            raise ConfigError(f"{where}: field '{provider}.{name}' is required: give {forms}")
    if spec.check is not None:
        for key, problem in spec.check(plain):
            raise ConfigError(f"{where}: field '{provider}.{key}': {problem}")
    return plain, secrets


def check_block(provider: str, plain: Mapping[str, Any], secret_names: Iterable[str]) -> None:
    """Raise ValueError when a configuration holds keys its provider's block does not
    know (a backstop for configurations built without `parse_sync`)."""
    spec = PROVIDER_BLOCKS.get(provider)
    if spec is None:
        return
    for key in plain:
        if key not in spec.plain:
            raise ValueError(
                f"unknown {provider} setting {key!r}{_did_you_mean(key, spec)}"
            )
    for name in secret_names:
        if name not in spec.secrets and name not in spec.from_env:
            raise ValueError(f"unknown {provider} secret {name!r}")


def _google_warnings(config: SyncConfig) -> list[str]:
    calendar = str(config.provider_settings.get("calendar_id") or "primary")
    out_of_office = config.busy_as == "oof" or any(
        rule.show_as == "oof" for rule in (config.types or {}).values()
    )
    if calendar == "primary" or not out_of_office:
        return []
    return [
        f"google.calendar_id is {calendar!r}: Google has out-of-office events only in "
        "primary calendars, so show-as oof is written as an ordinary busy event there."
    ]


def config_warnings(config: SyncConfig) -> list[str]:
    """What is doubtful about a valid configuration (shown by `config apply` and
    `config show`; the provider reports the same)."""
    if config.provider == "google":
        return _google_warnings(config)
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


# --- messages ----------------------------------------------------------------------

#: fields built from the provider block, never written in a file
_BUILT = ("provider_settings", "secrets")


def _file_fields() -> list[str]:
    """The keys an entry of `syncs:` accepts (besides its provider block)."""
    return [name for name in SyncConfig.model_fields if name not in _BUILT]


def _shown(value: Any) -> str:
    """A value for a message: short, on one line; the shape only for nested data
    (which could hold anything, a misplaced secret included)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return str(value).lower()
    text = " ".join((repr(value) if isinstance(value, str) else str(value)).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _field_name(loc: Sequence[int | str]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "(entry)"


def _explain(err: Mapping[str, Any]) -> str:
    """One pydantic error in our words: what the field must be, and what it got."""
    kind = str(err.get("type", ""))
    ctx: Mapping[str, Any] = err.get("ctx") or {}
    value = err.get("input")
    got = f", got {_shown(value)}"
    if kind == "missing":
        return "is required"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false{got}"
    if kind == "string_type":
        quote = (f" (quote it: \"{value}\")" if isinstance(value, int | float)
                 and not isinstance(value, bool) else "")
        return f"must be text{got}{quote}"
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "")
        return f"must be one of {expected.replace(' or ', ', ')}{got}"
    if kind == "string_too_short":
        return f"must be at least {ctx.get('min_length', 1)} character(s) long{got}"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters long ({len(str(value))} given)"
    if kind == "list_type":
        return f"must be a list (e.g. [a, b]){got}"
    if kind in ("dict_type", "model_type"):
        return f"must be a mapping{got}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number{got}"
    if kind == "value_error":
        return str(err.get("msg", "")).removeprefix("Value error, ")
    message = str(err.get("msg", "is not valid"))
    message = message.replace("Input should be", "must be").replace("Input", "the value")
    return f"{message[:1].lower()}{message[1:]}{got}"


def _unknown_field(where: str, key: Any) -> ConfigError:
    accepted = [*_file_fields(), *PROVIDERS]
    close = difflib.get_close_matches(str(key), accepted, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    if key in _BUILT:
        hint = f"; {key} come from the provider block (e.g. password_env in a caldav block)"
    return ConfigError(
        f"{where}: field '{key}': unknown field{hint} (a sync accepts: {', '.join(accepted)}; "
        "see docs/configuration.md)"
    )


def parse_sync(where: str, raw: Any, *, read_secrets: bool = True) -> SyncConfig:
    """One entry of `syncs:`. Without `read_secrets`, `*_env` and `*_file` keys are
    checked for their form only and the secrets hold `UNREAD_SECRET`."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: each entry of 'syncs' must be a mapping (id: ..., tenant: ..., "
            f"provider: ...), got {_shown(raw)}"
        )
    provider = raw.get("provider")
    if provider not in PROVIDERS:
        close = difflib.get_close_matches(str(provider), PROVIDERS, n=1, cutoff=0.6)
        raise ConfigError(
            f"{where}: field 'provider': "
            + ("is required" if provider is None else f"unknown provider {_shown(provider)}")
            + (f"; did you mean '{close[0]}'?" if close else "")
            + f" (one of {', '.join(PROVIDERS)})"
        )
    for key in raw:
        # `provider_settings` and `secrets` are built from the provider block, never given
        if not isinstance(key, str) or key in _BUILT or (
            key not in PROVIDERS and key not in SyncConfig.model_fields
        ):
            raise _unknown_field(where, key)
    fields = {k: v for k, v in raw.items() if k not in PROVIDERS}
    others = [p for p in PROVIDERS if p in raw and p != provider]
    if others:
        raise ConfigError(
            f"{where}: field '{others[0]}': block does not match provider {provider} "
            f"(an entry holds the block of its own provider only: {provider}: {{...}})"
        )
    plain, secrets = _resolve_block(where, provider, raw.get(provider),
                                    read_secrets=read_secrets)
    if provider == "ics" and raw.get("team_calendar") is not None:
        raise ConfigError(f"{where}: field 'team_calendar': {_ICS_TEAM}")
    try:
        return SyncConfig(**fields, provider_settings=plain, secrets=secrets)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err.get("type") == "extra_forbidden":
            raise _unknown_field(where, _field_name(err["loc"])) from exc
        field = _field_name(err["loc"])
        msg = _explain(err)
        if not err["loc"] and err["msg"].removeprefix("Value error, ").startswith("team_calendar"):
            # checked with the provider
            field, _, msg = err["msg"].removeprefix("Value error, ").partition(": ")
        raise ConfigError(f"{where}: field '{field}': {msg}") from exc


_ICS_TEAM = (
    "an ics configuration has no calendar to write to; its team view is the "
    "configuration feed ('absence-sync feed create --config ID' without --employee)"
)


def team_calendar_problem(
    provider: str, team: TeamCalendar | None
) -> tuple[str, str] | None:
    """(field, problem) when `team` does not suit `provider`: an ics configuration
    has none (its team feed is its team view); a collection name that is not an
    address is for CalDAV only."""
    if team is None:
        return None
    if provider == "ics":
        return "team_calendar", _ICS_TEAM
    if provider != "caldav" and not team.is_mailbox:
        return ("team_calendar.address",
                f"a {provider} team calendar is a shared mailbox: must be an e-mail address "
                f"such as team-paris@acme.example, got {team.address!r}")
    return None


def load_file(path: Path, *, read_secrets: bool = True) -> list[SyncConfig]:
    """Load and validate every configuration of a file; all or nothing.

    Without `read_secrets` (`config validate`) no environment variable or secret
    file is read: their names are checked, and the secrets hold `UNREAD_SECRET`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(
            f"{path}: expected a top-level 'syncs:' list (syncs: then '- id: ...' entries), "
            f"got {_shown(doc) if doc is not None else 'an empty file'}"
        )
    if "syncs" not in doc:
        # other top-level keys are left alone (e.g. YAML anchors for shared values),
        # but without `syncs` one of them is likely its misspelling
        close = difflib.get_close_matches("syncs", [str(k) for k in doc], n=1, cutoff=0.6)
        raise ConfigError(
            f"{path}: no top-level 'syncs:' list"
            + (f"; found {close[0]!r}: did you mean 'syncs'?" if close else "")
            + " (a configuration file holds 'syncs:', a list of configurations; see "
            "docs/configuration.md)"
        )
    if not isinstance(doc.get("syncs"), list):
        raise ConfigError(
            f"{path}: expected a top-level 'syncs:' list (syncs: then '- id: ...' entries), "
            f"got {_shown(doc.get('syncs'))}"
        )
    configs: list[SyncConfig] = []
    seen: set[str] = set()
    for index, raw in enumerate(doc["syncs"]):
        sync_id = raw.get("id") if isinstance(raw, dict) else None
        if not isinstance(sync_id, str | int):
            sync_id = None  # a list or mapping: reported as a bad 'id' by parse_sync
        where = f"{path}: sync {sync_id!r}" if sync_id else f"{path}: syncs[{index}]"
        if sync_id in seen:
            raise ConfigError(f"{where}: field 'id': duplicated in this file (ids are unique)")
        config = parse_sync(where, raw, read_secrets=read_secrets)
        seen.add(config.id)
        configs.append(config)
    return configs
