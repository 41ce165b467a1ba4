"""The provider interface and its error vocabulary (docs/guarantees.md,
'Permanent failures and error codes').

Every calendar provider implements `Provider`; every failure leaves a
provider as a `ProviderError` carrying a stable `code`, a human `hint`, a
`retriable` flag and an optional `retry_after` (seconds) from the server.
Each provider translates its HTTP statuses and error codes in one place.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import ssl
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from consumer.logs import redact_text

if TYPE_CHECKING:
    from consumer.config import SyncConfig
    from consumer.render import DesiredEvent, Mark
    from consumer.settings import Settings

MAILBOX_NOT_FOUND = "mailbox_not_found"
ACCESS_DENIED = "access_denied"
AUTH_FAILED = "auth_failed"
CONSENT_MISSING = "consent_missing"
THROTTLED = "throttled"
SERVER_UNREACHABLE = "server_unreachable"
TLS_UNTRUSTED_CERTIFICATE = "tls_untrusted_certificate"
INVALID_EVENT = "invalid_event"
PROVIDER_ERROR = "provider_error"

ERROR_CODES = (
    MAILBOX_NOT_FOUND, ACCESS_DENIED, AUTH_FAILED, CONSENT_MISSING, THROTTLED,
    SERVER_UNREACHABLE, TLS_UNTRUSTED_CERTIFICATE, INVALID_EVENT, PROVIDER_ERROR,
)

DEFAULT_HINTS = {
    MAILBOX_NOT_FOUND: "The employee's address in the HR system may differ from the mailbox.",
    ACCESS_DENIED: "The account or application may not write to this calendar.",
    AUTH_FAILED: "Check the credentials of this configuration.",
    CONSENT_MISSING: "An administrator of the customer's directory must grant consent.",
    THROTTLED: "The calendar server asked to slow down; retried automatically.",
    SERVER_UNREACHABLE: "Check the server URL and the network path; retried automatically.",
    TLS_UNTRUSTED_CERTIFICATE: (
        "The server's certificate is not trusted: install a certificate from a trusted "
        "authority or set ABSENCE_SYNC_CA_BUNDLE."
    ),
    INVALID_EVENT: "The calendar server rejected the event's content.",
    PROVIDER_ERROR: "The calendar server failed; retried automatically if temporary.",
}


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value (delta-seconds or an HTTP date);
    None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - (now or dt.datetime.now(dt.UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class ProviderError(Exception):
    """A failed calendar operation, in the engine's error vocabulary."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retriable: bool,
        retry_after: float | None = None,
        hint: str | None = None,
    ) -> None:
        # stored and shown by the monitoring API, not only logged: no credential a
        # server echoed back (error bodies may quote the request) goes further
        message = redact_text(message)
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retriable = retriable
        self.retry_after = retry_after
        self.hint = redact_text(hint) if hint is not None else DEFAULT_HINTS.get(code, "")


class EventGone(ProviderError):
    """The event to update no longer exists (the employee deleted it)."""

    def __init__(self, message: str = "the event no longer exists") -> None:
        super().__init__(PROVIDER_ERROR, message, retriable=False, hint="")


@dataclass
class ProviderContext:
    """Process-wide resources providers share."""

    settings: Settings
    ssl_context: ssl.SSLContext = field(default_factory=ssl.create_default_context)


def make_ssl_context(settings: Settings) -> ssl.SSLContext:
    """Verified TLS, with the operator's extra CA bundle when configured."""
    context = ssl.create_default_context()
    if settings.ca_bundle is not None:
        context.load_verify_locations(cafile=str(settings.ca_bundle))
    return context


class Provider(ABC):
    """A calendar system. One instance per sync configuration.

    Implementations must be safe for many concurrent calls. `create` must be
    idempotent for a given `transaction_id` where the calendar API allows it.
    """

    kind: ClassVar[str]
    #: calendar operations the dispatcher lets run at once for one mailbox (None: no limit)
    mailbox_concurrency: ClassVar[int | None] = None

    @abstractmethod
    async def create(self, event: DesiredEvent, *, transaction_id: str) -> str:
        """Write a new event into `event.mailbox`; return its provider id."""

    @abstractmethod
    async def update(self, mailbox: str, event_id: str, event: DesiredEvent) -> str:
        """Replace an event's content; raise `EventGone` if it no longer exists.
        Returns the (possibly new) provider id."""

    @abstractmethod
    async def delete(self, mailbox: str, event_id: str) -> bool:
        """Remove an event. Returns False when it was already gone (not an error)."""

    @abstractmethod
    async def find(self, mailbox: str, mark: Mark) -> list[str]:
        """Ids of the events in `mailbox` that carry `mark` (rule 5.7)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads."""

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the provider found doubtful about its configuration or server (e.g. a
        server out of support). May change after calls; the dispatcher stores it on
        the configuration."""
        return ()

    @classmethod
    def from_config(cls, config: SyncConfig, context: ProviderContext) -> Provider:
        raise NotImplementedError(f"{cls.__name__} cannot be built from a configuration")
