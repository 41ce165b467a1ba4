"""Exchange Server on-premises through EWS with exchangelib and impersonation (docs/exchange.md).

One `ExchangeProvider` per sync configuration, that is per EWS endpoint and
service account. What callers may rely on:

* The EWS URL is the configured one (https only; no autodiscover). TLS is
  verified with the provider's SSL context (system store plus
  ABSENCE_SYNC_CA_BUNDLE); no proxy and no CA bundle is taken from the
  environment. The service account signs in with NTLM or basic authentication
  (`auth`; without it, NTLM unless the server offers basic only, learnt from one
  unauthenticated request) and acts on each employee's mailbox through EWS
  impersonation (`ExchangeImpersonation`, the target being
  `DesiredEvent.mailbox`), which needs the ApplicationImpersonation role.
* exchangelib is blocking: every exchangelib call runs on this provider's
  thread pool (`max_connections` threads, one HTTP connection each), never
  on the event loop. exchangelib's own waiting is switched off: its retry
  policy fails fast, HTTP answers other than a 200 or a 500 carrying a SOAP
  fault become `HttpStatusError` before exchangelib can read a 401 as
  throttling, and its session pool never shrinks (`decrease_poolsize` under
  load deadlocks exchangelib 5.6 when several connections are busy). All
  waiting happens here, bounded by the request timeout.
* The server version is read from the server once (exchangelib's probe) and
  cached; the version each response reports is kept. Exchange 2010 and 2013
  yield a warning (`warnings`, logged once), as does a URL that points at
  Exchange Online.
* Operations issued together for one mailbox are sent as one bulk EWS
  request (CreateItem, UpdateItem or DeleteItem with up to `MAX_BATCH`
  items), with a result per item: exchangelib raises most per-item errors
  of bulk calls, so the services used here return every per-item error
  instead. One bulk request per mailbox is in flight at a time.
* `create` is not idempotent in EWS. A create whose outcome is unknown (a
  5xx, a timeout or a reset after the request left) is resolved by looking
  for the ownership mark before anything is retried, so a retry never stores
  a second item; a repeated `transaction_id` answers the id already stored.
* `ErrorServerBusy` fails the operation with `throttled` and the server's
  `BackOffMilliseconds`; nothing more is sent for that mailbox until the
  back-off has elapsed (Exchange charges impersonated calls to the target
  mailbox's budget), nor to the server after a 429 or 503 with Retry-After.
  Later operations wait when the wait fits in their timeout.
  Authentication, certificate and wrong-URL failures are remembered for
  `FAILURE_MEMORY` seconds, so a bad password does not lock the service
  account out through a burst of failed sign-ins.
* Every failure leaves through `translate_error`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

import requests
import urllib3
from exchangelib import BASIC, IMPERSONATION, NTLM, Account, CalendarItem, Configuration, Q
from exchangelib import Credentials as _ExchangelibCredentials
from exchangelib.errors import (
    ErrorAccessDenied,
    ErrorCalendarEndDateIsEarlierThanStartDate,
    ErrorConnectionFailed,
    ErrorExceededConnectionCount,
    ErrorImpersonateUserDenied,
    ErrorImpersonationFailed,
    ErrorInternalServerError,
    ErrorInternalServerTransientError,
    ErrorInvalidIdMalformed,
    ErrorInvalidPropertySet,
    ErrorInvalidRequest,
    ErrorInvalidSchemaVersionForMailboxVersion,
    ErrorInvalidServerVersion,
    ErrorInvalidSmtpAddress,
    ErrorInvalidValueForProperty,
    ErrorItemNotFound,
    ErrorMailboxConfiguration,
    ErrorMailboxMoveInProgress,
    ErrorMailboxStoreUnavailable,
    ErrorNonExistentMailbox,
    ErrorNonPrimarySmtpAddress,
    ErrorNoRespondingCASInDestinationSite,
    ErrorQuotaExceeded,
    ErrorSchemaValidation,
    ErrorServerBusy,
    ErrorTimeoutExpired,
    ErrorTimeZone,
    ErrorTooManyObjectsOpened,
    EWSError,
    ResponseMessageError,
    SessionPoolMinSizeReached,
    SOAPError,
    TransportError,
    UnauthorizedError,
    UnknownTimeZone,
)
from exchangelib.ewsdatetime import UTC, EWSDate, EWSDateTime, EWSTimeZone
from exchangelib.extended_properties import ExtendedProperty
from exchangelib.folders import SHALLOW, Calendar, FolderCollection, Root
from exchangelib.items import (
    ALL_OCCURRENCES,
    ALWAYS_OVERWRITE,
    HARD_DELETE,
    ID_ONLY,
    SAVE_ONLY,
    SEND_TO_NONE,
)
from exchangelib.properties import DistinguishedFolderId, ItemId, Mailbox
from exchangelib.protocol import FailFast, Protocol
from exchangelib.services import (
    CreateItem,
    DeleteItem,
    GetUserOofSettings,
    SetUserOofSettings,
    UpdateItem,
)
from exchangelib.settings import OofSettings
from exchangelib.transport import DEFAULT_HEADERS
from exchangelib.util import TNS, is_xml
from exchangelib.version import EXCHANGE_2010_SP2, EXCHANGE_2013, EXCHANGE_2016, Version

from consumer import logs
from consumer.config import config_warnings
from consumer.providers.base import (
    ACCESS_DENIED,
    AUTH_FAILED,
    INVALID_EVENT,
    MAILBOX_NOT_FOUND,
    PROVIDER_ERROR,
    SERVER_UNREACHABLE,
    THROTTLED,
    TLS_UNTRUSTED_CERTIFICATE,
    EventGone,
    Provider,
    ProviderContext,
    ProviderError,
    Reply,
    certificate_problem,
    parse_retry_after,
    status_error,
)
from consumer.replies import ReplySetting

if TYPE_CHECKING:
    from consumer.config import SyncConfig
    from consumer.render import DesiredEvent, Mark
    from consumer.settings import Settings

log = logs.get("exchange")
# exchangelib logs failed requests with their XML (subjects, addresses), and pyspnego
# logs NTLM messages at debug level (crackable): errors leave this module translated
logging.getLogger("exchangelib").setLevel(logging.CRITICAL)
logging.getLogger("spnego").setLevel(logging.WARNING)
T = TypeVar("T")
Kind = Literal["create", "update", "delete"]

#: The named property carrying the ownership mark: the same one the microsoft365
#: provider writes, so marks survive a move of the mailboxes to Exchange Online.
MARK_PROPERTY_SET = "e56dfbda-e178-4d85-a796-ee6de8a4c115"
MARK_PROPERTY_NAME = "absenceSyncMark"
MARK_FIELD = "absence_sync_mark"
MAX_CONNECTIONS = 4
MAX_BATCH = 20
BATCH_WINDOW = 0.005
FAILURE_MEMORY = 60.0
_TRANSACTIONS_KEPT = 10_000
_ACCOUNTS_KEPT = 1_000
_USER_AGENT = "absence-sync (exchangelib)"
_LEGACY_FREE_BUSY = {
    "free": "Free",
    "tentative": "Tentative",
    "busy": "Busy",
    "oof": "OOF",
    "workingElsewhere": "WorkingElsewhere",
}
# what is assumed when the version probe gets no version from a server that
# answers: every server from Exchange 2010 SP2 on accepts it, and the first item
# request's answer then tells the real version
_PROVISIONAL_VERSION = Version(build=EXCHANGE_2010_SP2, api_version="Exchange2010_SP2")
_UPDATED_FIELDS = (
    "subject", "legacy_free_busy_status", "is_all_day", "start", "end", "sensitivity",
    "categories", "reminder_is_set", "is_response_requested", MARK_FIELD,
)

_MAILBOX_ERRORS = (
    ErrorNonExistentMailbox, ErrorInvalidSmtpAddress, ErrorNonPrimarySmtpAddress,
    ErrorMailboxConfiguration,
)
_ACCESS_ERRORS = (ErrorImpersonateUserDenied, ErrorAccessDenied, ErrorImpersonationFailed)
_GONE_ERRORS = (ErrorItemNotFound, ErrorInvalidIdMalformed)
_TRANSIENT_ERRORS = (
    ErrorMailboxStoreUnavailable, ErrorMailboxMoveInProgress, ErrorConnectionFailed,
    ErrorInternalServerTransientError, ErrorInternalServerError, ErrorTooManyObjectsOpened,
    ErrorExceededConnectionCount, ErrorTimeoutExpired, ErrorNoRespondingCASInDestinationSite,
)
_CONTENT_ERRORS = (
    ErrorSchemaValidation, ErrorInvalidValueForProperty, ErrorCalendarEndDateIsEarlierThanStartDate,
    ErrorTimeZone, ErrorInvalidPropertySet, ErrorInvalidRequest, UnknownTimeZone,
)
# a create that failed with one of these may nevertheless have been stored
_MAYBE_STORED = (ErrorInternalServerError, ErrorInternalServerTransientError, ErrorTimeoutExpired)


class _OwnershipMark(ExtendedProperty):  # type: ignore[misc]
    """Rule 5.7: `absence-sync:<config id>:<absence id>` in a named string property."""

    property_set_id = MARK_PROPERTY_SET
    property_name = MARK_PROPERTY_NAME
    property_type = "String"


with contextlib.suppress(ValueError):  # registered once per process
    CalendarItem.register(MARK_FIELD, _OwnershipMark)


# --------------------------------------------------------------------------- errors


class HttpStatusError(Exception):
    """EWS answered with an HTTP status that carries no SOAP message (401, 503, 404...)."""

    def __init__(self, status: int, *, retry_after: float | None = None, location: str = "",
                 locked_out: bool = False, offered: str = "") -> None:
        super().__init__(f"HTTP {status}" + (f" (redirect to {location})" if location else ""))
        self.status = status
        self.retry_after = retry_after
        self.location = location
        self.locked_out = locked_out
        self.offered = offered.lower()  # WWW-Authenticate of a 401


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, outermost first (exchangelib re-raises a lot)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _cert_problem(chain: Sequence[BaseException]) -> bool:
    return any(certificate_problem(exc) for exc in chain[:1])


def _reraised(exc: BaseException) -> bool:
    """exchangelib's wrappers ("Reraised from ..."): the cause tells what happened."""
    return isinstance(exc, ErrorServerBusy | ErrorTimeoutExpired) and str(exc).startswith(
        "Reraised from"
    )


