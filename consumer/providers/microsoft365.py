"""Microsoft 365 calendars through Microsoft Graph, app-only (docs/microsoft365.md).

One `Microsoft365Provider` per sync configuration, that is per customer
directory (tenant). What callers may rely on:

* Tokens come from MSAL's client-credentials flow against the configured
  authority host only: no instance discovery, no region detection, no proxy
  from the environment, so sovereign clouds and closed networks work. The
  token is cached until shortly before expiry; acquisition (MSAL is
  blocking) runs on one dedicated thread and is serialised, so a burst of
  calls fetches one token.
* At most `MAILBOX_CONCURRENCY` (4) requests are in flight per mailbox,
  counting every sub-request of a `$batch`, whichever provider sends them:
  Graph limits the (one, vendor) application per mailbox, so the mailbox
  slots and the Retry-After memory are shared by every provider of the
  process (two configurations writing into one mailbox; a provider rebuilt
  after a configuration change, which must still honour a Retry-After its
  predecessor received). An operation takes its mailbox's slot before it
  is queued and gives it back only when the HTTP exchange that carried it
  is over (even if the caller was cancelled meanwhile). Graph runs the
  sub-requests of a batch in parallel, so bounding what is queued per
  mailbox is what bounds the mailbox; batches carry no `dependsOn` chains
  (which would also fail every later step with 424 after one error).
* Operations issued together are coalesced into `POST /$batch` requests of
  up to 20 (whatever is queued after `BATCH_WINDOW` seconds, or at once when
  20 are queued); a lone operation is sent unbatched. Every sub-response is
  translated on its own, by the same function as a plain response.
* After a 429 or 503 carrying Retry-After, nothing more is sent to that
  mailbox before the delay has elapsed (and nothing to the whole tenant when
  the throttling is not mailbox-specific). The operation that got the 429
  fails with `throttled` and the server's `retry_after`; later operations
  wait when the wait fits in the request timeout, else fail with
  `throttled` and the remaining delay.
* Every failure leaves through `translate_error`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import re
import ssl
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlencode, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
import requests
from yarl import URL

from consumer.providers.base import (
    ACCESS_DENIED,
    AUTH_FAILED,
    CONSENT_MISSING,
    INVALID_EVENT,
    MAILBOX_NOT_FOUND,
    PROVIDER_ERROR,
    THROTTLED,
    Batcher,
    EventGone,
    Provider,
    ProviderContext,
    ProviderError,
    Reply,
    bearer_json,
    https_session,
    parse_retry_after,
    status_error,
    transport_error,
)

__all__ = ["Microsoft365Provider", "consent_url", "graph_scope", "graph_transaction_id",
           "parse_retry_after", "translate_error"]

from consumer.replies import ReplySetting

if TYPE_CHECKING:
    from consumer.config import SyncConfig
    from consumer.render import DesiredEvent, Mark
    from consumer.settings import Settings

MAILBOX_CONCURRENCY = 4
MAX_BATCH = 20
BATCH_WINDOW = 0.002
MARK_PROPERTY_SET = "e56dfbda-e178-4d85-a796-ee6de8a4c115"
MARK_PROPERTY_ID = f"String {{{MARK_PROPERTY_SET}}} Name absenceSyncMark"
_TRANSACTION_NAMESPACE = uuid.UUID("92d5ba32-7ec5-4a51-908a-a287057890ca")
_TOKEN_MARGIN = 300.0
_FAILURE_MEMORY = 10.0
_TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,253}$")
_AADSTS = re.compile(r"AADSTS(\d+)")

_MAILBOX_MISSING_CODES = frozenset({
    "ErrorInvalidUser", "MailboxNotEnabledForRESTAPI", "ResourceNotFound",
    "ErrorNonExistentMailbox", "MailboxNotFound",
})
_ITEM_GONE_CODES = frozenset({"ErrorItemNotFound", "ErrorInvalidIdMalformed"})
_MAILBOX_THROTTLE_CODES = frozenset({"ApplicationThrottled", "MailboxConcurrency"})
# AADSTS codes meaning "this directory has not (or no longer) let the application in".
_CONSENT_AADSTS = frozenset({700016, 65001, 90002, 500011, 7000229, 7000112})

_HINT_MAILBOX = (
    "The employee's address in the HR system may differ from the mailbox: the address "
    "must be an Exchange Online mailbox of this directory (not on-premises, not "
    "unlicensed). Set calendar_address in the HR system when it differs."
)
_HINT_ACCESS = (
    "The application may not write to this mailbox: check that admin consent granted "
    "Calendars.ReadWrite (and MailboxSettings.ReadWrite for automatic replies), and that "
    "the application's mailbox scope (RBAC for Applications in Exchange Online, or an "
    "application access policy) includes it."
)
_HINT_CLIENT = (
    "The vendor application's credentials were rejected: check ABSENCE_SYNC_MS_CLIENT_ID "
    "and the secret (ABSENCE_SYNC_MS_CLIENT_SECRET) or certificate "
    "(ABSENCE_SYNC_MS_CLIENT_CERT_FILE); they may have expired."
)


def _consent_hint(config_id: str) -> str:
    return (
        "An administrator of the customer's Microsoft 365 directory must grant consent: "
        f"run `absence-sync consent-url {config_id}` and have them open the link."
    )


# --------------------------------------------------------------------------- helpers


def graph_scope(graph_url: str) -> str:
    """The `.default` scope of the Graph instance at `graph_url` (national clouds differ)."""
    parts = urlsplit(graph_url)
    return f"{parts.scheme}://{parts.netloc}/.default"


def graph_transaction_id(transaction_id: str) -> str:
    """Graph's `transactionId` for an engine transaction id: deterministic, 36 chars."""
    return str(uuid.uuid5(_TRANSACTION_NAMESPACE, transaction_id))


