"""Google Calendar through the Calendar API v3, as each employee (docs/google.md).

One `GoogleProvider` per sync configuration, holding one service account
key with domain-wide delegation (`google_auth.GoogleTokens`: a JWT bearer
grant per employee, scope `https://www.googleapis.com/auth/calendar.events`,
cached until shortly before expiry). What callers may rely on:

* Events are written to `calendar_id` (default `primary`) of the employee's
  account, with the same aiohttp stack and TLS rules as every provider; the
  API base is ABSENCE_SYNC_GOOGLE_API_URL.
* Inserts carry a client-chosen event id (base32hex, derived from the
  ownership mark and the engine's transaction id), so a retried insert
  whose first answer was lost gets 409 `duplicate` and the event already
  written is adopted (brought up to date), never stored twice. Google keeps
  the ids of deleted events: when the derived id belongs to a deleted event
  (or to an event that is not ours) the next id of the same sequence is used.
* `busy_as: oof` becomes an `outOfOffice` event on primary calendars (timed,
  from local midnight to midnight for whole days, since Google refuses
  all-day out-of-office events), with the configuration's `autodecline`.
  On other calendars it is an ordinary busy event. Since Google cannot
  change an event's `eventType`, an update that changes it deletes the event
  and creates a new one (the returned id is the new one).
* Per mailbox (user of the service account's project), at most
  `RATE_PER_MINUTE` (600) requests in any minute: a token bucket of
  `RATE_BURST` requests refilled at (600 - burst) per minute, shared by
  every provider of the event loop; a wait longer than the request timeout
  fails with `throttled` and the delay. Google's own rate-limit answers
  drain the bucket so what follows slows down.
* Operations issued together are coalesced into multipart/mixed requests to
  the host's `/batch/calendar/v3` (at most `MAX_BATCH`, each part with its
  own employee's token); a lone operation goes unbatched, and a server
  without the batch endpoint gets single requests.
* Every failure leaves through `translate_error` and the boundary's status
  ladder (Google's error reasons as the vendor hook).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import secrets
import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

from consumer.providers.base import (
    ACCESS_DENIED,
    AUTH_FAILED,
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
    parse_body,
    status_error,
    transport_error,
)
from consumer.providers.google_auth import (
    CALENDAR_SCOPE,
    GMAIL_SCOPE,
    GoogleTokens,
    ServiceAccountKey,
)
from consumer.replies import ReplySetting

if TYPE_CHECKING:
    from consumer.config import SyncConfig
    from consumer.render import DesiredEvent, Mark

__all__ = [
    "AUTODECLINE",
    "MARK_KEY",
    "GoogleProvider",
    "event_payload",
    "google_event_id",
    "translate_error",
]

MAILBOX_CONCURRENCY = 4
MAX_BATCH = 10
BATCH_WINDOW = 0.002
RATE_PER_MINUTE = 600
RATE_BURST = 20
#: back-off after `quotaExceeded` (the calendar's usage limits: hours, not seconds)
QUOTA_BACKOFF = 3600.0
#: ids of one sequence tried before giving up (each taken by a deleted event)
MAX_ID_ATTEMPTS = 8
MARK_KEY = "absenceSyncMark"
AUTODECLINE = {
    "none": "declineNone",
    "all": "declineAllConflictingInvitations",
    "new": "declineOnlyNewConflictingInvitations",
}
_THROTTLE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
_QUOTA_REASONS = frozenset({"quotaExceeded", "dailyLimitExceeded"})
_PAGE_SIZE = 250
_BASE32HEX = str.maketrans("", "", "=")

_HINT_CALENDAR = (
    "The calendar was not found in the employee's Google account: check calendar_id in "
    "the configuration (default primary) and the employee's address in the HR system."
)
_HINT_QUOTA = (
    "Google Calendar's usage limits for this calendar or project were exceeded (too many "
    "events written in a short time): writes resume after a back-off of about an hour. "
    "If it persists, check the project's quota in the Google Cloud console."
)
_HINT_REFUSED = (
    "Google refused a fresh access token: the service account key may have been deleted or "
    "disabled, or the Calendar API is not enabled for its project."
)

Where = Literal["calendar", "event"]


def google_event_id(seed: str, attempt: int = 0) -> str:
    """A client-chosen event id for `seed`: base32hex (0-9, a-v), 52 characters, the
    same for the same seed and attempt."""
    digest = hashlib.sha256(f"{seed}\n{attempt}".encode()).digest()
    return base64.b32hexencode(digest).decode().translate(_BASE32HEX).lower()


def _local(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


def event_payload(event: DesiredEvent, *, primary: bool = True,
                  autodecline: str = "none") -> dict[str, Any]:
    """The Calendar API event body for `event`: quiet (rule 5.6), marked (rule 5.7).
    `primary` says whether the calendar is a primary one (out-of-office events
    exist only there)."""
    out_of_office = event.show_as == "oof" and primary
    start: dict[str, str]
    end: dict[str, str]
    if event.all_day and not out_of_office:
        start = {"date": event.start.date().isoformat()}
        end = {"date": event.end.date().isoformat()}
    else:
        start = {"dateTime": _local(event.start), "timeZone": event.time_zone}
        end = {"dateTime": _local(event.end), "timeZone": event.time_zone}
    body: dict[str, Any] = {
        "summary": event.subject,
        "description": "",
        "start": start,
        "end": end,
        "eventType": "outOfOffice" if out_of_office else "default",
        "transparency": "transparent" if event.show_as in ("free", "workingElsewhere")
        else "opaque",
        "status": "tentative" if event.show_as == "tentative" else "confirmed",
        "visibility": "private" if event.private else "default",
        "reminders": {"useDefault": False},
        "extendedProperties": {"private": {MARK_KEY: event.mark.value}},
    }
    if out_of_office:
        body["outOfOfficeProperties"] = {
            "autoDeclineMode": AUTODECLINE.get(autodecline, AUTODECLINE["none"]),
        }
    return body


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class GoogleReply(Reply):
    """A Calendar API response or batch part (the boundary's `Reply`), body parsed,
    with the token it was sent with."""

    token: str = ""

    @property
    def _error(self) -> dict[str, Any]:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return error if isinstance(error, dict) else {}

    @property
    def reason(self) -> str:
        errors = self._error.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return str(errors[0].get("reason", ""))
        return str(self._error.get("status", ""))

    @property
    def error_message(self) -> str:
        return " ".join(str(self._error.get("message", "")).split())[:300]


def translate_error(problem: GoogleReply | BaseException, *, mailbox: str = "",
                    where: Where = "calendar") -> ProviderError:
    """The one place where Calendar API and transport failures become `ProviderError`s.
    `where` says what the request addressed: the calendar (insert, list: a 404
    means the calendar is missing) or one event (a 404 or 410 means it is gone).
    An exception the boundary does not know (a bug of ours) is raised as it is."""
    if not isinstance(problem, GoogleReply):
        error = transport_error(problem, where="Google Calendar API")
        if error is None:
            raise problem
        return error
    reply, status, reason = problem, problem.status, problem.reason
    detail = f"HTTP {status} {reason}: {reply.error_message}".rstrip(": ")
    if mailbox:
        detail = f"{mailbox}: {detail}"

    def google_reasons(_reply: Reply, message: str) -> ProviderError | None:
        if reason in _THROTTLE_REASONS:
            return ProviderError(THROTTLED, message, retriable=True)
        if reason in _QUOTA_REASONS:
            return ProviderError(THROTTLED, message, retriable=True,
                                 retry_after=QUOTA_BACKOFF, hint=_HINT_QUOTA)
        if status in (404, 410):
            if where == "event":
                return EventGone(message)
            return ProviderError(MAILBOX_NOT_FOUND, message, retriable=False,
                                 hint=_HINT_CALENDAR)
        if status == 401:
            return ProviderError(AUTH_FAILED, message, retriable=False, hint=_HINT_REFUSED)
        if status == 403:
            who = f"{mailbox}'s calendar" if mailbox else "the calendar"
            return ProviderError(
                ACCESS_DENIED, message, retriable=False,
                hint=f"Writing to {who} was refused: the employee may not write the "
                "configured calendar_id (check its sharing), or the service account's "
                f"delegation lacks the scope {CALENDAR_SCOPE} (check it in the Google Admin "
                "console, Security > API controls > Domain-wide delegation).",
            )
        if status in (409, 412):  # conflicting concurrent changes pass
            return ProviderError(PROVIDER_ERROR, message, retriable=True)
        return None

    return status_error(reply, detail, google_reasons)


def _copy(error: ProviderError) -> ProviderError:
    if isinstance(error, EventGone):
        return EventGone(error.message)
    return ProviderError(error.code, error.message, retriable=error.retriable,
                         retry_after=error.retry_after, hint=error.hint)


# --------------------------------------------------------------------------- rate limit


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """Per-key token buckets: at most `per_minute` acquisitions in any 60 seconds
    (`burst` at once, the rest spread evenly). Idle full buckets are dropped."""

    per_minute: int = RATE_PER_MINUTE
    burst: int = RATE_BURST
    buckets: dict[str, _Bucket] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return max(self.per_minute - self.burst, 1) / 60.0

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) > 10_000:
                self._prune(now)
            bucket = self.buckets[key] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst),
                                bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        return bucket

    def _prune(self, now: float) -> None:
        self.buckets = {
            k: b for k, b in self.buckets.items()
            if b.tokens + (now - b.updated) * self.rate < self.burst
        }

    def reserve(self, key: str, budget: float) -> float:
        """Take one request for `key`: the seconds to wait before sending it. A wait
        longer than `budget` takes nothing and raises `throttled`."""
        now = asyncio.get_running_loop().time()
        bucket = self._bucket(key, now)
        wait = 0.0 if bucket.tokens >= 1.0 else (1.0 - bucket.tokens) / self.rate
        if wait > budget:
            raise ProviderError(THROTTLED, "the per-mailbox request budget of Google Calendar "
                                "is spent for now", retriable=True, retry_after=wait)
        bucket.tokens -= 1.0
        return wait

    def drain(self, key: str) -> None:
        """Google said to slow down: nothing more for `key` until a request's worth
        has refilled."""
        bucket = self._bucket(key, asyncio.get_running_loop().time())
        bucket.tokens = min(bucket.tokens, 0.0)


_LIMITERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, int, int],
                                                                       RateLimiter]] = (
    weakref.WeakKeyDictionary()
)


def _shared_limiter(api_url: str, per_minute: int, burst: int) -> RateLimiter:
    per_loop = _LIMITERS.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault((api_url, per_minute, burst), RateLimiter(per_minute, burst))


# --------------------------------------------------------------------------- provider


@dataclass(eq=False)
class _Pending:
    """One Calendar API request waiting to be sent (alone or in a batch)."""

    method: str
    path: str  # under the API base, with its query
    body: dict[str, Any] | None
    token: str


class _NoBatch(Exception):
    """The server has no batch endpoint: send the group one by one."""


class GoogleProvider(Provider):
    """Calendars of one Google Workspace domain through a delegated service account."""

    kind: ClassVar[str] = "google"
    mailbox_concurrency: ClassVar[int | None] = MAILBOX_CONCURRENCY

    def __init__(
        self,
        context: ProviderContext,
        key_json: str | None,
        *,
        config_id: str = "CONFIG_ID",
        calendar_id: str = "primary",
        autodecline: str = "none",
        rate_per_minute: int = RATE_PER_MINUTE,
        rate_burst: int = RATE_BURST,
        batch_size: int = MAX_BATCH,
    ) -> None:
        settings = context.settings
        self.context = context
        self.config_id = config_id
        self.static_warnings: tuple[str, ...] = ()
        self.calendar_id = calendar_id or "primary"
        self.autodecline = autodecline if autodecline in AUTODECLINE else "none"
        self.api_url = settings.google_api_url.rstrip("/")
        self.gmail_url = settings.google_gmail_url.rstrip("/")
        parts = urlsplit(self.api_url)
        self._api_path = parts.path.rstrip("/")
        self.batch_url = f"{parts.scheme}://{parts.netloc}/batch/calendar/v3"
        self.timeout = settings.request_timeout_seconds
        self.rate_per_minute = rate_per_minute
        self.rate_burst = rate_burst
        self._problem: ProviderError | None = None
        key: ServiceAccountKey | None = None
        if not key_json:
            self._problem = ProviderError(
                AUTH_FAILED, f"configuration {config_id} has no service account key",
                retriable=False, hint="Give google.service_account_file or service_account_env.",
            )
        else:
            try:
                key = ServiceAccountKey.parse(key_json)
            except ProviderError as exc:
                self._problem = exc
        self.key = key or ServiceAccountKey("", "")
        self.tokens = GoogleTokens(self.key, context, timeout=self.timeout)
        self._http: aiohttp.ClientSession | None = None
        self._limiter: RateLimiter | None = None
        self._batching = True
        self._batcher: Batcher[_Pending, GoogleReply] = Batcher(
            self._send, size=max(1, batch_size), window=BATCH_WINDOW
        )
        self._closed = False

    @classmethod
    def from_config(cls, config: SyncConfig, context: ProviderContext) -> GoogleProvider:
        from consumer.config import config_warnings

        block = config.provider_settings
        provider = cls(
            context,
            config.secrets.get("service_account"),
            config_id=config.id,
            calendar_id=str(block.get("calendar_id") or "primary"),
            autodecline=str(block.get("autodecline") or "none"),
        )
        provider.static_warnings = tuple(config_warnings(config))
        return provider

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.static_warnings

    # ------------------------------------------------------------------ paths

    def _calendar(self, mailbox: str) -> str:
        calendar = self.calendar_id.replace("{email}", mailbox)
        return "/calendars/" + quote(calendar, safe="@") + "/events"

    def _event(self, mailbox: str, event_id: str) -> str:
        return f"{self._calendar(mailbox)}/{quote(event_id, safe='')}"

    @property
    def _primary(self) -> bool:
        return self.calendar_id == "primary"

    def _payload(self, event: DesiredEvent) -> dict[str, Any]:
        return event_payload(event, primary=self._primary, autodecline=self.autodecline)

    # ------------------------------------------------------------------ operations

    async def create(self, event: DesiredEvent, *, transaction_id: str) -> str:
        return await self._insert(event, f"{event.mark.value}\n{transaction_id}")

    async def update(self, mailbox: str, event_id: str, event: DesiredEvent) -> str:
        current = await self._get(mailbox, event_id)
        if current is None:
            raise EventGone(f"{mailbox}: the event no longer exists")
        return await self._replace(mailbox, event_id, current, event)

    async def delete(self, mailbox: str, event_id: str) -> bool:
        reply = await self._call(mailbox, "DELETE",
                                 self._event(mailbox, event_id) + "?sendUpdates=none", None)
        if reply.ok:
            return True
        if reply.status in (404, 410):
            return False
        raise translate_error(reply, mailbox=mailbox, where="event")

    async def find(self, mailbox: str, mark: Mark) -> list[str]:
        """Live events carrying any form of `mark`, in order, without repeats. What the
        server returns is checked again: an event that shows another mark is never
        taken for ours (even from a server that ignored the filter)."""
        found: dict[str, None] = {}
        for value in mark.values:
            page: str | None = None
            while True:
                query = {"privateExtendedProperty": f"{MARK_KEY}={value}",
                         "showDeleted": "false", "maxResults": str(_PAGE_SIZE)}
                if page:
                    query["pageToken"] = page
                encoded = "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
                reply = await self._call(mailbox, "GET", f"{self._calendar(mailbox)}?{encoded}",
                                         None)
                if not reply.ok:
                    raise translate_error(reply, mailbox=mailbox, where="calendar")
                body = reply.body if isinstance(reply.body, dict) else {}
                for item in body.get("items") or []:
                    if isinstance(item, dict) and item.get("id") and (
                        item.get("status") != "cancelled"
                    ) and _mark_of(item) in (value, None):
                        found[str(item["id"])] = None
                token = body.get("nextPageToken")
                if not token or token == page:
                    break
                page = str(token)
        return list(found)

    # ------------------------------------------------------------------ replies

    supports_replies: ClassVar[bool] = True
    reply_html: ClassVar[bool] = False
    reply_subject: ClassVar[bool] = True

    def reply_form(self, setting: ReplySetting) -> ReplySetting:
        """Gmail keeps one message: the internal one for audience `none` (replies
        restricted to the domain), the external one otherwise."""
        if setting.status == "disabled":
            return setting
        if setting.audience == "none":
            return replace(setting, external="")
        return replace(setting, internal="")

    async def read_reply(self, mailbox: str) -> ReplySetting:
        reply = await self._gmail(mailbox, "GET", None)
        return vacation_reply(reply.body)

    async def write_reply(self, mailbox: str, setting: ReplySetting) -> ReplySetting:
        """users.settings.updateVacation (a full replace: switching off sends the
        held settings with `enableAutoReply` false), then what Gmail holds."""
        if setting.status == "disabled":
            held = await self._gmail(mailbox, "GET", None)
            body = dict(held.body) if isinstance(held.body, dict) else {}
            body["enableAutoReply"] = False
        else:
            body = vacation_payload(setting)
        await self._gmail(mailbox, "PUT", body)
        return await self.read_reply(mailbox)

    async def _gmail(self, mailbox: str, method: str,
                     body: dict[str, Any] | None) -> GoogleReply:
        """One Gmail settings request as `mailbox` (token for gmail.settings.basic,
        which the domain-wide delegation must include), within its rate limit."""
        if self._problem is not None:
            raise _copy(self._problem)
        if self._closed:
            raise ProviderError(PROVIDER_ERROR, "the provider was closed", retriable=True)
        key = f"{self.key.client_email}|{mailbox.casefold()}"
        url = URL(f"{self.gmail_url}/users/{quote(mailbox, safe='@')}/settings/vacation",
                  encoded=True)
        reply: GoogleReply | None = None
        for _ in range(2):
            token = await self.tokens.get(mailbox, GMAIL_SCOPE)
            wait = self._limits.reserve(key, self.timeout)
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                session = await self._session()
                reply = GoogleReply(*await bearer_json(session, method, url, body, token), token)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise translate_error(exc) from exc
            if reply.status != 401:
                break
            self.tokens.invalidate(mailbox, token, GMAIL_SCOPE)
        assert reply is not None
        if reply.status == 429 or reply.reason in _THROTTLE_REASONS:
            self._limits.drain(key)
        if not reply.ok:
            raise translate_error(reply, mailbox=mailbox, where="calendar")
        return reply

    async def close(self) -> None:
        self._closed = True
        await self._batcher.close(
            ProviderError(PROVIDER_ERROR, "the provider was closed", retriable=True)
        )
        if self._http is not None:
            await self._http.close()
            self._http = None
        await self.tokens.close()

    # ------------------------------------------------------------------ internals

    async def _insert(self, event: DesiredEvent, seed: str) -> str:
        """Insert `event` with the first free id of `seed`'s sequence; a live event of
        ours already holding an id of the sequence is adopted and brought up to date."""
        mailbox = event.mailbox
        body = self._payload(event)
        for attempt in range(MAX_ID_ATTEMPTS):
            event_id = google_event_id(seed, attempt)
            reply = await self._call(mailbox, "POST",
                                     self._calendar(mailbox) + "?sendUpdates=none",
                                     {**body, "id": event_id})
            if reply.ok:
                answered = reply.body.get("id") if isinstance(reply.body, dict) else None
                return str(answered or event_id)
            if reply.status != 409:
                raise translate_error(reply, mailbox=mailbox, where="calendar")
            current = await self._get(mailbox, event_id)
            if current is not None and _mark_of(current) in event.mark.values:
                return await self._replace(mailbox, event_id, current, event)
        raise ProviderError(
            PROVIDER_ERROR, f"{mailbox}: every event id derived for this absence is taken",
            retriable=False,
        )

    async def _get(self, mailbox: str, event_id: str) -> dict[str, Any] | None:
        """The event, or None when it is gone (deleted events read as cancelled)."""
        reply = await self._call(mailbox, "GET", self._event(mailbox, event_id), None)
        if reply.status in (404, 410):
            return None
        if not reply.ok:
            raise translate_error(reply, mailbox=mailbox, where="event")
        body = reply.body if isinstance(reply.body, dict) else {}
        if body.get("status") == "cancelled":
            return None
        return body

    async def _replace(self, mailbox: str, event_id: str, current: dict[str, Any],
                       event: DesiredEvent) -> str:
        """Make the live event `event_id` (read as `current`) hold `event`."""
        body = self._payload(event)
        if (current.get("eventType") or "default") != body["eventType"]:
            # Google cannot change an event's type: a new event takes its place
            await self.delete(mailbox, event_id)
            return await self._insert(event, f"{event.mark.value}\n{event_id}\n"
                                             f"{body['eventType']}")
        path = self._event(mailbox, event_id) + "?sendUpdates=none"
        reply = await self._call(mailbox, "PUT", path, body)
        if reply.status in (405, 501):  # a server that only patches: the body is complete
            reply = await self._call(mailbox, "PATCH", path, body)
        if reply.ok:
            return event_id
        raise translate_error(reply, mailbox=mailbox, where="event")

    @property
    def _limits(self) -> RateLimiter:
        if self._limiter is None:
            self._limiter = _shared_limiter(self.api_url, self.rate_per_minute, self.rate_burst)
        return self._limiter

    async def _call(self, mailbox: str, method: str, path: str,
                    body: dict[str, Any] | None) -> GoogleReply:
        """One request as `mailbox`, within its rate limit, with one fresh token after
        a 401: a successful reply or one of the statuses callers read (404, 405, 409,
        410, 501); a `ProviderError` for everything else."""
        if self._problem is not None:
            raise _copy(self._problem)
        if self._closed:
            raise ProviderError(PROVIDER_ERROR, "the provider was closed", retriable=True)
        key = f"{self.key.client_email}|{mailbox.casefold()}"
        reply: GoogleReply | None = None
        for _ in range(2):
            token = await self.tokens.get(mailbox, CALENDAR_SCOPE)
            wait = self._limits.reserve(key, self.timeout)
            if wait > 0:
                await asyncio.sleep(wait)
            reply = await self._batcher.submit(_Pending(method, path, body, token))
            if reply.status != 401:
                break
            self.tokens.invalidate(mailbox, token, CALENDAR_SCOPE)
        assert reply is not None
        if reply.status == 429 or reply.reason in _THROTTLE_REASONS:
            self._limits.drain(key)
        if not reply.ok and reply.status not in (404, 405, 409, 410, 501):
            on_event = path.split("?", 1)[0].count("/") > 3
            raise translate_error(reply, mailbox=mailbox, where="event" if on_event else "calendar")
        return reply

    # --------------------------------------------------------------- HTTP

    async def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = https_session(self.context, timeout=self.timeout)
        return self._http

    async def _send(self, group: list[_Pending]) -> list[GoogleReply | BaseException]:
        """`group` as one batch per employee (a lone request unbatched): a reply or an
        error per item, in order. A batch holds one employee's requests only, so
        its outer Authorization is every part's too."""
        by_token: dict[str, list[_Pending]] = {}
        for item in group:
            by_token.setdefault(item.token, []).append(item)
        answers = await asyncio.gather(*(self._send_one(items) for items in by_token.values()))
        results: dict[int, GoogleReply | BaseException] = {}
        for items, replies in zip(by_token.values(), answers, strict=True):
            results.update((id(item), reply) for item, reply in zip(items, replies, strict=True))
        return [results[id(item)] for item in group]

    async def _send_one(self, group: list[_Pending]) -> list[GoogleReply | BaseException]:
        try:
            if len(group) > 1 and self._batching:
                try:
                    return await self._batch(group)
                except _NoBatch:
                    self._batching = False
            replies = await asyncio.gather(
                *(self._request(i.method, i.path, i.body, i.token) for i in group),
                return_exceptions=True,
            )
            return [r if isinstance(r, GoogleReply | ProviderError) else translate_error(r)
                    for r in replies]
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = translate_error(exc)
            return [_copy(error) for _ in group]

    async def _request(self, method: str, path: str, body: dict[str, Any] | None,
                       token: str) -> GoogleReply:
        session = await self._session()
        url = URL(self.api_url + path, encoded=True)
        return GoogleReply(*await bearer_json(session, method, url, body, token), token)

    async def _batch(self, group: list[_Pending]) -> list[GoogleReply | BaseException]:
        boundary = "batch_" + secrets.token_hex(12)
        chunks: list[bytes] = []
        for index, item in enumerate(group):
            lines = [f"{item.method} {self._api_path}{item.path} HTTP/1.1",
                     f"Authorization: Bearer {item.token}", "Accept: application/json"]
            payload = b""
            if item.body is not None:
                payload = json.dumps(item.body).encode()
                lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
            chunks.append(
                (f"--{boundary}\r\nContent-Type: application/http\r\n"
                 f"Content-ID: <item-{index}>\r\n\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode()
                + payload + b"\r\n"
            )
        chunks.append(f"--{boundary}--\r\n".encode())
        session = await self._session()
        headers = {"Authorization": f"Bearer {group[0].token}",
                   "Content-Type": f"multipart/mixed; boundary={boundary}"}
        async with session.post(URL(self.batch_url, encoded=True), data=b"".join(chunks),
                                headers=headers) as response:
            raw = await response.read()
            status = response.status
            content_type = response.headers.get("Content-Type", "")
            envelope_headers = {k.lower(): v for k, v in response.headers.items()}
        if status in (404, 405, 501):
            raise _NoBatch
        if not 200 <= status < 300:
            reply = GoogleReply(status, envelope_headers, parse_body(raw), group[0].token)
            return [reply for _ in group]
        parts = parse_batch(raw, content_type)
        results: list[GoogleReply | BaseException] = []
        for index, item in enumerate(group):
            part = parts.get(index)
            if part is None:
                results.append(ProviderError(PROVIDER_ERROR, "the batch response lacks a part",
                                             retriable=True))
            else:
                results.append(GoogleReply(part[0], part[1], parse_body(part[2]), item.token))
        return results


def vacation_payload(setting: ReplySetting) -> dict[str, Any]:
    """Gmail's VacationSettings for `setting` (after `reply_form`): one plain-text
    message, the audience as restrictToDomain / restrictToContacts, the schedule
    as epoch milliseconds."""
    body: dict[str, Any] = {
        "enableAutoReply": setting.status != "disabled",
        "responseSubject": setting.subject,
        "responseBodyPlainText": setting.internal if setting.audience == "none"
        else setting.external,
        "restrictToDomain": setting.audience == "none",
        "restrictToContacts": setting.audience == "known",
    }
    if setting.status == "scheduled":
        assert setting.start is not None and setting.end is not None
        body["startTime"] = str(int(setting.start.timestamp() * 1000))
        body["endTime"] = str(int(setting.end.timestamp() * 1000))
    return body


def vacation_reply(body: Any) -> ReplySetting:
    """Our reading of Gmail's VacationSettings."""
    data = body if isinstance(body, dict) else {}

    def when(key: str) -> dt.datetime | None:
        try:
            return dt.datetime.fromtimestamp(int(data[key]) / 1000, dt.UTC)
        except (KeyError, TypeError, ValueError, OverflowError, OSError):
            return None

    start, end = when("startTime"), when("endTime")
    if not data.get("enableAutoReply"):
        status = "disabled"
    else:
        status = "scheduled" if start is not None or end is not None else "always"
    message = str(data.get("responseBodyHtml") or data.get("responseBodyPlainText") or "")
    audience = "none" if data.get("restrictToDomain") else (
        "known" if data.get("restrictToContacts") else "all")
    return ReplySetting(
        status,  # type: ignore[arg-type]
        start, end,
        message if audience == "none" else "",
        "" if audience == "none" else message,
        audience,  # type: ignore[arg-type]
        str(data.get("responseSubject") or ""),
    )


def _mark_of(event: dict[str, Any]) -> str | None:
    properties = event.get("extendedProperties")
    private = properties.get("private") if isinstance(properties, dict) else None
    value = private.get(MARK_KEY) if isinstance(private, dict) else None
    return str(value) if value is not None else None


def parse_batch(raw: bytes, content_type: str) -> dict[int, tuple[int, dict[str, str], bytes]]:
    """The parts of a multipart/mixed batch response: index (from `Content-ID:
    <response-item-N>`, else the position) -> (status, headers, body)."""
    boundary = ""
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise ProviderError(PROVIDER_ERROR, "the batch response is not multipart",
                            retriable=True)
    parts: dict[int, tuple[int, dict[str, str], bytes]] = {}
    delimiter = b"--" + boundary.encode()
    for position, chunk in enumerate(raw.split(delimiter)[1:]):
        if chunk.startswith(b"--"):
            break
        outer, inner = _split_head(chunk.lstrip(b"\r\n"))
        index = position
        for line in outer.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-id":
                digits = value.strip().strip("<>").rpartition("-")[2]
                if digits.isdigit():
                    index = int(digits)
        head, body = _split_head(inner)
        head_lines = head.decode("latin-1").splitlines() or [""]
        status_words = head_lines[0].split()
        if len(status_words) < 2 or not status_words[1].isdigit():
            continue
        headers = {}
        for line in head_lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = body.removesuffix(b"\n").removesuffix(b"\r")
        parts[index] = (int(status_words[1]), headers, body)
    return parts


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    """Headers and body of a MIME part or HTTP message (CRLF or bare LF lines)."""
    found = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := data.find(sep)) >= 0]
    if not found:
        return data, b""
    index, size = min(found)
    return data[:index], data[index + size:]