def _cause(exc: BaseException) -> BaseException:
    """The most telling exception of the chain: through exchangelib's wrappers, and
    through the version probe's `TransportError`."""
    for candidate in _chain(exc):
        if _reraised(candidate):
            continue
        if (
            isinstance(candidate, TransportError)
            and not isinstance(candidate, ResponseMessageError | SOAPError)
            and candidate.__context__ is not None
            and str(candidate).startswith("No valid version headers")
        ):
            continue
        return candidate
    return exc


_CONNECT_FAILURES = (
    requests.ConnectTimeout, urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.ConnectTimeoutError,
)


def _never_sent(exc: BaseException) -> bool:
    """A connection that could not be opened: the request did not leave."""
    for item in _chain(exc):
        reason = getattr(item.args[0], "reason", None) if item.args else None
        if isinstance(item, _CONNECT_FAILURES) or isinstance(reason, _CONNECT_FAILURES):
            return True
    return False


def outcome_unknown(exc: BaseException) -> bool:
    """Whether a failed write may nevertheless have been applied by the server."""
    if isinstance(exc, ProviderError):
        return False
    chain = _chain(exc)
    if _cert_problem(chain) or _never_sent(exc):
        return False
    cause = _cause(exc)
    if isinstance(cause, HttpStatusError):
        return cause.status >= 500
    if isinstance(cause, requests.RequestException | OSError):
        return True
    return isinstance(cause, _MAYBE_STORED)


@dataclass(frozen=True, slots=True)
class _Where:
    """What an error message and hint may name."""

    host: str
    username: str
    mailbox: str | None = None
    auth: str = NTLM


def _hint_mailbox(mailbox: str | None) -> str:
    who = f"Exchange has no mailbox whose primary SMTP address is {mailbox}. " if mailbox else ""
    return (
        who + "The employee's address in the HR system may differ from the mailbox (a "
        "secondary address, a typo, or a mailbox not yet created): set calendar_address in "
        "the HR system to the mailbox's primary SMTP address."
    )


def _hint_access(where: _Where) -> str:
    target = f" {where.mailbox}" if where.mailbox else " this mailbox"
    return (
        f"The service account {where.username} may not impersonate{target}: assign it the "
        "ApplicationImpersonation role (New-ManagementRoleAssignment -Role "
        f"ApplicationImpersonation -User {where.username} -CustomRecipientWriteScope <scope>) "
        "and check that the management scope of that assignment includes the mailbox "
        "(Get-ManagementRoleAssignment -Role ApplicationImpersonation). See docs/exchange.md."
    )