def _odata_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def mark_filter(mark: Mark, value: str | None = None) -> str:
    """The OData filter selecting events that carry `mark` (rule 5.7), in its
    current form or, given as `value`, another of `mark.values`."""
    return (
        "singleValueExtendedProperties/Any(ep: ep/id eq "
        f"{_odata_quote(MARK_PROPERTY_ID)} and ep/value eq "
        f"{_odata_quote(mark.value if value is None else value)})"
    )


def event_payload(event: DesiredEvent) -> dict[str, Any]:
    """The Graph event body for `event`: quiet (rule 5.6) and marked (rule 5.7)."""

    def when(moment: dt.datetime) -> dict[str, str]:
        return {"dateTime": moment.strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": event.time_zone}

    return {
        "subject": event.subject,
        "showAs": event.show_as,
        "isAllDay": event.all_day,
        "start": when(event.start),
        "end": when(event.end),
        "sensitivity": "private" if event.private else "normal",
        "categories": [event.category] if event.category else [],
        "isReminderOn": False,
        "responseRequested": False,
        "body": {"contentType": "text", "content": ""},
        "attendees": [],
        "singleValueExtendedProperties": [{"id": MARK_PROPERTY_ID, "value": event.mark.value}],
    }


_REPLY_STATUS = {"disabled": "disabled", "scheduled": "scheduled", "always": "alwaysEnabled"}
_REPLY_AUDIENCE = {"none": "none", "known": "contactsOnly", "all": "all"}


def reply_payload(setting: ReplySetting) -> dict[str, Any]:
    """The `automaticRepliesSetting` Graph gets for `setting`: its schedule as
    dateTimeTimeZone in the employee's zone (`setting.zone`); disabling sends the
    status alone, so the messages stay as they were."""
    body: dict[str, Any] = {"status": _REPLY_STATUS[setting.status]}
    if setting.status == "disabled":
        return body
    body["externalAudience"] = _REPLY_AUDIENCE[setting.audience]
    body["internalReplyMessage"] = setting.internal
    body["externalReplyMessage"] = setting.external
    if setting.status == "scheduled":
        assert setting.start is not None and setting.end is not None
        zone_name = setting.zone or "UTC"
        zone = ZoneInfo(zone_name)

        def when(moment: dt.datetime) -> dict[str, str]:
            local = moment.astimezone(zone)
            return {"dateTime": local.strftime("%Y-%m-%dT%H:%M:%S"), "timeZone": zone_name}

        body["scheduledStartDateTime"] = when(setting.start)
        body["scheduledEndDateTime"] = when(setting.end)
    return body


def _instant(value: Any) -> dt.datetime | None:
    """An aware UTC datetime from a Graph dateTimeTimeZone (None if unreadable)."""
    if not isinstance(value, dict) or not value.get("dateTime"):
        return None
    text = str(value["dateTime"])[:26]
    try:
        moment = dt.datetime.fromisoformat(text.rstrip("Z"))
    except ValueError:
        return None
    name = str(value.get("timeZone") or "UTC")
    try:
        zone: dt.tzinfo = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        zone = dt.UTC
    return moment.replace(tzinfo=zone).astimezone(dt.UTC)


def reply_setting(body: Any) -> ReplySetting:
    """Our reading of Graph's `automaticRepliesSetting`."""
    data = body if isinstance(body, dict) else {}
    status = {v: k for k, v in _REPLY_STATUS.items()}.get(str(data.get("status")), "disabled")
    audience = {v: k for k, v in _REPLY_AUDIENCE.items()}.get(
        str(data.get("externalAudience")), "none")
    return ReplySetting(
        status,  # type: ignore[arg-type]
        _instant(data.get("scheduledStartDateTime")),
        _instant(data.get("scheduledEndDateTime")),
        str(data.get("internalReplyMessage") or ""),
        str(data.get("externalReplyMessage") or ""),
        audience,  # type: ignore[arg-type]
    )


def _user_path(mailbox: str) -> str:
    return "/users/" + quote(mailbox, safe="@")


def consent_url(settings: Settings, config_id: str, state: str, redirect_uri: str) -> str:
    """The admin-consent link a customer's administrator opens for configuration `config_id`.

    Uses the Microsoft identity platform v2 endpoint with `organizations`, so the
    administrator of any work directory can answer; the redirect then reports the
    granted directory in its `tenant` parameter (with `admin_consent=True` and
    `state`), or `error`/`error_description` when refused.
    """
    if not settings.ms_client_id:
        raise ProviderError(
            AUTH_FAILED,
            f"cannot build the consent URL for {config_id}: no application (client) id",
            retriable=False,
            hint="Set ABSENCE_SYNC_MS_CLIENT_ID to the vendor application's client id.",
        )
    query = urlencode(
        {
            "client_id": settings.ms_client_id,
            "scope": graph_scope(settings.ms_graph_url),
            "redirect_uri": redirect_uri,
            "state": state,
        },
        quote_via=quote,
    )
    return f"{settings.ms_authority_host}/organizations/v2.0/adminconsent?{query}"


async def confirm_consent(settings: Settings, ssl_context: ssl.SSLContext, directory: str,
                          config_id: str, *, delays: tuple[float, ...] = (1, 2, 4, 8)) -> None:
    """Succeed only when the vendor application obtains a token for `directory`,
    which proves its administrator granted consent; raise the `ProviderError`
    otherwise. Right after consent the login service may still answer "not
    consented" for a few seconds (replication), so that answer is retried after
    each of `delays`; any other failure is final at once."""
    for delay in (*delays, None):
        provider = Microsoft365Provider(settings, directory, config_id=config_id,
                                        ssl_context=ssl_context)
        try:
            await provider.check_access()
            return
        except ProviderError as exc:
            if exc.code != CONSENT_MISSING or delay is None:
                raise
        finally:
            await provider.close()
        await asyncio.sleep(delay)


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class GraphReply(Reply):
    """A Graph response or `$batch` sub-response (the boundary's `Reply`), its body
    parsed, with the token it was sent with."""

    token: str = ""

    @property
    def error_code(self) -> str:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return str(error.get("code", "")) if isinstance(error, dict) else ""

    @property
    def error_message(self) -> str:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, dict):
            return str(error.get("message", ""))[:500]
        return self.body[:200] if isinstance(self.body, str) else ""


