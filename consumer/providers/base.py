"""The provider boundary (docs/guarantees.md,
'Permanent failures and error codes'): the interface, the error
vocabulary, and the one HTTP layer every HTTP provider builds on.

Every calendar provider implements `Provider`; every failure leaves a
provider as a `ProviderError` carrying a stable `code` (`ErrorCode`), a
human `hint`, a `retriable` flag and an optional `retry_after` (seconds)
from the server. What an HTTP provider needs is here, once:

* `https_session`: an aiohttp session with verified TLS (system store plus
  ABSENCE_SYNC_CA_BUNDLE), the request timeout, and no proxy or CA bundle
  taken from the environment;
* `Reply`: a response (or a batch sub-response) as providers read it;
* `transport_error`: the one mapping of transport failures (TLS, timeouts,
  connection errors) to the vocabulary; anything it does not know is a bug
  of ours and stays the exception it is, never a retriable provider error;
* `status_error`: the one status ladder (401 auth, 403 access, 429 and 503
  with Retry-After throttled, 5xx and 408 retriable, 400/413/415/422 invalid
  event, 3xx a redirect to configure), with a hook for a vendor's own
  error codes and hints;
* `Batcher`: operations issued together go out in one request of up to N
  (Graph `$batch`, Google's batch endpoint).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import enum
import json
import math
import ssl
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import aiohttp
from yarl import URL

from consumer.logs import redact_text

if TYPE_CHECKING:
    from consumer.config import SyncConfig
    from consumer.render import DesiredEvent, Mark
    from consumer.replies import ReplySetting
    from consumer.settings import Settings



class ErrorCode(enum.StrEnum):
    """The stable error codes (public: stored, shown by the API, used as metric labels)."""

    MAILBOX_NOT_FOUND = "mailbox_not_found"
    ACCESS_DENIED = "access_denied"
    AUTH_FAILED = "auth_failed"
    CONSENT_MISSING = "consent_missing"
    THROTTLED = "throttled"
    SERVER_UNREACHABLE = "server_unreachable"
    TLS_UNTRUSTED_CERTIFICATE = "tls_untrusted_certificate"
    INVALID_EVENT = "invalid_event"
    PROVIDER_ERROR = "provider_error"


MAILBOX_NOT_FOUND = ErrorCode.MAILBOX_NOT_FOUND
ACCESS_DENIED = ErrorCode.ACCESS_DENIED
AUTH_FAILED = ErrorCode.AUTH_FAILED
CONSENT_MISSING = ErrorCode.CONSENT_MISSING
THROTTLED = ErrorCode.THROTTLED
SERVER_UNREACHABLE = ErrorCode.SERVER_UNREACHABLE
TLS_UNTRUSTED_CERTIFICATE = ErrorCode.TLS_UNTRUSTED_CERTIFICATE
INVALID_EVENT = ErrorCode.INVALID_EVENT
PROVIDER_ERROR = ErrorCode.PROVIDER_ERROR

ERROR_CODES: tuple[str, ...] = tuple(code.value for code in ErrorCode)

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
        code: ErrorCode | str,
        message: str,
        *,
        retriable: bool,
        retry_after: float | None = None,
        hint: str | None = None,
    ) -> None:
        # stored and shown by the monitoring API, not only logged: no credential a
        # server echoed back (error bodies may quote the request) goes further
        message = redact_text(message)
        code = ErrorCode(code)
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
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


# --------------------------------------------------------------------------- HTTP


def https_session(
    context: ProviderContext,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = None,
    connections: int = 100,
) -> aiohttp.ClientSession:
    """The HTTP session of an HTTP provider: TLS verified with `context`'s SSL
    context (system store plus ABSENCE_SYNC_CA_BUNDLE), every request bounded by
    `timeout` (default: the request timeout setting), at most `connections`
    connections, and nothing from the environment (no proxy, no CA bundle, no
    .netrc): a calendar server is reached directly or not at all."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context.ssl_context, limit=connections),
        timeout=aiohttp.ClientTimeout(
            total=timeout if timeout is not None else context.settings.request_timeout_seconds
        ),
        headers=dict(headers or {}),
        trust_env=False,
    )


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP response, or one sub-response of a batch. Header names are lower
    case; `body` is the bytes received, or a sub-response's parsed JSON."""

    status: int
    headers: Mapping[str, str]
    body: Any = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))

    @property
    def text(self) -> str:
        """The start of the body as one line, for messages (never all of it)."""
        body = self.body
        raw = body[:300].decode("utf-8", "replace") if isinstance(body, bytes) else (
            body if isinstance(body, str) else ""
        )
        return " ".join(raw.split())[:200]