def _hint_auth(where: _Where, *, locked_out: bool) -> str:
    lead = (
        f"The service account {where.username} is locked out in Active Directory. "
        if locked_out else ""
    )
    return lead + (
        f"Exchange ({where.host}) refused the credentials of the service account "
        f"{where.username} (HTTP 401): check exchange.username (DOMAIN\\user or "
        "user@domain), the password, that the account is "
        "enabled and its password not expired, and that exchange.auth (ntlm or basic) is "
        "enabled on the EWS virtual directory."
    )


def _hint_url(where: _Where, detail: str) -> str:
    return (
        f"{detail} The URL must be the EWS endpoint of the Exchange server, "
        f"https://{where.host}/EWS/Exchange.asmx (not OWA, not autodiscover)."
    )


def translate_error(exc: BaseException, where: _Where) -> ProviderError:
    """The one place where EWS, HTTP, TLS and exchangelib failures become `ProviderError`s."""
    if isinstance(exc, ProviderError):
        return exc
    chain = _chain(exc)
    prefix = f"{where.mailbox}: " if where.mailbox else ""
    if _cert_problem(chain):
        return ProviderError(
            TLS_UNTRUSTED_CERTIFICATE,
            f"the certificate of {where.host} does not verify: {_short(exc)}", retriable=False,
            hint=f"The certificate of {where.host} is not trusted (self-signed, an internal "
            "CA, or issued for another name): install one from a trusted authority, or give "
            "the issuing CA in ABSENCE_SYNC_CA_BUNDLE. The URL's host must match the "
            "certificate.",
        )
    cause = _cause(exc)
    name = type(cause).__name__
    if isinstance(cause, HttpStatusError):
        return _http_error(cause, where, prefix)
    if isinstance(cause, UnauthorizedError):
        return ProviderError(AUTH_FAILED, f"{prefix}{_short(cause)}", retriable=False,
                             hint=_hint_auth(where, locked_out="locked out" in str(cause)))
    if isinstance(cause, ErrorServerBusy):
        back_off = cause.back_off if cause.back_off and cause.back_off > 0 else None
        return ProviderError(
            THROTTLED, f"{prefix}ErrorServerBusy: {_short(cause)}", retriable=True,
            retry_after=back_off,
            hint="Exchange throttles the service account (ErrorServerBusy); retried after the "
            "server's back-off. If it persists, give the service account a throttling policy "
            "with higher EWS limits (New-ThrottlingPolicy, Set-ThrottlingPolicyAssociation).",
        )
    if isinstance(cause, _MAILBOX_ERRORS):
        return ProviderError(MAILBOX_NOT_FOUND, f"{prefix}{name}: {_short(cause)}",
                             retriable=False, hint=_hint_mailbox(where.mailbox))
    if isinstance(cause, _ACCESS_ERRORS):
        return ProviderError(ACCESS_DENIED, f"{prefix}{name}: {_short(cause)}",
                             retriable=False, hint=_hint_access(where))
    if isinstance(cause, _GONE_ERRORS):
        return EventGone(f"{prefix}{name}: {_short(cause)}")
    if isinstance(cause, _TRANSIENT_ERRORS):
        return ProviderError(PROVIDER_ERROR, f"{prefix}{name}: {_short(cause)}", retriable=True)
    if isinstance(cause, _CONTENT_ERRORS):
        return ProviderError(INVALID_EVENT, f"{prefix}{name}: {_short(cause)}", retriable=False)
    if isinstance(cause, ErrorInvalidServerVersion | ErrorInvalidSchemaVersionForMailboxVersion):
        return ProviderError(
            PROVIDER_ERROR, f"{prefix}{name}: {_short(cause)}", retriable=False,
            hint="The Exchange server accepted none of the EWS versions exchangelib speaks "
            "(Exchange 2010 or later is required).",
        )
    if isinstance(cause, ErrorQuotaExceeded):
        return ProviderError(PROVIDER_ERROR, f"{prefix}{name}: {_short(cause)}", retriable=False,
                             hint=f"The mailbox {where.mailbox} is over its storage quota.")
    if isinstance(cause, PermissionError):  # requests_ntlm: the server offered no challenge
        return ProviderError(
            AUTH_FAILED, f"{prefix}NTLM sign-in refused: {_short(cause)}", retriable=False,
            hint=_hint_auth(where, locked_out=False) + " The server did not take part in the "
            "NTLM handshake: if only basic authentication is enabled, set exchange.auth: basic.",
        )
    if isinstance(cause, requests.Timeout | TimeoutError):
        return ProviderError(
            SERVER_UNREACHABLE, f"{prefix}the request to {where.host} timed out", retriable=True,
            hint=f"{where.host} did not answer in time; retried automatically. Check the "
            "server's health and the network path.",
        )
    if isinstance(cause, requests.ConnectionError | OSError):
        return ProviderError(
            SERVER_UNREACHABLE, f"{prefix}cannot reach {where.host}: {_short(cause)}",
            retriable=True,
            hint=f"Cannot reach {where.host}: check the URL, DNS, and that this worker may open "
            "HTTPS connections to the Exchange server (firewall, load balancer); retried "
            "automatically.",
        )
    if isinstance(cause, SOAPError) and str(cause).startswith("Bad SOAP response"):
        return ProviderError(
            PROVIDER_ERROR, f"{prefix}not an EWS answer: {_short(cause)}", retriable=False,
            hint=_hint_url(where, f"{where.host} answered, but not with EWS (SOAP)."),
        )
    if isinstance(cause, ResponseMessageError):
        return ProviderError(PROVIDER_ERROR, f"{prefix}{name}: {_short(cause)}", retriable=False,
                             hint="Exchange refused the request with this EWS error code.")
    if isinstance(cause, EWSError):
        return ProviderError(PROVIDER_ERROR, f"{prefix}{name}: {_short(cause)}", retriable=True)
    # anything else is a bug here or in exchangelib: recorded, never retried in a loop
    return ProviderError(
        PROVIDER_ERROR, f"{prefix}unexpected {name}: {_short(cause)}", retriable=False,
        hint="An unexpected failure inside absence-sync; please report it with the message.",
    )