@dataclass(frozen=True, slots=True)
class TokenFailure:
    """An error answer of the token (or discovery) endpoint, as MSAL returns it."""

    error: str
    description: str = ""
    codes: tuple[int, ...] = ()

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> TokenFailure:
        description = str(result.get("error_description", ""))
        raw_codes = result.get("error_codes") or []
        codes = {int(c) for c in raw_codes if isinstance(c, int | str) and str(c).isdigit()}
        codes.update(int(c) for c in _AADSTS.findall(description))
        return cls(str(result.get("error", "")), description, tuple(sorted(codes)))


Problem = GraphReply | TokenFailure | BaseException


def translate_error(problem: Problem, *, mailbox: str | None = None,
                    config_id: str = "CONFIG_ID") -> ProviderError:
    """The one place where Graph, login and transport failures become `ProviderError`s:
    Graph replies through the boundary's status ladder with Graph's codes as its
    vendor hook, transport failures through the boundary's mapping. An exception
    the boundary does not know (a bug of ours) is raised as it is."""
    if isinstance(problem, GraphReply):
        return _graph_error(problem, mailbox, config_id)
    if isinstance(problem, TokenFailure):
        return _token_error(problem, config_id)
    error = transport_error(problem, where="Microsoft Graph")
    if error is None:
        raise problem
    return error


