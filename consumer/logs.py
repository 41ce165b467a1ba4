"""Structured logging: JSON lines with tenant, configuration and absence ids.

Everything the process logs goes through one pipeline, including the standard
library's loggers (aiokafka, asyncio, warnings): with JSON logging every line
on stderr is one JSON object.

That pipeline has one redaction point, `redact_event`, placed after exception
formatting (so tracebacks are covered) for structlog events and standard
`logging` records alike. It uses `redact_text`, which

* replaces fields whose name says they hold a secret (`password`,
  `client_secret`, `authorization`, `token`...) by `[redacted]`;
* removes bearer tokens, basic credentials, JSON Web Tokens, passwords in
  URLs (`scheme://user:password@host`) and `password=...`-style pairs;
* removes every secret value the process knows: settings (client secret,
  Kafka password, encryption keys, the database password), and each
  configuration secret when it is read from a file, the environment or the
  encrypted store (`register_secret_value`).

Provider errors pass `redact_text` too (`ProviderError`), because their
messages are stored and shown by the monitoring API, not only logged.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import structlog

REDACTED = "[redacted]"
#: registered values shorter than this are not searched for (they would blot out
#: ordinary words); patterns still cover them where they appear as credentials
MIN_SECRET_LENGTH = 6
_MAX_SECRETS = 100_000

_SECRET_NAME = re.compile(
    r"(?i)(passw(or)?d|passphrase|secret|token|authorization|api_?key|private_?key|"
    r"service_account|credential|cookie)"
)
_SECRET_KEYWORDS = ("passw", "secret", "token", "apikey", "api_key", "privatekey",
                    "private_key")
# a key naming a secret; keys that only name or point at one (`password_env`) excluded
_KEY = (r"[\w.-]*(?:passw(?:or)?d|secret|token|api_?key|private_?key)[\w.-]*"
        r"(?<!_env)(?<!_file)(?<!_id)(?<!_ids)(?<!_name)(?<!_names)")

# (cheap trigger: lowercase substrings, one of which must be present; pattern; replacement).
# The triggers keep the cost of a line without credentials to a few string scans.
_PATTERNS: tuple[tuple[tuple[str, ...], re.Pattern[str], str], ...] = (
    # an Authorization header, whatever its scheme: keep the scheme, drop the credentials
    (("authorization",),
     re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?(?:[A-Za-z]+\s+)?)[^\s\"',;]+"),
     rf"\1{REDACTED}"),
    # Bearer <token> / Basic <base64>, wherever they appear
    (("bearer",), re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9\-._~+/]+=*"), rf"\1\2{REDACTED}"),
    (("basic",),
     re.compile(r"\b(Basic|BASIC|basic)(\s+)(?=[A-Za-z0-9+/]*[0-9+/=])[A-Za-z0-9+/]{4,}={0,2}"),
     rf"\1\2{REDACTED}"),
    # a JSON Web Token
    (("eyj",), re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
    # the token of an iCalendar feed link (the link's only key)
    (("absfeed_",), re.compile(r"absfeed_[A-Za-z0-9_-]+"), REDACTED),
    # scheme://user:password@host
    (("://",), re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@]*):[^\s/@]*@"),
     rf"\1:{REDACTED}@"),
    # a secret-named key with its value: `password=...` (query strings, forms, DSNs),
    # `"client_secret": "..."` (JSON, reprs), `sasl_password: ...` at the start of a
    # line (YAML). Not prose such as "field 'caldav.password': give it as ...", and
    # not keys that only name or point at a secret (`password_env`, `token_id`).
    (_SECRET_KEYWORDS, re.compile(
        rf"(?i)(\b{_KEY}\s*=\s*)([^\s\"'&,;]+)"
    ), rf"\1{REDACTED}"),
    (_SECRET_KEYWORDS, re.compile(
        rf"(?i)([\"']{_KEY}[\"']\s*:\s*[\"'])([^\"']*)"
    ), rf"\1{REDACTED}"),
    (_SECRET_KEYWORDS, re.compile(
        rf"(?im)(^\s*-?\s*{_KEY}\s*:\s+)(\S+)"
    ), rf"\1{REDACTED}"),
)

_TRIGGERS = tuple(dict.fromkeys(t for triggers, _, _ in _PATTERNS for t in triggers))

_lock = threading.Lock()
_secrets: set[str] = set()
_secrets_pattern: re.Pattern[str] | None = None


def register_secret_value(value: str) -> str:
    """Remember `value` as a secret: it is removed from every later log line and
    provider error. Returns `value`, so callers can register where they read."""
    global _secrets_pattern
    text = value.strip()
    if len(text) >= MIN_SECRET_LENGTH and text not in _secrets and len(_secrets) < _MAX_SECRETS:
        with _lock:
            _secrets.add(text)
            _secrets_pattern = None
    return value


def register_secret_values(values: Iterable[str | None]) -> None:
    for value in values:
        if value:
            register_secret_value(value)


def _known_secrets() -> re.Pattern[str] | None:
    global _secrets_pattern
    pattern = _secrets_pattern
    if pattern is None and _secrets:
        with _lock:
            ordered = sorted(_secrets, key=len, reverse=True)  # longest first
            pattern = _secrets_pattern = re.compile("|".join(map(re.escape, ordered)))
    return pattern


def redact_text(text: str) -> str:
    """`text` without credentials and without any registered secret value."""
    known = _known_secrets()
    if known is not None:
        text = known.sub(REDACTED, text)
    lower = text.lower()
    for trigger in _TRIGGERS:
        if trigger in lower:
            break
    else:  # the usual text: no credential-like word at all
        return text
    for triggers, pattern, replacement in _PATTERNS:
        if any(t in lower for t in triggers):
            text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if depth > 8:
        return REDACTED
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and _secret_field(k) and v is not None
                else _redact_value(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    return redact_text(str(value))


_GENERATED = frozenset({"timestamp", "level", "log_level", "logger"})  # structlog's own


@functools.lru_cache(maxsize=4096)
def _secret_field(name: str) -> bool:
    """A field named like a secret (`password`, `token`...), unless it names or
    counts one (`token_id`, `secret_names`)."""
    if name.lower().endswith(("_id", "_ids", "_name", "_names", "_count")):
        return False
    return _SECRET_NAME.search(name) is not None


def redact_event(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the redaction point for structured events."""
    for key, value in list(event_dict.items()):
        if key in _GENERATED:
            continue
        if _secret_field(key) and value is not None:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact_value(value)
    return event_dict


def configure(level: str = "INFO", fmt: str = "json") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_event,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_absence_sync", False)]:
        root.removeHandler(old)
    handler._absence_sync = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, redact_event, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