def _http_error(error: HttpStatusError, where: _Where, prefix: str) -> ProviderError:
    """An HTTP answer without a SOAP message, through the boundary's status ladder
    (429, and 503 with Retry-After, are throttled there) with Exchange's hints."""
    headers = {"location": error.location}
    if error.retry_after is not None:
        headers["retry-after"] = f"{error.retry_after:g}"
    reply = Reply(error.status, headers)

    def exchange_statuses(reply: Reply, detail: str) -> ProviderError | None:
        status = reply.status
        if status == 401:
            hint = _hint_auth(where, locked_out=error.locked_out)
            if where.auth == NTLM and "basic" in error.offered and "ntlm" not in error.offered:
                hint += " The server offers basic authentication only: set exchange.auth: basic."
            if where.auth == BASIC and "basic" not in error.offered and "ntlm" in error.offered:
                hint += " The server does not offer basic authentication: set exchange.auth: ntlm."
            return ProviderError(AUTH_FAILED, detail, retriable=False, hint=hint)
        if status == 403:
            return ProviderError(
                ACCESS_DENIED, detail, retriable=False,
                hint=f"{where.host} forbids EWS to the service account {where.username}: check "
                "that EWS is enabled for it (Set-CASMailbox -EwsEnabled $true), that no EWS "
                "application access policy blocks this client, and the virtual directory's "
                "SSL and IP restrictions.",
            )
        if status in (301, 302, 303, 307, 308):
            if "genericerrorpage" in error.location.lower():  # IIS's answer to a transient failure
                return ProviderError(PROVIDER_ERROR, detail, retriable=True)
            return ProviderError(PROVIDER_ERROR, detail, retriable=False, hint=_hint_url(
                where, f"{where.host} redirected the request to {error.location or 'elsewhere'}."))
        if status in (404, 405):
            return ProviderError(PROVIDER_ERROR, detail, retriable=False, hint=_hint_url(
                where, f"{where.host} has no EWS endpoint at this path (HTTP {status})."))
        if status >= 500 or status in (408, 409, 423):
            return ProviderError(
                PROVIDER_ERROR, detail, retriable=True, retry_after=error.retry_after,
                hint=f"{where.host} failed (HTTP {status}); retried automatically.",
            )
        if status in (400, 413, 415, 422):  # not about an event: EWS says that in SOAP
            return ProviderError(PROVIDER_ERROR, detail, retriable=False)
        return None

    return status_error(reply, f"{prefix}{error}", exchange_statuses)


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


def _copy(error: ProviderError) -> ProviderError:
    if isinstance(error, EventGone):
        return EventGone(error.message)
    return ProviderError(error.code, error.message, retriable=error.retriable,
                         retry_after=error.retry_after, hint=error.hint)


# --------------------------------------------------------------------------- exchangelib


class _FailFastPolicy(FailFast):  # type: ignore[misc]
    """Never wait inside exchangelib, and say what HTTP answered.

    A 200, or a 500 holding a SOAP message (EWS faults: ErrorServerBusy...), is left
    to exchangelib; every other status becomes `HttpStatusError` (exchangelib would
    read a 401 as throttling, and its 503 handling loses `Retry-After`)."""

    def raise_response_errors(self, response: requests.Response) -> None:
        status = response.status_code
        if status == 200 or (status == 500 and response.content and is_xml(response.content)):
            return
        raise HttpStatusError(
            status,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            location=response.headers.get("Location", "")[:200],
            locked_out=b"currently locked out" in (response.content or b""),
            offered=response.headers.get("WWW-Authenticate", "")[:200],
        )


class _Credentials(_ExchangelibCredentials):  # type: ignore[misc]
    """Compared by identity: exchangelib caches one `Protocol` per (URL, credentials)
    for the whole process; each provider keeps its own."""

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)


class _TlsAdapter(requests.adapters.HTTPAdapter):
    """One verified connection, with the provider's SSL context instead of certifi."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self._ssl_context = ssl_context
        super().__init__(pool_connections=1, pool_maxsize=1, pool_block=True, max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        conn.cert_reqs = "CERT_REQUIRED"


class _Protocol(Protocol):  # type: ignore[misc]
    """exchangelib's connection pool for one provider (see the module docstring)."""

    RETRY_WAIT = 0  # no invented back-off: a busy answer without one carries none

    def __init__(self, *args: Any, ssl_context: ssl.SSLContext, timeout: float,
                 **kwargs: Any) -> None:
        self._ssl_context = ssl_context
        super().__init__(*args, **kwargs)
        self.TIMEOUT = timeout

    def raw_session(self, prefix: str, oauth2_client: Any = None,
                    oauth2_session_params: Any = None,
                    oauth2_token_endpoint: Any = None) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # no proxy and no CA bundle from the environment
        session.headers.update(DEFAULT_HEADERS)
        session.headers["User-Agent"] = _USER_AGENT
        session.mount("https://", _TlsAdapter(self._ssl_context))
        session.mount("http://", requests.adapters.HTTPAdapter(max_retries=0))
        return session

    def decrease_poolsize(self) -> None:
        # exchangelib 5.6 takes the pool lock and then waits for a session, which
        # deadlocks when the pool is below its maximum and every session is busy.
        # The pool keeps its size; this provider bounds connections with its threads.
        raise SessionPoolMinSizeReached("absence-sync keeps the session pool size")


class _PerItemErrors:
    """Bulk services that return every per-item error instead of raising most of them
    (exchangelib raises all but a few, losing the results of the other items), and
    keep the BackOffMilliseconds of a per-item ErrorServerBusy."""

    ERRORS_TO_CATCH_IN_RESPONSE = (ResponseMessageError, *CreateItem.ERRORS_TO_CATCH_IN_RESPONSE)

    @staticmethod
    def _get_exception(code: str, text: str, msg_xml: Any = None,
                       rule_errors: Any = None) -> Exception:
        error: Exception
        if code == "ErrorServerBusy" and msg_xml is not None:
            for value in msg_xml.findall(f"{{{TNS}}}Value"):
                if value.get("Name") == "BackOffMilliseconds" and (value.text or "").isdigit():
                    error = ErrorServerBusy(text, back_off=int(value.text) / 1000)
                    return error
        error = CreateItem._get_exception(code, text, msg_xml, rule_errors)
        return error


class _CreateItems(_PerItemErrors, CreateItem):  # type: ignore[misc]
    pass


class _UpdateItems(_PerItemErrors, UpdateItem):  # type: ignore[misc]
    pass


class _DeleteItems(_PerItemErrors, DeleteItem):  # type: ignore[misc]
    pass


def legacy_free_busy(show_as: str, version: Version) -> str:
    """LegacyFreeBusyStatus for a show-as; WorkingElsewhere exists from Exchange 2013 on."""
    value = _LEGACY_FREE_BUSY[show_as]
    if value == "WorkingElsewhere" and version.build is not None and version.build < EXCHANGE_2013:
        return "Free"
    return value