def _graph_error(reply: GraphReply, mailbox: str | None, config_id: str) -> ProviderError:
    status, code = reply.status, reply.error_code
    detail = f"HTTP {status} {code}: {reply.error_message}".rstrip(": ")
    if mailbox:
        detail = f"{mailbox}: {detail}"

    def graph_codes(reply: Reply, message: str) -> ProviderError | None:
        if code in _ITEM_GONE_CODES:
            return EventGone(message)
        if code in _MAILBOX_MISSING_CODES:
            # the monitoring view shows the hint per absence: name the address that failed
            hint = f"Microsoft Graph found no usable mailbox at {mailbox}. " if mailbox else ""
            return ProviderError(MAILBOX_NOT_FOUND, message, retriable=False,
                                 hint=hint + _HINT_MAILBOX)
        if status == 401:
            return ProviderError(
                AUTH_FAILED, message, retriable=False,
                hint="Microsoft Graph rejected a fresh access token: " + _HINT_CLIENT,
            )
        if status == 403:
            hint = f"Writing to {mailbox} was refused. " if mailbox else ""
            return ProviderError(ACCESS_DENIED, message, retriable=False,
                                 hint=hint + _HINT_ACCESS)
        if "TimeZone" in code:
            return ProviderError(INVALID_EVENT, message, retriable=False)
        if status in (409, 412, 423):  # conflicts and locks pass
            return ProviderError(PROVIDER_ERROR, message, retriable=True,
                                 retry_after=reply.retry_after)
        if status == 415:
            return ProviderError(PROVIDER_ERROR, message, retriable=False)
        return None

    return status_error(reply, detail, graph_codes)


def _token_error(failure: TokenFailure, config_id: str) -> ProviderError:
    error, codes = failure.error, set(failure.codes)
    detail = f"token request failed: {error}: {failure.description[:300]}".rstrip(": ")
    if codes & _CONSENT_AADSTS or error in ("unauthorized_client", "invalid_tenant"):
        return ProviderError(CONSENT_MISSING, detail, retriable=False,
                             hint=_consent_hint(config_id))
    if error == "invalid_client":
        return ProviderError(AUTH_FAILED, detail, retriable=False, hint=_HINT_CLIENT)
    if error == "invalid_scope":
        return ProviderError(
            AUTH_FAILED, detail, retriable=False,
            hint="The Graph scope was refused: check ABSENCE_SYNC_MS_GRAPH_URL matches "
            "ABSENCE_SYNC_MS_AUTHORITY_HOST (same national cloud).",
        )
    if 53003 in codes:
        return ProviderError(
            ACCESS_DENIED, detail, retriable=False,
            hint="A Conditional Access policy of the customer's directory blocks the application.",
        )
    if error in ("temporarily_unavailable", "server_error", "http_error"):
        return ProviderError(PROVIDER_ERROR, detail, retriable=True)
    return ProviderError(AUTH_FAILED, detail, retriable=False, hint=_HINT_CLIENT)


def _token_exception(exc: Exception, config_id: str) -> ProviderError:
    """What MSAL raised while acquiring a token, in the vocabulary: its own service
    errors (an HTTP failure of the login host) as the token endpoint's answer."""
    from msal.exceptions import MsalServiceError

    if isinstance(exc, MsalServiceError):
        error = getattr(exc, "_error", None) or "http_error"
        description = getattr(exc, "_error_description", None) or str(exc)
        return _token_error(TokenFailure(str(error), str(description)), config_id)
    return translate_error(exc, config_id=config_id)


def _copy(error: ProviderError, retry_after: float | None = None) -> ProviderError:
    if isinstance(error, EventGone):
        return EventGone(error.message)
    return ProviderError(
        error.code, error.message, retriable=error.retriable,
        retry_after=error.retry_after if retry_after is None else retry_after, hint=error.hint,
    )


# --------------------------------------------------------------------------- tokens


class _TrustingAdapter(requests.adapters.HTTPAdapter):
    """Verifies TLS with the provider's SSL context (system store plus
    ABSENCE_SYNC_CA_BUNDLE), exactly like the Graph side, instead of certifi."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self._ssl_context = ssl_context
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        conn.cert_reqs = "CERT_REQUIRED"


class _TimeoutSession(requests.Session):
    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout)
        return super().request(*args, **kwargs)


def _load_certificate(path: str) -> dict[str, str]:
    """MSAL's certificate credential from one PEM file holding the key and certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    with open(path, "rb") as handle:
        data = handle.read()
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("Entra ID accepts RSA certificates only")
    certificate = x509.load_pem_x509_certificate(data)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    thumbprint = certificate.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 - x5t
    return {"private_key": key_pem, "thumbprint": thumbprint}


