"""ABSENCE_SYNC_* settings (README, 'Settings'), read from the environment."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumer.logs import redact_text, register_secret_values


class SettingsError(Exception):
    """A setting with a value that cannot be used; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ABSENCE_SYNC_", extra="ignore")

    kafka_bootstrap_servers: str | None = Field(
        default=None, description="Kafka bootstrap servers; none starts the embedded broker"
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ca_file: Path | None = None
    kafka_cert_file: Path | None = None
    kafka_key_file: Path | None = None
    topic: str = "absences"
    dlq_topic: str = "absences.dlq"
    group_id: str = "absence-sync"
    database_url: str | None = Field(
        default=None, description="PostgreSQL DSN; none starts the embedded PostgreSQL"
    )
    http_host: str = "0.0.0.0"  # noqa: S104 - a container serves its probes on every interface
    http_port: int = Field(default=8080, ge=0, le=65535)
    secret_keys: str | None = None
    ca_bundle: Path | None = None
    allow_insecure_localhost: bool = Field(
        default=False,
        description="for tests: accept plain http:// Microsoft URLs on localhost",
    )
    ms_client_id: str | None = None
    ms_client_secret: str | None = None
    ms_client_cert_file: Path | None = None
    ms_authority_host: str = "https://login.microsoftonline.com"
    ms_graph_url: str = "https://graph.microsoft.com/v1.0"
    ms_consent_redirect_url: str | None = None
    google_token_url: str = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
    google_api_url: str = "https://www.googleapis.com/calendar/v3"
    #: Gmail API base, for automatic replies (users.settings.updateVacation)
    google_gmail_url: str = "https://gmail.googleapis.com/gmail/v1"
    public_url: str | None = None

    embedded: bool = Field(
        default=False,
        description="start embedded servers for whatever is not configured (trials only)",
    )
    embedded_data_dir: Path | None = None
    topic_partitions: int = Field(default=4, ge=1, le=1000)
    create_topics: bool | None = Field(
        default=None,
        description="create missing topics; default: only on the embedded broker",
    )

    batch_size: int = Field(default=500, ge=1, le=100_000)
    fetch_max_bytes: int = Field(default=1024 * 1024, ge=64 * 1024)
    max_partition_fetch_bytes: int = Field(default=1024 * 1024, ge=64 * 1024)
    fetch_max_wait_ms: int = Field(default=100, ge=0, le=10_000)
    tenant_concurrency: int = Field(default=8, ge=1, le=1000)
    dispatch_concurrency: int = Field(default=256, ge=1, le=10_000)
    dispatch_poll_seconds: float = Field(default=0.5, gt=0, le=60)
    request_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    lease_seconds: float = Field(default=120.0, gt=0)
    retry_for_seconds: float = Field(default=86_400.0, gt=0)
    retry_base_seconds: float = Field(default=1.0, gt=0)
    retry_max_seconds: float = Field(default=900.0, gt=0)
    shutdown_timeout_seconds: float = Field(default=20.0, gt=0, le=600)
    # outages and bounded storage
    database_command_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    outage_retry_max_seconds: float = Field(default=10.0, gt=0, le=600)
    history_keep_days: int = Field(default=30, ge=1, le=3650)
    history_keep_per_item: int = Field(default=100, ge=1, le=100_000)
    trim_interval_seconds: float = Field(default=600.0, gt=0, le=86_400)
    log_level: str = "INFO"
    log_format: str = "json"

    @field_validator("database_url")
    @classmethod
    def _dsn(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("ms_authority_host", "ms_graph_url", "google_token_url", "google_api_url",
                     "google_gmail_url")
    @classmethod
    def _https(cls, value: str, info: ValidationInfo) -> str:
        """Tokens and calendars travel over verified TLS; plain http only to this
        machine, and only when ABSENCE_SYNC_ALLOW_INSECURE_LOCALHOST says so (tests)."""
        value = value.rstrip("/")
        try:
            parts = urlsplit(value)
        except ValueError:
            raise ValueError("must be an https:// URL") from None
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not hold a user name or password")
        if parts.scheme == "https" and parts.hostname:
            return value
        if (
            parts.scheme == "http"
            and parts.hostname in ("localhost", "127.0.0.1", "::1")
            and info.data.get("allow_insecure_localhost")
        ):
            return value
        raise ValueError(
            "must be an https:// URL"
            + (" (plain http:// only to localhost, and only with "
               "ABSENCE_SYNC_ALLOW_INSECURE_LOCALHOST=true)" if parts.scheme == "http" else "")
        )

    @field_validator("secret_keys")
    @classmethod
    def _keys(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from cryptography.fernet import Fernet

        for index, key in enumerate(k.strip() for k in value.split(",") if k.strip()):
            try:
                Fernet(key.encode())
            except ValueError as exc:
                raise ValueError(
                    f"key #{index + 1} is not a Fernet key (32 url-safe base64 bytes)"
                ) from exc
        return value

    @field_validator(
        "ca_bundle", "ms_client_cert_file", "kafka_sasl_password_file", "kafka_ca_file",
        "kafka_cert_file", "kafka_key_file",
    )
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {value} does not exist")
        return value

    @model_validator(mode="after")
    def _lease_outlives_calls(self) -> Settings:
        # a lease must outlive the longest call, or two replicas could write one item
        if self.lease_seconds <= 2 * self.request_timeout_seconds:
            raise ValueError(
                "lease_seconds must be more than twice request_timeout_seconds "
                f"({self.lease_seconds} <= 2 x {self.request_timeout_seconds})"
            )
        return self

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and not self.kafka_sasl_username:
            raise ValueError(
                f"ABSENCE_SYNC_KAFKA_SASL_USERNAME is required with "
                f"ABSENCE_SYNC_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol}"
            )
        if sasl and not (self.kafka_sasl_password or self.kafka_sasl_password_file):
            raise ValueError(
                "ABSENCE_SYNC_KAFKA_SASL_PASSWORD or ABSENCE_SYNC_KAFKA_SASL_PASSWORD_FILE is "
                f"required with ABSENCE_SYNC_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol}"
            )
        if (self.kafka_cert_file is None) != (self.kafka_key_file is None):
            raise ValueError(
                "ABSENCE_SYNC_KAFKA_CERT_FILE and ABSENCE_SYNC_KAFKA_KEY_FILE go together "
                "(a client certificate and its key)"
            )
        return self

    @model_validator(mode="after")
    def _remember_secrets(self) -> Settings:
        # from now on these values never reach a log line, whatever logs them
        register_secret_values([self.ms_client_secret, self.kafka_sasl_password,
                                _dsn_password(self.database_url)])
        register_secret_values((self.secret_keys or "").split(","))
        return self

    @field_validator("log_format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in ("json", "console"):
            raise ValueError("must be 'json' or 'console'")
        return value


def _dsn_password(dsn: str | None) -> str | None:
    if not dsn:
        return None
    try:
        password = urlsplit(dsn).password
    except ValueError:
        return None
    return unquote(password) if password else None


_LOCAL_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1"})


def _host_of(hostport: str) -> str:
    """'db:5432' -> 'db', '[::1]:5432' -> '::1'."""
    if hostport.startswith("["):
        return hostport[1:].partition("]")[0]
    return hostport.rpartition(":")[0] if ":" in hostport else hostport


def database_tls_warning(dsn: str) -> str | None:
    """Why connecting to `dsn` is not protected by verified TLS, or None.

    A database on this machine (loopback or a Unix socket) needs no TLS. Any
    other needs `sslmode=verify-full`: `prefer` (the default) falls back to plain
    text, and `require`/`verify-ca` accept a server of any name."""
    try:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        netloc = parts.netloc.rpartition("@")[2]
    except ValueError:
        return None
    hosts = query.get("host") or [_host_of(h) for h in netloc.split(",")]
    remote = [h for h in hosts if not h.startswith("/") and h.lower() not in _LOCAL_HOSTS]
    if not remote:
        return None
    mode = (query.get("sslmode") or ["prefer"])[-1].lower()
    if mode == "verify-full":
        return None
    where = ", ".join(remote)
    if mode in ("require", "verify-ca"):
        return (f"PostgreSQL at {where} uses sslmode={mode}: TLS without checking the server's "
                "name; add sslmode=verify-full (and sslrootcert=...) to ABSENCE_SYNC_DATABASE_URL")
    return (f"PostgreSQL at {where} is reached without verified TLS (sslmode={mode}); add "
            "sslmode=verify-full (and sslrootcert=...) to ABSENCE_SYNC_DATABASE_URL")


_SECRET_FIELDS = frozenset(
    {"secret_keys", "ms_client_secret", "database_url", "kafka_sasl_password"}
)


def known_variables() -> list[str]:
    """Every ABSENCE_SYNC_* variable the product reads."""
    return sorted("ABSENCE_SYNC_" + name.upper() for name in Settings.model_fields)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning per ABSENCE_SYNC_* variable that no setting reads (a typo
    would otherwise silently leave a default in place), with the closest name."""
    prefix = "ABSENCE_SYNC_"
    known = known_variables()
    suffixes = [k.removeprefix(prefix) for k in known]
    warnings = []
    for name in sorted(environ):
        if not name.upper().startswith(prefix) or name.upper() in known:
            continue
        close = difflib.get_close_matches(
            name.upper().removeprefix(prefix), suffixes, n=1, cutoff=0.75
        )
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        warnings.append(f"{name} is not a known setting{hint}")
    return warnings


def load_settings() -> Settings:
    """Read the environment; a bad value raises `SettingsError` naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = "_".join(str(p) for p in err["loc"])
            name = "ABSENCE_SYNC_" + field.upper()
            msg = err["msg"].removeprefix("Value error, ")
            # never echo a secret (keys, client secret, a DSN with its password)
            shown = redact_text(repr(err.get("input")))
            got = "" if field in _SECRET_FIELDS else f" (got {shown})"
            if not field:  # a rule across settings: the message names them
                if msg.startswith("lease_seconds"):
                    msg = "ABSENCE_SYNC_LEASE_SECONDS: " + msg
                lines.append(msg)
                continue
            lines.append(f"{name}: {msg}{got}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from exc