def out_of_support_warning(version: Version) -> str | None:
    """The warning for an Exchange server older than 2016, from the build it reports."""
    build = version.build
    if build is None or build >= EXCHANGE_2016:
        return None
    if build.major_version == 15:
        name, ended = "Exchange Server 2013", "April 2023"
    elif build.major_version == 14:
        name, ended = "Exchange Server 2010", "October 2020"
    else:
        name, ended = f"Exchange Server (version {build.major_version})", "long ago"
    return (
        f"{name} (build {build}) is out of support since {ended} and receives no security "
        "updates: plan an upgrade. absence-sync keeps writing to it meanwhile."
    )


def calendar_item(event: DesiredEvent, account: Account, folder: Calendar,
                  *, item_id: str | None = None) -> CalendarItem:
    """The EWS item for `event`: quiet (rule 5.6) and marked (rule 5.7).

    All-day items are given as dates with an inclusive end (exchangelib adds the day
    back and sends midnights) in the event's zone; timed items as wall-clock times in
    the event's zone. Zones travel as Windows ids."""
    zone = EWSTimeZone(event.time_zone)
    if event.all_day:
        start: EWSDate | EWSDateTime = EWSDate.from_date(event.start.date())
        last_day = event.end.date() - dt.timedelta(days=1)
        end: EWSDate | EWSDateTime = EWSDate.from_date(max(last_day, event.start.date()))
    else:
        start = _local(event.start, zone)
        end = _local(event.end, zone)
    values: dict[str, Any] = {
        "subject": event.subject,
        "legacy_free_busy_status": legacy_free_busy(event.show_as, account.version),
        "is_all_day": event.all_day,
        "start": start,
        "end": end,
        "_start_timezone": zone,
        "_end_timezone": zone,
        "sensitivity": "Private" if event.private else "Normal",
        "categories": [event.category] if event.category else None,
        "reminder_is_set": False,
        "is_response_requested": False,
        MARK_FIELD: event.mark.value,
    }
    if item_id is not None:
        values["id"] = item_id
        values["changekey"] = None
    return CalendarItem(account=account, folder=folder, **values)


def _local(moment: dt.datetime, zone: EWSTimeZone) -> EWSDateTime:
    """A wall-clock time in `zone` (DST days keep the wall clock)."""
    return EWSDateTime(moment.year, moment.month, moment.day, moment.hour, moment.minute,
                       moment.second, tzinfo=zone)


# --------------------------------------------------------------------------- the provider


@dataclass(eq=False)
class _Op:
    """One queued write for a mailbox."""

    kind: Kind
    future: asyncio.Future[Any]
    deadline: float
    event: DesiredEvent | None = None
    event_id: str | None = None
    transaction_id: str | None = None


@dataclass
class _Queue:
    mailbox: str
    ops: list[_Op] = field(default_factory=list)  # waiting
    sending: list[_Op] = field(default_factory=list)  # in the request in flight