class _Tokens:
    """App-only Graph tokens for one directory, through MSAL, off the event loop."""

    def __init__(self, settings: Settings, tenant_id: str, config_id: str,
                 ssl_context: ssl.SSLContext) -> None:
        self.settings = settings
        self.tenant_id = tenant_id
        self.config_id = config_id
        self.scope = graph_scope(settings.ms_graph_url)
        self._ssl_context = ssl_context
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msal")
        self._app: Any = None
        self._session: requests.Session | None = None
        self._token: str | None = None
        self._valid_until = 0.0
        self._failure: tuple[float, ProviderError] | None = None
        self.acquisitions = 0

    async def get(self) -> str:
        if self._token is not None and time.monotonic() < self._valid_until:
            return self._token
        async with self._lock:
            now = time.monotonic()
            if self._token is not None and now < self._valid_until:
                return self._token
            if self._failure is not None and now < self._failure[0]:
                raise _copy(self._failure[1])
            try:
                result = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._acquire_blocking
                )
            except ProviderError as exc:
                self._remember(exc)
                raise
            except Exception as exc:
                error = _token_exception(exc, self.config_id)
                self._remember(error)
                raise error from exc
            if not isinstance(result, dict) or "access_token" not in result:
                error = translate_error(
                    TokenFailure.from_result(result if isinstance(result, dict) else {}),
                    config_id=self.config_id,
                )
                self._remember(error)
                raise error
            self._failure = None
            lifetime = float(result.get("expires_in", 3600))
            margin = _TOKEN_MARGIN if lifetime > 2 * _TOKEN_MARGIN else lifetime / 2
            self._token = str(result["access_token"])
            self._valid_until = time.monotonic() + lifetime - margin
            return self._token

    def _remember(self, error: ProviderError) -> None:
        """Answer permanent failures from memory for a few seconds, then start afresh.

        The MSAL application is dropped too: its HTTP layer caches a 400 from the
        token endpoint for a minute, which would hide a consent granted meanwhile.
        """
        if not error.retriable:
            self._failure = (time.monotonic() + _FAILURE_MEMORY, error)
            self._discard_app()

    def _discard_app(self) -> None:
        if self._session is not None:
            self._session.close()
        self._session = None
        self._app = None

    async def invalidate(self, token: str) -> None:
        """Forget `token` (Graph refused it) so the next call fetches a new one."""
        async with self._lock:
            if self._token != token:
                return
            self._token = None
            if self._app is not None:
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._app.remove_tokens_for_client
                )

    def _acquire_blocking(self) -> Any:
        if self._app is None:
            self._app = self._build_app()
        self.acquisitions += 1
        return self._app.acquire_token_for_client(scopes=[self.scope])

    def _build_app(self) -> Any:
        import msal

        settings = self.settings
        if not settings.ms_client_id:
            raise ProviderError(
                AUTH_FAILED, "no Entra ID application (client) id is configured",
                retriable=False, hint="Set ABSENCE_SYNC_MS_CLIENT_ID.",
            )
        credential: str | dict[str, str]
        if settings.ms_client_cert_file is not None:
            try:
                credential = _load_certificate(str(settings.ms_client_cert_file))
            except (OSError, ValueError, TypeError) as exc:
                raise ProviderError(
                    AUTH_FAILED,
                    f"cannot use the certificate in {settings.ms_client_cert_file}: {exc}",
                    retriable=False,
                    hint="ABSENCE_SYNC_MS_CLIENT_CERT_FILE must be one unencrypted PEM file "
                    "holding the private key and its certificate.",
                ) from exc
        elif settings.ms_client_secret:
            credential = settings.ms_client_secret
        else:
            raise ProviderError(
                AUTH_FAILED, "no client secret or certificate is configured", retriable=False,
                hint="Set ABSENCE_SYNC_MS_CLIENT_SECRET or ABSENCE_SYNC_MS_CLIENT_CERT_FILE.",
            )
        self._discard_app()
        session = _TimeoutSession(settings.request_timeout_seconds)
        session.trust_env = False  # talk to the configured authority host, never a proxy
        adapter = _TrustingAdapter(self._ssl_context)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        self._session = session
        try:
            return msal.ConfidentialClientApplication(
                settings.ms_client_id,
                client_credential=credential,
                authority=f"{settings.ms_authority_host}/{self.tenant_id}",
                http_client=session,
                instance_discovery=False,
                azure_region=False,
                token_cache=msal.TokenCache(),
            )
        except ValueError as exc:
            if "authority configuration" not in str(exc):
                raise ProviderError(
                    AUTH_FAILED, f"MSAL refused the configuration: {exc}", retriable=False,
                    hint="Check ABSENCE_SYNC_MS_AUTHORITY_HOST (an https:// login host).",
                ) from exc
            # Tenant discovery answered 4xx: this directory does not exist (any more).
            raise translate_error(
                TokenFailure("invalid_tenant", str(exc.__context__ or exc)),
                config_id=self.config_id,
            ) from exc

    def close(self) -> None:
        self._discard_app()
        self._executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- requests