def parse_body(raw: bytes) -> Any:
    """A response body as JSON, else as text (an HTML error page); None when empty."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


async def bearer_json(
    session: aiohttp.ClientSession, method: str, url: URL, body: dict[str, Any] | None,
    token: str,
) -> tuple[int, dict[str, str], Any]:
    """One request of a JSON API with a bearer token (Graph, Google): the status, the
    headers (names in lower case) and the body as `parse_body` reads it."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    data: bytes | None = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    async with session.request(method, url, data=data, headers=headers) as response:
        raw = await response.read()
        return (response.status, {k.lower(): v for k, v in response.headers.items()},
                parse_body(raw))


async def read_reply(response: aiohttp.ClientResponse) -> Reply:
    return Reply(response.status, {k.lower(): v for k, v in response.headers.items()},
                 await response.read())


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def certificate_problem(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a failed certificate verification."""
    for item in _chain(exc):
        if isinstance(item, ssl.SSLCertVerificationError | aiohttp.ClientConnectorCertificateError):
            return True
        text = str(item)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            return True
    return False


def transport_error(
    exc: BaseException, *, where: str, timeout: float | None = None
) -> ProviderError | None:
    """The one mapping of transport failures (aiohttp, requests, sockets, TLS) to
    the vocabulary; `where` names the request (method and URL without
    credentials). None for anything else: a bug of ours, which the caller lets
    go as it is."""
    import requests

    if isinstance(exc, ProviderError):
        return exc
    if certificate_problem(exc):
        return ProviderError(TLS_UNTRUSTED_CERTIFICATE, f"{where}: {_short(exc)}",
                             retriable=False)
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return ProviderError(
            SERVER_UNREACHABLE, f"{where}: TLS handshake failed: {_short(exc)}", retriable=True,
            hint="Check that the URL's host and port serve HTTPS; retried automatically.",
        )
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError | requests.Timeout):
        limit = f" after {timeout:g} s" if timeout else ""
        return ProviderError(SERVER_UNREACHABLE, f"{where}: timed out{limit}", retriable=True)
    if isinstance(exc, aiohttp.InvalidURL):
        return ProviderError(PROVIDER_ERROR, f"{where}: invalid URL: {_short(exc)}",
                             retriable=False, hint="Check the configuration's server URL.")
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return ProviderError(PROVIDER_ERROR, f"{where}: malformed response: {_short(exc)}",
                             retriable=True)
    if isinstance(exc, aiohttp.ClientError | OSError | requests.RequestException):
        return ProviderError(SERVER_UNREACHABLE, f"{where}: {type(exc).__name__}: {_short(exc)}",
                             retriable=True)
    return None


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


#: A vendor's reading of a failed reply (its error codes, its hints), consulted
#: by `status_error` before the default ladder; None leaves the reply to it.
StatusHook = Callable[[Reply, str], "ProviderError | None"]


def status_error(reply: Reply, message: str, vendor: StatusHook | None = None) -> ProviderError:
    """The one status ladder: a failed `reply` in the error vocabulary. `message`
    says what failed (request, status, the start of the body).

    429, and 503 with Retry-After, are `throttled` whatever the vendor; then
    the vendor hook; then 401 auth, 403 access, 408 and 5xx retriable (with
    the server's Retry-After), 400/413/415/422 invalid event, 3xx a redirect
    to put in the configuration, anything else a permanent provider error."""
    status, retry_after = reply.status, reply.retry_after
    if status == 429 or (status == 503 and retry_after is not None):
        return ProviderError(THROTTLED, message, retriable=True, retry_after=retry_after)
    if vendor is not None:
        answer = vendor(reply, message)
        if answer is not None:
            return answer
    if status == 401:
        return ProviderError(AUTH_FAILED, message, retriable=False)
    if status == 403:
        return ProviderError(ACCESS_DENIED, message, retriable=False)
    if status == 408 or status >= 500:
        return ProviderError(PROVIDER_ERROR, message, retriable=True, retry_after=retry_after)
    if status in (400, 413, 415, 422):
        return ProviderError(INVALID_EVENT, message, retriable=False)
    if 300 <= status < 400:
        location = reply.headers.get("location", "another address")
        return ProviderError(
            PROVIDER_ERROR, message, retriable=False,
            hint=f"The server redirects to {location}: put the final address in the "
            "configuration.",
        )
    return ProviderError(PROVIDER_ERROR, message, retriable=False)


Q = TypeVar("Q")
R = TypeVar("R")


class Batcher(Generic[Q, R]):
    """Requests issued together go out together: whatever is queued after `window`
    seconds (or at once when `size` are queued) is handed to `send` in groups of
    up to `size`, each in its own task. `send(group)` returns one result (or
    exception) per request, in order; a request whose caller gave up meanwhile
    is dropped before sending (`on_drop` is told). A lone request may be sent
    on its own by `send` (a batch of one)."""

    def __init__(
        self,
        send: Callable[[list[Q]], Awaitable[list[R | BaseException]]],
        *,
        size: int,
        window: float,
        on_drop: Callable[[Q], None] | None = None,
    ) -> None:
        self._send = send
        self.size = size
        self.window = window
        self._on_drop = on_drop
        self._queue: list[tuple[Q, asyncio.Future[R]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._senders: set[asyncio.Task[None]] = set()

    def submit(self, request: Q) -> asyncio.Future[R]:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        if len(self._queue) >= self.size:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window, self.flush)
        return future

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            group: list[tuple[Q, asyncio.Future[R]]] = []
            while self._queue and len(group) < self.size:
                request, future = self._queue.pop(0)
                if future.done():  # the caller gave up while it was queued
                    if self._on_drop is not None:
                        self._on_drop(request)
                else:
                    group.append((request, future))
            if group:
                task = asyncio.get_running_loop().create_task(self._deliver(group))
                self._senders.add(task)
                task.add_done_callback(self._senders.discard)

    async def _deliver(self, group: list[tuple[Q, asyncio.Future[R]]]) -> None:
        try:
            results = await self._send([request for request, _ in group])
        except BaseException as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else ProviderError(
                        PROVIDER_ERROR, "the request was cancelled", retriable=True))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(group, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def close(self, error: ProviderError) -> None:
        """Fail what is queued with `error` and cancel what is being sent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queued, self._queue = self._queue, []
        for request, future in queued:
            if not future.done():
                future.set_exception(error)
            if self._on_drop is not None:
                self._on_drop(request)
        for task in list(self._senders):
            task.cancel()
        if self._senders:
            await asyncio.gather(*self._senders, return_exceptions=True)


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

    # Automatic replies (`auto_reply:`): a provider that can set a mailbox's
    # out-of-office reply says so with `supports_replies` and implements both.

    #: whether the provider can read and write a mailbox's automatic reply
    supports_replies: ClassVar[bool] = False
    #: its reply messages are HTML (placeholder values are escaped), else plain text
    reply_html: ClassVar[bool] = True
    #: its reply keeps a subject (Gmail)
    reply_subject: ClassVar[bool] = False

    def reply_form(self, setting: ReplySetting) -> ReplySetting:
        """`setting` as this provider stores it (Gmail keeps one message), so what we
        want compares with what we read."""
        return setting

    async def read_reply(self, mailbox: str) -> ReplySetting:
        """The automatic reply `mailbox` holds now."""
        raise ProviderError(PROVIDER_ERROR, f"{self.kind} cannot set automatic replies",
                            retriable=False)

    async def write_reply(self, mailbox: str, setting: ReplySetting) -> ReplySetting:
        """Set `mailbox`'s automatic reply to `setting` (`disabled`: switch it off,
        keeping its messages) and return what the server holds right after,
        read back (servers rewrite messages: this is what "ours" compares)."""
        raise ProviderError(PROVIDER_ERROR, f"{self.kind} cannot set automatic replies",
                            retriable=False)

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