class ExchangeProvider(Provider):
    """Calendars of one Exchange organisation through EWS (module docstring)."""

    kind: ClassVar[str] = "exchange"

    def __init__(
        self,
        settings: Settings,
        *,
        url: str,
        username: str,
        password: str,
        auth: str | None = None,
        config_id: str = "CONFIG_ID",
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = MAX_CONNECTIONS,
        static_warnings: Sequence[str] = (),
    ) -> None:
        self.config_id = config_id
        self.url = url
        self.username = username
        self.timeout = settings.request_timeout_seconds
        self.batch_window = BATCH_WINDOW
        self.max_connections = max(1, max_connections)
        self._host = urlsplit(url).hostname or url
        self._static_warnings = tuple(static_warnings)
        self._version_warning: str | None = None
        self._version_seen: Version | None = None
        self._provisional = False
        self._auth_chosen = auth is not None
        self._lock = threading.Lock()
        self._config = Configuration(
            credentials=_Credentials(username, password),
            service_endpoint=url,
            auth_type=BASIC if auth == "basic" else NTLM,  # None: chosen by `_choose_auth`
            retry_policy=_FailFastPolicy(),
            max_connections=self.max_connections,
        )
        self._protocol = _Protocol(config=self._config,
                                   ssl_context=ssl_context or ssl.create_default_context(),
                                   timeout=self.timeout)
        self._executor = ThreadPoolExecutor(max_workers=self.max_connections,
                                            thread_name_prefix=f"ews-{config_id}"[:40])
        self._accounts: collections.OrderedDict[str, Account] = collections.OrderedDict()
        self._transactions: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._queues: dict[str, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # monotonic times before which nothing is sent: to the server (HTTP 429/503 with
        # Retry-After), and per mailbox (ErrorServerBusy: Exchange charges impersonated
        # calls to the target mailbox's budget)
        self._server_not_before = 0.0
        self._mailbox_not_before: dict[str, float] = {}
        self._failure: tuple[float, ProviderError] | None = None
        self._closed = False

    @classmethod
    def from_config(cls, config: SyncConfig, context: ProviderContext) -> ExchangeProvider:
        block = config.provider_settings
        where = f"configuration {config.id}"
        url = block.get("url")
        username = block.get("username", config.secrets.get("username"))
        password = config.secrets.get("password")
        missing = [k for k, v in (("url", url), ("username", username), ("password", password))
                   if not v]
        if missing:
            raise ProviderError(
                PROVIDER_ERROR, f"{where} lacks exchange.{', exchange.'.join(missing)}",
                retriable=False,
                hint="Give exchange.url (https://HOST/EWS/Exchange.asmx), exchange.username and "
                "exchange.password_env or exchange.password_file.",
            )
        return cls(
            context.settings,
            url=str(url),
            username=str(username),
            password=str(password),
            auth=str(block["auth"]).lower() if block.get("auth") else None,
            config_id=config.id,
            ssl_context=context.ssl_context,
            max_connections=int(block.get("max_connections", MAX_CONNECTIONS)),
            static_warnings=config_warnings(config),
        )

    # ------------------------------------------------------------------ reports

    @property
    def warnings(self) -> tuple[str, ...]:
        extra = (self._version_warning,) if self._version_warning else ()
        return self._static_warnings + extra

    @property
    def server_version(self) -> Version | None:
        """The version the server reported (None before the first answer)."""
        return self._version_seen

    # ------------------------------------------------------------------ operations

    async def create(self, event: DesiredEvent, *, transaction_id: str) -> str:
        known = self._transactions.get(transaction_id)
        if known is not None:
            return known
        return str(await self._submit("create", event.mailbox, event=event,
                                      transaction_id=transaction_id))

    async def update(self, mailbox: str, event_id: str, event: DesiredEvent) -> str:
        return str(await self._submit("update", mailbox, event=event, event_id=event_id))

    async def delete(self, mailbox: str, event_id: str) -> bool:
        return bool(await self._submit("delete", mailbox, event_id=event_id))

    async def find(self, mailbox: str, mark: Mark) -> list[str]:
        self._check_usable()
        loop = asyncio.get_running_loop()
        await self._wait_until_allowed(mailbox, loop.time() + self.timeout)
        try:
            found = await self._run(self._find_blocking, mailbox, [mark.value])
        except Exception as exc:
            raise self._failed(translate_error(exc, self._where(mailbox)), mailbox) from exc
        return found.get(mark.value, [])

    # ------------------------------------------------------------------ replies

    supports_replies: ClassVar[bool] = True

    async def read_reply(self, mailbox: str) -> ReplySetting:
        return await self._oof_call(mailbox, self._read_oof_blocking, mailbox)

    async def write_reply(self, mailbox: str, setting: ReplySetting) -> ReplySetting:
        """SetUserOofSettings (state Scheduled with UTC times, or Disabled keeping
        the messages it holds), then GetUserOofSettings: what Exchange stored."""
        return await self._oof_call(mailbox, self._write_oof_blocking, mailbox, setting)

    async def _oof_call(self, mailbox: str, fn: Callable[..., T], *args: Any) -> T:
        self._check_usable()
        loop = asyncio.get_running_loop()
        await self._wait_until_allowed(mailbox, loop.time() + self.timeout)
        try:
            return await self._run(fn, *args)
        except Exception as exc:
            raise self._failed(translate_error(exc, self._where(mailbox)), mailbox) from exc

    def _read_oof_blocking(self, mailbox: str) -> ReplySetting:
        def work(account: Account, _calendar: Calendar) -> ReplySetting:
            held = GetUserOofSettings(account=account).get(
                mailbox=Mailbox(email_address=mailbox))
            return oof_reply(held)

        return self._with_account(mailbox, work)

    def _write_oof_blocking(self, mailbox: str, setting: ReplySetting) -> ReplySetting:
        def work(account: Account, _calendar: Calendar) -> ReplySetting:
            box = Mailbox(email_address=mailbox)
            if setting.status == "disabled":
                held = GetUserOofSettings(account=account).get(mailbox=box)
                wanted = OofSettings(state=OofSettings.DISABLED,
                                     external_audience=held.external_audience or "All",
                                     internal_reply=held.internal_reply or "",
                                     external_reply=held.external_reply or "")
            else:
                wanted = oof_settings(setting)
            SetUserOofSettings(account=account).get(expect_result=None, oof_settings=wanted,
                                                    mailbox=box)
            return oof_reply(GetUserOofSettings(account=account).get(mailbox=box))

        return self._with_account(mailbox, work)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        closing = ProviderError(PROVIDER_ERROR, "the provider was closed", retriable=True)
        for queue in self._queues.values():
            for op in queue.ops:
                _fail(op, _copy(closing))
        self._queues.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(KeyError):
            del Protocol[self._config]
        self._protocol.close()

    # ------------------------------------------------------------------ scheduling

    def _where(self, mailbox: str | None = None) -> _Where:
        return _Where(self._host, self.username, mailbox, self._config.auth_type)

    def _check_usable(self) -> None:
        if self._closed:
            raise ProviderError(PROVIDER_ERROR, "the provider was closed", retriable=True)
        failure = self._failure
        if failure is not None:
            if time.monotonic() < failure[0]:
                raise _copy(failure[1])
            self._failure = None

    def _failed(self, error: ProviderError, mailbox: str) -> ProviderError:
        """Note what an error tells about the server or the mailbox before handing it on."""
        now = time.monotonic()
        if error.retry_after:
            until = now + error.retry_after
            if error.code == THROTTLED and "ErrorServerBusy" in error.message:
                key = mailbox.casefold()
                self._mailbox_not_before[key] = max(self._mailbox_not_before.get(key, 0.0),
                                                    until)
            else:
                self._server_not_before = max(self._server_not_before, until)
        provider_wide = error.code in (AUTH_FAILED, TLS_UNTRUSTED_CERTIFICATE) or (
            error.code == PROVIDER_ERROR and not error.retriable and "EWS endpoint" in error.hint
        )
        if provider_wide:
            self._failure = (now + FAILURE_MEMORY, error)
        return error

    def _blocked_for(self, mailbox: str) -> float:
        """Seconds the server asked to wait before the next request for `mailbox`."""
        now = time.monotonic()
        key = mailbox.casefold()
        until = self._mailbox_not_before.get(key, 0.0)
        if until and until <= now:
            del self._mailbox_not_before[key]  # memory follows activity
        return max(until, self._server_not_before) - now

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the provider's threads."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RuntimeError:
            if self._closed:  # the pool was shut down meanwhile
                raise ProviderError(PROVIDER_ERROR, "the provider was closed",
                                    retriable=True) from None
            raise

    async def _wait_until_allowed(self, mailbox: str, deadline: float) -> None:
        """Honour the server's back-off; fail with `throttled` if it outlasts `deadline`
        (loop time)."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = self._blocked_for(mailbox)
            if remaining <= 0:
                return
            if loop.time() + remaining > deadline:
                raise ProviderError(
                    THROTTLED, "Exchange asked to wait before the next request (ErrorServerBusy)",
                    retriable=True, retry_after=remaining,
                )
            await asyncio.sleep(remaining)

    async def _submit(self, kind: Kind, mailbox: str, *, event: DesiredEvent | None = None,
                      event_id: str | None = None, transaction_id: str | None = None) -> Any:
        self._check_usable()
        loop = asyncio.get_running_loop()
        op = _Op(kind, loop.create_future(), loop.time() + self.timeout, event, event_id,
                 transaction_id)
        key = mailbox.casefold()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(mailbox)
            task = loop.create_task(self._drain(key, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        queue.ops.append(op)
        return await op.future

    async def _drain(self, key: str, queue: _Queue) -> None:
        """Send the mailbox's queued operations, one bulk request at a time."""
        try:
            await asyncio.sleep(self.batch_window)
            while True:
                queue.ops = [op for op in queue.ops if not op.future.done()]
                if not queue.ops:
                    break
                await self._hold_back(queue)
                if not queue.ops:
                    continue
                kind = queue.ops[0].kind
                batch = [op for op in queue.ops if op.kind == kind][:MAX_BATCH]
                queue.ops = [op for op in queue.ops if all(op is not b for b in batch)]
                queue.sending = batch
                await self._send(queue.mailbox, kind, batch)
                queue.sending = []
        except asyncio.CancelledError:
            # a create in flight may land: the caller's retry looks for its mark first
            closing = ProviderError(PROVIDER_ERROR, "the provider was closed", retriable=True)
            for op in queue.sending + queue.ops:
                _fail(op, _copy(closing))
            raise
        except Exception as exc:
            log.exception("exchange dispatch failed", config=self.config_id)
            error = translate_error(exc, self._where(queue.mailbox))
            for op in queue.sending + queue.ops:
                _fail(op, _copy(error))
        finally:
            queue.ops.clear()
            queue.sending = []
            if self._queues.get(key) is queue:
                del self._queues[key]

    async def _hold_back(self, queue: _Queue) -> None:
        """Wait out the server's back-off; operations that cannot wait that long fail."""
        loop = asyncio.get_running_loop()
        remaining = self._blocked_for(queue.mailbox)
        if remaining <= 0:
            return
        until = loop.time() + remaining
        for op in queue.ops:
            if op.deadline < until:
                _fail(op, ProviderError(
                    THROTTLED, "Exchange asked to wait before the next request (ErrorServerBusy)",
                    retriable=True, retry_after=remaining,
                ))
        queue.ops = [op for op in queue.ops if not op.future.done()]
        if queue.ops:
            await asyncio.sleep(remaining)

    async def _send(self, mailbox: str, kind: Kind, batch: list[_Op]) -> None:
        where = self._where(mailbox)
        results: list[Any]
        try:
            results = await self._run(
                self._bulk_blocking, mailbox, kind, [(op.event, op.event_id) for op in batch]
            )
        except Exception as exc:  # noqa: BLE001 - the whole request failed: each item shares it
            results = [exc] * len(batch)
        in_doubt: list[tuple[_Op, ProviderError]] = []
        for op, result in zip(batch, results, strict=True):
            if not isinstance(result, BaseException):
                self._succeeded(op, result)
                continue
            error = self._failed(translate_error(result, where), mailbox)
            if kind == "create" and outcome_unknown(result):
                in_doubt.append((op, error))
            elif isinstance(error, EventGone) and kind == "delete":
                _resolve(op, False)
            elif isinstance(error, EventGone) and kind == "create":
                _fail(op, ProviderError(PROVIDER_ERROR, error.message, retriable=True))
            else:
                _fail(op, error)
        if in_doubt:
            await self._resolve_in_doubt(mailbox, in_doubt)

    def _succeeded(self, op: _Op, result: Any) -> None:
        if op.kind == "create":
            event_id = str(result)
            self._remember(op, event_id)
            _resolve(op, event_id)
        elif op.kind == "update":
            _resolve(op, str(result or op.event_id))
        else:
            _resolve(op, True)

    def _remember(self, op: _Op, event_id: str) -> None:
        if op.transaction_id is None:
            return
        self._transactions[op.transaction_id] = event_id
        self._transactions.move_to_end(op.transaction_id)
        while len(self._transactions) > _TRANSACTIONS_KEPT:
            self._transactions.popitem(last=False)

    async def _resolve_in_doubt(self, mailbox: str, in_doubt: list[tuple[_Op, ProviderError]]
                                ) -> None:
        """Creates that may have been stored: look for their marks before any retry."""
        marks = [op.event.mark.value for op, _ in in_doubt if op.event is not None]
        try:
            found: dict[str, list[str]] | None = await self._run(
                self._find_blocking, mailbox, marks
            )
        except Exception:  # noqa: BLE001 - unresolved: the caller retries, the dispatcher adopts
            found = None
        extras: list[str] = []
        for op, error in in_doubt:
            ids = found.get(op.event.mark.value, []) if found and op.event else []
            if not ids:
                _fail(op, error)
                continue
            log.info("create outcome resolved by its mark", config=self.config_id,
                     found=len(ids))
            self._remember(op, ids[0])
            _resolve(op, ids[0])
            extras.extend(ids[1:])
        if extras:  # one item per mark: drop doubles a crash may have left
            with contextlib.suppress(Exception):
                await self._run(self._bulk_blocking, mailbox, "delete",
                                [(None, extra) for extra in extras])

    # ------------------------------------------------------------------ threads

    def _account(self, mailbox: str) -> Account:
        """The impersonated account for `mailbox` (kept, so what exchangelib learns per
        mailbox, such as the backend version, survives between calls)."""
        key = mailbox.casefold()
        with self._lock:
            account = self._accounts.get(key)
            if account is not None:
                self._accounts.move_to_end(key)
                return account
        account = Account(
            primary_smtp_address=mailbox, config=self._config, autodiscover=False,
            access_type=IMPERSONATION, default_timezone=UTC, locale="en_US",
        )
        with self._lock:
            self._accounts[key] = account
            while len(self._accounts) > _ACCOUNTS_KEPT:
                self._accounts.popitem(last=False)
        return account

    def _choose_auth(self) -> None:
        """Without `auth` in the configuration: NTLM, unless the server's 401 does not
        offer it (one unauthenticated request, before the first session)."""
        with self._lock:
            if self._auth_chosen:
                return
            with self._protocol.raw_session(self.url) as session:
                response = session.post(self.url, data=b"", allow_redirects=False,
                                        timeout=self.timeout)
                response.close()
            offered = response.headers.get("WWW-Authenticate", "").lower()
            # NTLM needs the server to offer it; a 401 that does not cannot be NTLM
            if response.status_code == 401 and "ntlm" not in offered and (
                "negotiate" not in offered
            ):
                self._config.auth_type = BASIC
            self._auth_chosen = True
        log.info("exchange authentication", config=self.config_id, host=self._host,
                 auth=self._config.auth_type)

    def _server_version(self) -> None:
        """Probe the server's version once (exchangelib caches it on the protocol)."""
        self._choose_auth()
        try:
            version: Version = self._protocol.version
        except TransportError as exc:
            if not str(exc).startswith("No valid version headers") or any(
                isinstance(e, ErrorServerBusy | UnauthorizedError | HttpStatusError)
                for e in _chain(exc)
            ):
                raise
            # the server answers the probe but reports no version: assume an old one
            # and learn the real one from the next answer (`_with_account`)
            with self._lock:
                if not self._config.version or not self._config.version.build:
                    self._config.version = _PROVISIONAL_VERSION.copy()
                    self._provisional = True
            return
        self._note_version(version)

    def _note_version(self, version: Version | None) -> None:
        if version is None or version.build is None or version.build == _PROVISIONAL_VERSION.build:
            return
        with self._lock:
            seen = self._version_seen
            if seen is not None and seen.build == version.build and (
                seen.api_version == version.api_version
            ):
                return
            self._version_seen = version
            if self._config.version is None or self._config.version.build != version.build:
                self._config.version = version.copy()
            warning = out_of_support_warning(version)
            changed = warning != self._version_warning
            self._version_warning = warning
        if warning and changed:
            log.warning("exchange server out of support", config=self.config_id,
                        host=self._host, build=str(version.build), warning=warning)

    def _with_account(self, mailbox: str, work: Callable[[Account, Calendar], T]) -> T:
        self._server_version()
        try:
            account = self._account(mailbox)
        except ValueError as exc:  # not an e-mail address
            raise ErrorInvalidSmtpAddress(str(exc)) from exc
        calendar = Calendar(
            root=Root(account=account),
            _distinguished_id=DistinguishedFolderId(
                id=Calendar.DISTINGUISHED_FOLDER_ID, mailbox=Mailbox(email_address=mailbox)
            ),
        )
        if self._provisional:
            # one FindItem: its answer's ServerVersionInfo is the server's version
            for _ in FolderCollection(account=account, folders=[calendar]).find_items(
                Q(), shape=ID_ONLY, depth=SHALLOW, max_items=1, page_size=1
            ):
                pass
            self._provisional = False
            learned = account.version
            if learned.build is not None and learned.build != _PROVISIONAL_VERSION.build:
                with contextlib.suppress(ValueError):  # the newest API that build speaks
                    learned = Version(build=learned.build)
                account.version = learned
                self._note_version(learned)
        try:
            return work(account, calendar)
        finally:
            self._note_version(account.version)

    def _bulk_blocking(self, mailbox: str, kind: Kind,
                       items: Sequence[tuple[DesiredEvent | None, str | None]]) -> list[Any]:
        """One bulk EWS request; a result or an exception per item, in order."""

        def work(account: Account, calendar: Calendar) -> list[Any]:
            if kind == "create":
                created = _CreateItems(account=account, chunk_size=MAX_BATCH).call(
                    items=[calendar_item(e, account, calendar) for e, _ in items if e],
                    folder=calendar, message_disposition=SAVE_ONLY,
                    send_meeting_invitations=SEND_TO_NONE,
                )
                return [r if isinstance(r, BaseException) else r.id for r in created]
            if kind == "update":
                changes = [
                    (calendar_item(e, account, calendar, item_id=i), _UPDATED_FIELDS)
                    for e, i in items if e and i
                ]
                updated = _UpdateItems(account=account, chunk_size=MAX_BATCH).call(
                    items=changes, conflict_resolution=ALWAYS_OVERWRITE,
                    message_disposition=SAVE_ONLY,
                    send_meeting_invitations_or_cancellations=SEND_TO_NONE,
                    suppress_read_receipts=True,
                )
                return [r if isinstance(r, BaseException) else r[0] for r in updated]
            deleted = _DeleteItems(account=account, chunk_size=MAX_BATCH).call(
                items=[ItemId(i) for _, i in items if i], delete_type=HARD_DELETE,
                send_meeting_cancellations=SEND_TO_NONE,
                affected_task_occurrences=ALL_OCCURRENCES, suppress_read_receipts=True,
            )
            return list(deleted)

        results = self._with_account(mailbox, work)
        if len(results) != len(items):
            raise TransportError(f"EWS returned {len(results)} results for {len(items)} items")
        return results

    def _find_blocking(self, mailbox: str, marks: Iterable[str]) -> dict[str, list[str]]:
        """Ids of the calendar items carrying each of `marks` (a FindItem per mark,
        matched by the server: the mark's value is never read back)."""
        wanted = list(dict.fromkeys(marks))

        def work(account: Account, calendar: Calendar) -> dict[str, list[str]]:
            folders = FolderCollection(account=account, folders=[calendar])
            found: dict[str, list[str]] = {}
            for mark in wanted:
                for item in folders.find_items(Q(**{MARK_FIELD: mark}), shape=ID_ONLY,
                                               depth=SHALLOW):
                    if isinstance(item, BaseException):
                        raise item
                    item_id, _changekey = item
                    if item_id:
                        found.setdefault(mark, []).append(str(item_id))
            return found

        return self._with_account(mailbox, work)


_OOF_STATE = {"disabled": "Disabled", "scheduled": "Scheduled", "always": "Enabled"}
_OOF_AUDIENCE = {"none": "None", "known": "Known", "all": "All"}


def oof_settings(setting: ReplySetting) -> OofSettings:
    """EWS `OofSettings` for `setting`: a schedule in UTC (some servers take nothing
    else); both messages always present (EWS requires them when enabled)."""
    start = end = None
    if setting.status == "scheduled":
        assert setting.start is not None and setting.end is not None
        start = EWSDateTime.from_datetime(setting.start.astimezone(dt.UTC)).astimezone(UTC)
        end = EWSDateTime.from_datetime(setting.end.astimezone(dt.UTC)).astimezone(UTC)
    return OofSettings(
        state=_OOF_STATE[setting.status], external_audience=_OOF_AUDIENCE[setting.audience],
        start=start, end=end, internal_reply=setting.internal or " ",
        external_reply=setting.external or setting.internal or " ",
    )


def oof_reply(held: OofSettings | None) -> ReplySetting:
    """Our reading of the `OofSettings` Exchange returned."""
    if held is None:
        return ReplySetting("disabled")
    state = {v: k for k, v in _OOF_STATE.items()}.get(str(held.state), "disabled")
    audience = {v: k for k, v in _OOF_AUDIENCE.items()}.get(str(held.external_audience), "all")

    def instant(value: Any) -> dt.datetime | None:
        if value is None:
            return None
        moment = dt.datetime.fromisoformat(value.isoformat())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return moment.astimezone(dt.UTC)

    return ReplySetting(
        state,  # type: ignore[arg-type]
        instant(held.start), instant(held.end),
        str(held.internal_reply or ""), str(held.external_reply or ""),
        audience,  # type: ignore[arg-type]
    )


def _resolve(op: _Op, value: Any) -> None:
    if not op.future.done():
        op.future.set_result(value)


def _fail(op: _Op, error: BaseException) -> None:
    if not op.future.done():
        op.future.set_exception(error)


__all__ = [
    "MARK_PROPERTY_NAME",
    "MARK_PROPERTY_SET",
    "ExchangeProvider",
    "HttpStatusError",
    "calendar_item",
    "legacy_free_busy",
    "out_of_support_warning",
    "outcome_unknown",
    "translate_error",
]