class _Requeue(Exception):
    """The mailbox got throttled while the request was queued: wait again."""


@dataclass(eq=False)
class _Pending:
    """One queued Graph request, holding a slot of its mailbox until released."""

    key: str
    method: str
    path: str
    body: dict[str, Any] | None
    release_slot: Callable[[], None]
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.release_slot()


@dataclass
class _Slots:
    """Per-mailbox semaphores, dropped when nobody uses them (memory bounded)."""

    limit: int
    semaphores: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)

    async def acquire(self, key: str) -> None:
        semaphore = self.semaphores.setdefault(key, asyncio.Semaphore(self.limit))
        self.users[key] = self.users.get(key, 0) + 1
        try:
            await semaphore.acquire()
        except BaseException:
            self._drop(key)
            raise

    def release(self, key: str) -> None:
        self.semaphores[key].release()
        self._drop(key)

    def _drop(self, key: str) -> None:
        self.users[key] -= 1
        if self.users[key] == 0:
            del self.users[key]
            del self.semaphores[key]


@dataclass
class _Limits:
    """Graph's limits for the application, shared by the providers of one event loop."""

    slots: _Slots = field(default_factory=lambda: _Slots(MAILBOX_CONCURRENCY))
    not_before: dict[str, float] = field(default_factory=dict)  # mailbox -> loop time
    tenant_not_before: dict[str, float] = field(default_factory=dict)  # directory -> loop time


_LIMITS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Limits]] = (
    weakref.WeakKeyDictionary()
)


def _shared_limits(graph_url: str) -> _Limits:
    """The limits for the Graph instance at `graph_url`, in the running event loop."""
    per_loop = _LIMITS.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(graph_url, _Limits())


class Microsoft365Provider(Provider):
    """Calendars of one customer directory through Microsoft Graph (module docstring)."""

    kind: ClassVar[str] = "microsoft365"
    mailbox_concurrency: ClassVar[int | None] = MAILBOX_CONCURRENCY

    def __init__(self, settings: Settings, tenant_id: str | None, *, config_id: str = "CONFIG_ID",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.config_id = config_id
        self.tenant_id = tenant_id
        self.graph_url = settings.ms_graph_url.rstrip("/")
        self.timeout = settings.request_timeout_seconds
        self.batch_window = BATCH_WINDOW
        self._ssl_context = ssl_context or ssl.create_default_context()
        self._problem: ProviderError | None = None
        if not tenant_id:
            self._problem = ProviderError(
                CONSENT_MISSING, f"configuration {config_id} has no Microsoft 365 tenant_id yet",
                retriable=False, hint=_consent_hint(config_id),
            )
        elif not _TENANT_ID.match(tenant_id) or tenant_id.lower() in (
            "common", "organizations", "consumers",
        ):
            self._problem = ProviderError(
                CONSENT_MISSING, f"configuration {config_id}: {tenant_id!r} is not a directory id",
                retriable=False, hint=_consent_hint(config_id),
            )
        self._tokens = _Tokens(settings, tenant_id or "", config_id, self._ssl_context)
        self._http: aiohttp.ClientSession | None = None
        self._tenant_key = (tenant_id or "").casefold()
        self._shared: _Limits | None = None
        self._batcher: Batcher[_Pending, GraphReply] = Batcher(
            self._send, size=MAX_BATCH, window=self.batch_window, on_drop=_Pending.release
        )
        self._closed = False

    @classmethod
    def from_config(cls, config: SyncConfig, context: ProviderContext) -> Microsoft365Provider:
        tenant = config.provider_settings.get("tenant_id")
        return cls(
            context.settings,
            str(tenant).strip() if tenant else None,
            config_id=config.id,
            ssl_context=context.ssl_context,
        )

    # ------------------------------------------------------------------ operations

    async def create(self, event: DesiredEvent, *, transaction_id: str) -> str:
        body = event_payload(event)
        body["transactionId"] = graph_transaction_id(transaction_id)
        reply = await self._call(event.mailbox, "POST", _user_path(event.mailbox) + "/events",
                                 body)
        return self._event_id(reply, event.mailbox)

    async def update(self, mailbox: str, event_id: str, event: DesiredEvent) -> str:
        path = f"{_user_path(mailbox)}/events/{quote(event_id, safe='=')}"
        reply = await self._call(mailbox, "PATCH", path, event_payload(event), gone_ok=True)
        body = reply.body
        return str(body["id"]) if isinstance(body, dict) and body.get("id") else event_id

    async def delete(self, mailbox: str, event_id: str) -> bool:
        path = f"{_user_path(mailbox)}/events/{quote(event_id, safe='=')}"
        try:
            await self._call(mailbox, "DELETE", path, None, gone_ok=True)
        except EventGone:
            return False
        return True

    async def find(self, mailbox: str, mark: Mark) -> list[str]:
        """One equality filter per form of the mark (current, then the form
        written before ids were encoded); ids in order, without repeats."""
        found: dict[str, None] = {}
        for value in mark.values:
            query = "$filter=" + quote(mark_filter(mark, value), safe="") + "&$select=id"
            path: str | None = f"{_user_path(mailbox)}/events?{query}"
            while path is not None:
                reply = await self._call(mailbox, "GET", path, None)
                body = reply.body if isinstance(reply.body, dict) else {}
                found.update(
                    (str(item["id"]), None) for item in body.get("value", []) if "id" in item
                )
                path = self._relative(body.get("@odata.nextLink"))
        return list(found)

    supports_replies: ClassVar[bool] = True

    async def read_reply(self, mailbox: str) -> ReplySetting:
        path = _user_path(mailbox) + "/mailboxSettings/automaticRepliesSetting"
        reply = await self._call(mailbox, "GET", path, None)
        return reply_setting(reply.body)

    async def write_reply(self, mailbox: str, setting: ReplySetting) -> ReplySetting:
        """PATCH the mailbox settings, then GET what Graph stored (it rewrites the
        messages as HTML documents). Needs the MailboxSettings.ReadWrite permission."""
        await self._call(mailbox, "PATCH", _user_path(mailbox) + "/mailboxSettings",
                         {"automaticRepliesSetting": reply_payload(setting)})
        return await self.read_reply(mailbox)

    async def check_access(self) -> None:
        """Obtain an app-only token for this directory, or raise the `ProviderError`
        saying why not (the admin-consent check)."""
        if self._problem is not None:
            raise _copy(self._problem)
        await self._tokens.get()

    async def close(self) -> None:
        self._closed = True
        await self._batcher.close(
            ProviderError(PROVIDER_ERROR, "the provider was closed", retriable=True)
        )
        if self._http is not None:
            await self._http.close()
            self._http = None
        self._tokens.close()

    # ------------------------------------------------------------------ internals

    def _event_id(self, reply: GraphReply, mailbox: str) -> str:
        body = reply.body
        if isinstance(body, dict) and body.get("id"):
            return str(body["id"])
        raise ProviderError(PROVIDER_ERROR, f"{mailbox}: Graph returned no event id",
                            retriable=True)

    def _relative(self, next_link: Any) -> str | None:
        """A nextLink as a path under the Graph base URL (never follow it elsewhere)."""
        if not next_link:
            return None
        link = str(next_link)
        if not link.startswith(self.graph_url + "/"):
            raise ProviderError(PROVIDER_ERROR, "Graph returned a nextLink to another host",
                                retriable=False)
        return link[len(self.graph_url):]

    async def _call(self, mailbox: str, method: str, path: str, body: dict[str, Any] | None,
                    *, gone_ok: bool = False) -> GraphReply:
        """One Graph request for `mailbox`; a successful reply or a `ProviderError`."""
        if self._problem is not None:
            raise _copy(self._problem)
        if self._closed:
            raise ProviderError(PROVIDER_ERROR, "the provider was closed", retriable=True)
        reply = await self._exchange(mailbox, method, path, body)
        if reply.status == 401:
            await self._tokens.invalidate(reply.token)
            reply = await self._exchange(mailbox, method, path, body)
        if reply.ok:
            return reply
        error = translate_error(reply, mailbox=mailbox, config_id=self.config_id)
        if isinstance(error, EventGone) and not gone_ok:
            raise ProviderError(PROVIDER_ERROR, error.message, retriable=False)
        raise error

    @property
    def _limits(self) -> _Limits:
        if self._shared is None:
            self._shared = _shared_limits(self.graph_url)
        return self._shared

    async def _exchange(self, mailbox: str, method: str, path: str,
                        body: dict[str, Any] | None) -> GraphReply:
        key = mailbox.casefold()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        slots = self._limits.slots
        while True:
            await self._wait_until_allowed(key, deadline)
            await slots.acquire(key)
            if self._blocked_until(key) > loop.time():
                slots.release(key)
                continue
            item = _Pending(key, method, path, body, functools.partial(slots.release, key))
            try:
                return await self._batcher.submit(item)
            except _Requeue:
                continue

    def _blocked_until(self, key: str) -> float:
        limits, now = self._limits, asyncio.get_running_loop().time()
        until = limits.not_before.get(key, 0.0)
        if until and until <= now:
            del limits.not_before[key]
            until = 0.0
        tenant_until = limits.tenant_not_before.get(self._tenant_key, 0.0)
        if tenant_until and tenant_until <= now:
            del limits.tenant_not_before[self._tenant_key]
            tenant_until = 0.0
        return max(until, tenant_until)

    async def _wait_until_allowed(self, key: str, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            until = self._blocked_until(key)
            now = loop.time()
            if until <= now:
                return
            if until > deadline:
                raise ProviderError(
                    THROTTLED, "Microsoft Graph asked to wait before the next request",
                    retriable=True, retry_after=until - now,
                )
            await asyncio.sleep(until - now)

    def _throttled(self, key: str, reply: GraphReply, *, envelope: bool = False) -> None:
        """Remember a Retry-After so nothing reaches the mailbox (or tenant) before it."""
        if reply.status not in (429, 503):
            return
        delay = reply.retry_after
        if delay is None or delay <= 0:
            return
        until = asyncio.get_running_loop().time() + delay
        mailbox_specific = (
            reply.error_code in _MAILBOX_THROTTLE_CODES
            or "mailbox" in reply.error_message.lower()
        )
        limits = self._limits
        if envelope or (reply.status == 429 and not mailbox_specific):
            tenant = self._tenant_key
            limits.tenant_not_before[tenant] = max(limits.tenant_not_before.get(tenant, 0.0),
                                                   until)
        if not envelope:
            limits.not_before[key] = max(limits.not_before.get(key, 0.0), until)

    # --------------------------------------------------------------- batching

    async def _send(self, group: list[_Pending]) -> list[GraphReply | BaseException]:
        """One request for `group` (unbatched when alone, else one `$batch`): a reply
        or an error per item, in order; every slot given back."""
        results: dict[int, GraphReply | BaseException] = {}
        try:
            loop = asyncio.get_running_loop()
            ready: list[_Pending] = []
            for item in group:
                if self._blocked_until(item.key) > loop.time():
                    results[id(item)] = _Requeue()
                else:
                    ready.append(item)
            if ready:
                try:
                    token = await self._tokens.get()
                    if len(ready) == 1:
                        only = ready[0]
                        reply = await self._request(only.method, only.path, only.body, token)
                        self._throttled(only.key, reply)
                        results[id(only)] = reply
                    else:
                        results.update(await self._batch(ready, token))
                except (aiohttp.ClientError, OSError, TimeoutError, ProviderError) as exc:
                    error = translate_error(exc, config_id=self.config_id)
                    for item in ready:
                        results[id(item)] = _copy(error)
        finally:
            for item in group:
                item.release()
        return [results[id(item)] for item in group]

    async def _batch(self, items: list[_Pending], token: str
                     ) -> dict[int, GraphReply | BaseException]:
        requests_: list[dict[str, Any]] = []
        for index, item in enumerate(items):
            sub: dict[str, Any] = {"id": str(index), "method": item.method, "url": item.path}
            if item.body is not None:
                sub["headers"] = {"Content-Type": "application/json"}
                sub["body"] = item.body
            requests_.append(sub)
        envelope = await self._request("POST", "/$batch", {"requests": requests_}, token)
        if not envelope.ok:
            if items:
                self._throttled(items[0].key, envelope, envelope=True)
            return {id(item): envelope for item in items}
        responses = envelope.body.get("responses") if isinstance(envelope.body, dict) else None
        by_id: dict[str, Any] = {}
        for response in responses if isinstance(responses, list) else []:
            if isinstance(response, dict):
                by_id[str(response.get("id"))] = response
        results: dict[int, GraphReply | BaseException] = {}
        for index, item in enumerate(items):
            raw = by_id.get(str(index))
            if raw is None:
                results[id(item)] = ProviderError(
                    PROVIDER_ERROR, "$batch response lacks a sub-response", retriable=True
                )
                continue
            headers = raw.get("headers") if isinstance(raw.get("headers"), dict) else {}
            reply = GraphReply(
                int(raw.get("status", 500)),
                {str(k).lower(): str(v) for k, v in headers.items()},
                raw.get("body"),
                token,
            )
            self._throttled(item.key, reply)
            results[id(item)] = reply
        return results

    async def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = https_session(
                ProviderContext(self.settings, self._ssl_context), timeout=self.timeout
            )
        return self._http

    async def _request(self, method: str, path: str, body: dict[str, Any] | None,
                       token: str) -> GraphReply:
        session = await self._session()
        url = URL(self.graph_url + path, encoded=True)
        status, headers, parsed = await bearer_json(session, method, url, body, token)
        return GraphReply(status, headers, parsed, token)
