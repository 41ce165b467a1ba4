"""The CalDAV provider (docs/configuration.md, 'caldav'): any CalDAV server, basic auth, one
calendar collection per employee found through a URL template.

Each event is one iCalendar object in its own resource, named after a UID
derived from the transaction id. That makes `create` idempotent without any
server support beyond `If-None-Match: *`: a retried create targets the same
resource, and the server's 412 says it is already there.

The provider's event id is the resource name inside the employee's calendar
(`absence-sync-<hash>.ics`), not a full URL, so ids survive a change of the
server's host name. `find` returns the names of the resources it finds.

The iCalendar text is written here rather than with a library: the product
needs a small, fixed subset, and writing it keeps line folding, escaping
and the VTIMEZONE under test.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import ssl
import xml.etree.ElementTree as ET
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypedDict
from urllib.parse import quote, unquote
from xml.parsers import expat
from xml.sax.saxutils import escape as xml_escape
from xml.sax.saxutils import quoteattr

import aiohttp
import yarl

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
    parse_retry_after,
)

if TYPE_CHECKING:
    from consumer.config import SyncConfig
    from consumer.render import DesiredEvent, Mark, ShowAs

PRODID = "-//absence-sync//EN"
MARK_PROPERTY = "X-ABSENCE-SYNC-MARK"
UID_PREFIX = "absence-sync-"
CRLF = "\r\n"

_DAV = "DAV:"
_CALDAV = "urn:ietf:params:xml:ns:caldav"
_UTC_ZONES = frozenset(
    {"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu"}
)
_BUSY_STATUS: dict[str, str] = {
    "free": "FREE",
    "tentative": "TENTATIVE",
    "busy": "BUSY",
    "oof": "OOF",
    "workingElsewhere": "WORKINGELSEWHERE",
}
_TRANSPARENT = frozenset({"free", "workingElsewhere"})
_ESCAPES = re.compile(r"\\([\\;,nN])")
_NEEDS_ESCAPE = re.compile(r"[\\;,\r\n]")
_EPOCH = dt.datetime(1970, 1, 1)  # noqa: DTZ001 - a wall-clock onset, zone given by the offsets
_WRITES = frozenset({"create", "update"})
_CALENDAR_LOOKUPS = frozenset({"create", "find", "list_events"})


# --- iCalendar writing ------------------------------------------------------


def event_uid(transaction_id: str) -> str:
    """The UID, and resource name stem, for the event a transaction creates."""
    return UID_PREFIX + hashlib.sha256(transaction_id.encode("utf-8")).hexdigest()[:32]


def escape_text(value: str) -> str:
    """RFC 5545 section 3.3.11 TEXT escaping."""
    value = value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
    return value.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n")


def unescape_text(value: str) -> str:
    return _ESCAPES.sub(lambda m: "\n" if m.group(1) in "nN" else m.group(1), value)


def fold_line(line: str) -> str:
    """One content line, folded at 75 octets (RFC 5545 section 3.1) without
    splitting a UTF-8 sequence, with its CRLF."""
    data = line.encode("utf-8")
    parts: list[str] = []
    start, limit = 0, 75
    while True:
        end = min(start + limit, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:
            end -= 1
        parts.append(data[start:end].decode("utf-8"))
        if end >= len(data):
            break
        start, limit = end, 74  # continuation lines spend one octet on the space
    return (CRLF + " ").join(parts) + CRLF


def _param_value(value: str) -> str:
    if any(c in value for c in ':;,"'):
        return '"' + value.replace('"', "") + '"'
    return value


def _format_offset(offset: dt.timedelta) -> str:
    seconds = int(offset.total_seconds())
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{sign}{hours:02d}{minutes:02d}" + (f"{secs:02d}" if secs else "")


def _local(value: dt.datetime) -> str:
    return value.strftime("%Y%m%dT%H%M%S")


@dataclass(frozen=True, slots=True)
class _Observance:
    onset_local: dt.datetime  # wall clock, in the offset before the change
    offset_from: dt.timedelta
    offset_to: dt.timedelta
    daylight: bool
    name: str | None


def _zone_state(zone: zoneinfo.ZoneInfo, instant: dt.datetime) -> tuple[object, ...]:
    local = instant.astimezone(zone)
    return (local.utcoffset(), local.dst(), local.tzname())


def _observance_at(
    zone: zoneinfo.ZoneInfo, instant: dt.datetime, before: dt.timedelta
) -> _Observance:
    local = instant.astimezone(zone)
    offset = local.utcoffset() or dt.timedelta()
    return _Observance(
        onset_local=(instant + before).replace(tzinfo=None),
        offset_from=before,
        offset_to=offset,
        daylight=bool(local.dst()),
        name=local.tzname(),
    )


def _observances(zone: zoneinfo.ZoneInfo, first_year: int, last_year: int) -> list[_Observance]:
    """The zone's offset changes that matter for events in the given years:
    each one inside them, plus the one in force when they begin."""
    utc = dt.UTC
    window_start = dt.datetime(first_year, 1, 1, tzinfo=utc) - dt.timedelta(days=2)
    scan_start = dt.datetime(first_year - 1, 1, 1, tzinfo=utc)
    scan_end = dt.datetime(last_year + 1, 1, 1, tzinfo=utc) + dt.timedelta(days=2)
    changes: list[dt.datetime] = []
    step = dt.timedelta(days=1)
    instant = scan_start
    state = _zone_state(zone, instant)
    while instant < scan_end:
        following = instant + step
        next_state = _zone_state(zone, following)
        if next_state != state:
            low, high = instant, following  # state(low) == state, state(high) != state
            while high - low > dt.timedelta(seconds=1):
                middle = low + (high - low) / 2
                middle = middle.replace(microsecond=0)
                if _zone_state(zone, middle) == state:
                    low = middle
                else:
                    high = middle
            changes.append(high)
        instant, state = following, next_state

    def offset_before(change: dt.datetime) -> dt.timedelta:
        return (change - dt.timedelta(seconds=1)).astimezone(zone).utcoffset() or dt.timedelta()

    inside = [c for c in changes if c >= window_start]
    earlier = [c for c in changes if c < window_start]
    result: list[_Observance] = []
    if earlier:
        result.append(_observance_at(zone, earlier[-1], offset_before(earlier[-1])))
    else:
        # Constant since at least the start of the scan: one observance from
        # 1970 describes the time before the first change in the window.
        first = _observance_at(zone, scan_start, dt.timedelta())
        result.append(
            _Observance(_EPOCH, first.offset_to, first.offset_to, first.daylight, first.name)
        )
    result.extend(_observance_at(zone, c, offset_before(c)) for c in inside)
    return result


def vtimezone_lines(zone_name: str, first_year: int, last_year: int) -> list[str]:
    """A VTIMEZONE for `zone_name`, exact for the given years: one observance
    per offset change, each with its own DTSTART (no RRULE), which every
    client resolves the same way."""
    zone = zoneinfo.ZoneInfo(zone_name)
    lines = ["BEGIN:VTIMEZONE", f"TZID:{zone_name}"]
    for obs in _observances(zone, first_year, last_year):
        kind = "DAYLIGHT" if obs.daylight else "STANDARD"
        lines += [
            f"BEGIN:{kind}",
            f"DTSTART:{_local(obs.onset_local)}",
            f"TZOFFSETFROM:{_format_offset(obs.offset_from)}",
            f"TZOFFSETTO:{_format_offset(obs.offset_to)}",
        ]
        if obs.name:
            lines.append(f"TZNAME:{escape_text(obs.name)}")
        lines.append(f"END:{kind}")
    lines.append("END:VTIMEZONE")
    return lines


def to_ical(event: DesiredEvent, uid: str, *, stamp: dt.datetime) -> str:
    """The iCalendar object for `event` (rule 5.6: no alarm, no attendee, no
    description). `stamp` is the DTSTAMP, an aware datetime."""
    show_as: ShowAs = event.show_as
    lines: list[str] = ["BEGIN:VCALENDAR", f"PRODID:{PRODID}", "VERSION:2.0", "CALSCALE:GREGORIAN"]
    if event.all_day:
        start = f"DTSTART;VALUE=DATE:{event.start_date:%Y%m%d}"
        end = f"DTEND;VALUE=DATE:{event.end_date:%Y%m%d}"
    elif event.time_zone in _UTC_ZONES:
        start = f"DTSTART:{_local(event.start)}Z"
        end = f"DTEND:{_local(event.end)}Z"
    else:
        try:
            lines += vtimezone_lines(event.time_zone, event.start.year, event.end.year)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ProviderError(
                INVALID_EVENT, f"unknown time zone {event.time_zone!r}", retriable=False
            ) from exc
        tzid = _param_value(event.time_zone)
        start = f"DTSTART;TZID={tzid}:{_local(event.start)}"
        end = f"DTEND;TZID={tzid}:{_local(event.end)}"
    lines += [
        "BEGIN:VEVENT",
        f"UID:{escape_text(uid)}",
        f"DTSTAMP:{_local(stamp.astimezone(dt.UTC))}Z",
        start,
        end,
        f"SUMMARY:{escape_text(event.subject)}",
        f"TRANSP:{'TRANSPARENT' if show_as in _TRANSPARENT else 'OPAQUE'}",
        f"STATUS:{'TENTATIVE' if show_as == 'tentative' else 'CONFIRMED'}",
        f"CLASS:{'PRIVATE' if event.private else 'PUBLIC'}",
    ]
    if event.category:
        lines.append(f"CATEGORIES:{escape_text(event.category)}")
    lines += [
        f"X-MICROSOFT-CDO-BUSYSTATUS:{_BUSY_STATUS[show_as]}",
        f"{MARK_PROPERTY}:{escape_text(event.mark.value)}",
        "END:VEVENT",
        "END:VCALENDAR",
    ]
    return "".join(fold_line(line) for line in lines)


# --- iCalendar reading ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Property:
    params: dict[str, str]
    value: str


def _unfold(text: str) -> list[str]:
    lines: list[str] = []
    for raw in re.split(r"\r\n|\n|\r", text):
        if raw[:1] in (" ", "\t") and lines:
            lines[-1] += raw[1:]
        elif raw:
            lines.append(raw)
    return lines


def _content_line(line: str) -> tuple[str, dict[str, str], str] | None:
    quoted = False
    for index, char in enumerate(line):
        if char == '"':
            quoted = not quoted
        elif char == ":" and not quoted:
            head, value = line[:index], line[index + 1 :]
            break
    else:
        return None
    name, *raw_params = re.findall(r'(?:[^;"]|"[^"]*")+', head) or [""]
    params: dict[str, str] = {}
    for raw in raw_params:
        key, _, param = raw.partition("=")
        params[key.upper()] = param.strip('"')
    return name.upper(), params, value


def _vevents(text: str) -> list[dict[str, _Property]]:
    """The top-level properties of each VEVENT (first occurrence of each)."""
    events: list[dict[str, _Property]] = []
    stack: list[str] = []
    current: dict[str, _Property] | None = None
    for line in _unfold(text):
        parsed = _content_line(line)
        if parsed is None:
            continue
        name, params, value = parsed
        if name == "BEGIN":
            stack.append(value.upper())
            if stack[-1] == "VEVENT":
                current = {}
        elif name == "END":
            if stack and stack.pop() == "VEVENT" and current is not None:
                events.append(current)
                current = None
        elif current is not None and stack and stack[-1] == "VEVENT":
            current.setdefault(name, _Property(params, value))
    return events


def _parse_when(prop: _Property | None) -> dt.date | dt.datetime | None:
    if prop is None:
        return None
    value = prop.value.strip()
    try:
        if prop.params.get("VALUE", "").upper() == "DATE" or len(value) == 8:
            return dt.datetime.strptime(value, "%Y%m%d").date()  # noqa: DTZ007 - a date
        if value.endswith("Z"):
            return dt.datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        naive = dt.datetime.strptime(value, "%Y%m%dT%H%M%S")  # noqa: DTZ007 - zone below
    except ValueError:
        return None
    tzid = prop.params.get("TZID")
    if tzid:
        try:
            return naive.replace(tzinfo=zoneinfo.ZoneInfo(tzid))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            return naive
    return naive


class ListedEvent(TypedDict):
    """An event read back from a calendar, for display."""

    id: str
    uid: str | None
    summary: str | None
    dtstart: dt.date | dt.datetime | None
    dtend: dt.date | dt.datetime | None
    all_day: bool
    time_zone: str | None
    transp: str | None
    status: str | None
    classification: str | None
    categories: str | None
    busy_status: str | None
    mark: str | None


def _listed(event_id: str, props: dict[str, _Property]) -> ListedEvent:
    start = props.get("DTSTART")
    dtstart = _parse_when(start)
    return ListedEvent(
        id=event_id,
        uid=_text(props, "UID"),
        summary=_text(props, "SUMMARY"),
        dtstart=dtstart,
        dtend=_parse_when(props.get("DTEND")),
        all_day=dtstart is not None and not isinstance(dtstart, dt.datetime),
        time_zone=start.params.get("TZID") if start is not None else None,
        transp=_text(props, "TRANSP"),
        status=_text(props, "STATUS"),
        classification=_text(props, "CLASS"),
        categories=_text(props, "CATEGORIES"),
        busy_status=_text(props, "X-MICROSOFT-CDO-BUSYSTATUS"),
        mark=_text(props, MARK_PROPERTY),
    )


def _text(props: dict[str, _Property], name: str) -> str | None:
    prop = props.get(name)
    return unescape_text(prop.value) if prop is not None else None


# --- WebDAV XML -------------------------------------------------------------


def parse_xml(body: bytes) -> ET.Element:
    """Parse a server's XML answer. Document type declarations are refused,
    so no entity is ever expanded (no billion laughs, no external fetch)."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate(namespace_separator=" ")

    def name(raw: str) -> str:
        uri, _, local = raw.rpartition(" ")
        return f"{{{uri}}}{local}" if uri else local

    def refuse(*_args: object) -> None:
        raise ValueError("XML with a document type declaration is refused")

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartElementHandler = lambda tag, attrs: builder.start(
        name(tag), {name(k): v for k, v in attrs.items()}
    )
    parser.EndElementHandler = lambda tag: builder.end(name(tag))
    parser.CharacterDataHandler = builder.data
    parser.Parse(body, True)
    return builder.close()


_XML_HEAD = '<?xml version="1.0" encoding="utf-8"?>\n'
_NAMESPACES = f'xmlns:D="{_DAV}" xmlns:C="{_CALDAV}"'


def _calendar_query(prop_name: str | None, text: str | None) -> bytes:
    prop_filter = ""
    if prop_name is not None and text:
        prop_filter = (
            f"<C:prop-filter name={quoteattr(prop_name)}>"
            f'<C:text-match collation="i;octet">{xml_escape(text)}</C:text-match>'
            "</C:prop-filter>"
        )
    return (
        f"{_XML_HEAD}<C:calendar-query {_NAMESPACES}>"
        "<D:prop><D:getetag/><C:calendar-data/></D:prop>"
        '<C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT">'
        f"{prop_filter}</C:comp-filter></C:comp-filter></C:filter></C:calendar-query>"
    ).encode()


def _mkcalendar_body(mailbox: str) -> bytes:
    return (
        f"{_XML_HEAD}<C:mkcalendar {_NAMESPACES}><D:set><D:prop>"
        f"<D:displayname>{xml_escape(mailbox)}</D:displayname>"
        '<C:supported-calendar-component-set><C:comp name="VEVENT"/>'
        "</C:supported-calendar-component-set></D:prop></D:set></C:mkcalendar>"
    ).encode()


def _resource_name(href: str) -> str:
    return unquote(href.rstrip("/").rsplit("/", 1)[-1])


def _multistatus_items(body: bytes) -> list[tuple[str, str]]:
    """(resource name, calendar data) of each event in a 207 answer."""
    root = parse_xml(body)
    items: list[tuple[str, str]] = []
    for response in root.iter(f"{{{_DAV}}}response"):
        href = response.findtext(f"{{{_DAV}}}href")
        if not href or href.endswith("/"):
            continue
        for propstat in response.iter(f"{{{_DAV}}}propstat"):
            status = propstat.findtext(f"{{{_DAV}}}status") or ""
            data = propstat.find(f"{{{_DAV}}}prop/{{{_CALDAV}}}calendar-data")
            if data is not None and data.text and " 200" in status:
                items.append((_resource_name(href.strip()), data.text))
    return items


def _search_text(value: str) -> str:
    """The part of `value` a server can match whether or not it unescapes
    TEXT before comparing (Radicale does; others may not). The match is a
    substring test anyway, so callers re-check each hit exactly."""
    return _NEEDS_ESCAPE.split(value, maxsplit=1)[0]


# --- errors -----------------------------------------------------------------


def _safe_url(url: str) -> str:
    parsed = yarl.URL(url, encoded=True)
    return str(parsed.with_user(None)) if parsed.user or parsed.password else url


def translate_error(
    operation: str,
    method: str,
    url: str,
    *,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    exc: BaseException | None = None,
    timeout: float | None = None,
) -> ProviderError:
    """The engine's error for a failed request: every HTTP status and
    transport failure of this provider is classified here and only here.

    `operation` is the provider call (create, update, delete, find,
    list_events, ensure_calendar); a missing collection means "no such
    mailbox" only for calls that address the calendar itself."""
    where = f"{method} {_safe_url(url)}"
    if exc is not None:
        return _translate_exception(where, exc, timeout)
    assert status is not None
    headers = headers or {}
    detail = " ".join(body[:200].decode("utf-8", "replace").split())
    message = f"{where} answered {status}" + (f": {detail}" if detail else "")
    retry_after = parse_retry_after(headers.get("Retry-After"))
    if status == 401:
        return ProviderError(AUTH_FAILED, message, retriable=False)
    if status == 403:
        return ProviderError(ACCESS_DENIED, message, retriable=False)
    if status in (404, 409, 410) and operation in _CALENDAR_LOOKUPS:
        return ProviderError(
            MAILBOX_NOT_FOUND,
            message,
            retriable=False,
            hint=(
                "No calendar exists at this address. The employee's address in the HR "
                "system may differ from the calendar's, or the configuration's URL "
                "template does not match the server's layout."
            ),
        )
    if status == 429 or (status == 503 and retry_after is not None):
        return ProviderError(THROTTLED, message, retriable=True, retry_after=retry_after)
    if status == 408 or status >= 500:
        return ProviderError(PROVIDER_ERROR, message, retriable=True, retry_after=retry_after)
    if status in (400, 413, 415, 422) and operation in _WRITES:
        return ProviderError(INVALID_EVENT, message, retriable=False)
    if 300 <= status < 400:
        location = headers.get("Location", "another address")
        return ProviderError(
            PROVIDER_ERROR,
            message,
            retriable=False,
            hint=f"The server redirects to {location}: put the final address in the URL template.",
        )
    return ProviderError(PROVIDER_ERROR, message, retriable=False)


def _translate_exception(where: str, exc: BaseException, timeout: float | None) -> ProviderError:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
        return ProviderError(TLS_UNTRUSTED_CERTIFICATE, f"{where}: {exc}", retriable=False)
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return ProviderError(
            SERVER_UNREACHABLE,
            f"{where}: TLS handshake failed: {exc}",
            retriable=True,
            hint="Check that the URL's host and port serve HTTPS; retried automatically.",
        )
    if isinstance(exc, TimeoutError):
        limit = f" after {timeout:g} s" if timeout else ""
        return ProviderError(SERVER_UNREACHABLE, f"{where}: timed out{limit}", retriable=True)
    if isinstance(exc, aiohttp.InvalidURL | ValueError):
        return ProviderError(
            PROVIDER_ERROR,
            f"{where}: invalid URL: {exc}",
            retriable=False,
            hint="Check the configuration's CalDAV URL template.",
        )
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return ProviderError(SERVER_UNREACHABLE, f"{where}: {exc}", retriable=True)
    return ProviderError(PROVIDER_ERROR, f"{where}: {type(exc).__name__}: {exc}", retriable=True)


# --- the provider -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _uid_conflict(response: _Response) -> bool:
    """RFC 4791 5.3.2.1: the calendar already holds this UID in another resource."""
    return response.status == 409 and b"no-uid-conflict" in response.body


class CalDAVProvider(Provider):
    """Writes events into `<url template with {email}>` collections.

    Safe for concurrent calls: all requests share one aiohttp session,
    opened on first use and closed by `close()`."""

    kind: ClassVar[str] = "caldav"

    def __init__(
        self,
        url_template: str,
        context: ProviderContext,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.url_template = url_template
        self._ssl_context = context.ssl_context
        self._timeout = context.settings.request_timeout_seconds
        self._headers: dict[str, str] = {}
        if username is not None and password is not None:
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, config: SyncConfig, context: ProviderContext) -> CalDAVProvider:
        url = config.provider_settings.get("url")
        if not isinstance(url, str) or not url:
            raise ProviderError(
                PROVIDER_ERROR,
                f"configuration {config.id} has no caldav.url",
                retriable=False,
                hint="Set caldav.url, e.g. https://dav.example.com/{email}/calendar/.",
            )
        username = config.provider_settings.get("username", config.secrets.get("username"))
        return cls(
            url,
            context,
            username=str(username) if username is not None else None,
            password=config.secrets.get("password"),
        )

    def calendar_url(self, mailbox: str) -> str:
        """The employee's calendar collection, always ending in '/'."""
        url = self.url_template.replace("{email}", quote(mailbox, safe="@"))
        return url if url.endswith("/") else url + "/"

    def _event_url(self, mailbox: str, event_id: str) -> str:
        return self.calendar_url(mailbox) + quote(event_id, safe="@")

    def _session_for_request(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl_context),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers=self._headers,
            )
        return self._session

    async def _send(
        self,
        operation: str,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> _Response:
        session = self._session_for_request()
        try:
            async with session.request(
                method,
                yarl.URL(url, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
            ) as response:
                payload = await response.read()
                return _Response(response.status, response.headers, payload)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise translate_error(operation, method, url, exc=exc, timeout=self._timeout) from exc

    def _failure(self, operation: str, method: str, url: str, response: _Response) -> ProviderError:
        return translate_error(
            operation,
            method,
            url,
            status=response.status,
            headers=response.headers,
            body=response.body,
        )

    async def _put_event(
        self, operation: str, url: str, event: DesiredEvent, uid: str, precondition: dict[str, str]
    ) -> _Response:
        ics = to_ical(event, uid, stamp=dt.datetime.now(dt.UTC))
        headers = {"Content-Type": "text/calendar; charset=utf-8", **precondition}
        return await self._send(operation, "PUT", url, headers=headers, body=ics.encode("utf-8"))

    async def create(self, event: DesiredEvent, *, transaction_id: str) -> str:
        uid = event_uid(transaction_id)
        event_id = f"{uid}.ics"
        url = self._event_url(event.mailbox, event_id)
        response = await self._put_event("create", url, event, uid, {"If-None-Match": "*"})
        if response.ok or response.status == 412:
            # 412: the resource exists, which only our own earlier attempt
            # with this transaction id can have made.
            return event_id
        if _uid_conflict(response):
            # The UID lives under another resource name (moved by a client).
            found = await self._query(event.mailbox, "UID", uid, operation="create")
            for name, data in found:
                if any(_text(props, "UID") == uid for props in _vevents(data)):
                    return name
        raise self._failure("create", "PUT", url, response)

    async def update(self, mailbox: str, event_id: str, event: DesiredEvent) -> str:
        url = self._event_url(mailbox, event_id)
        uid = event_id.removesuffix(".ics")
        response = await self._put_event("update", url, event, uid, {"If-Match": "*"})
        if _uid_conflict(response):
            # The resource holds another UID than its name says (a client
            # rewrote it): keep that UID, the server refuses to change it.
            uid = await self._stored_uid(url)
            response = await self._put_event("update", url, event, uid, {"If-Match": "*"})
        if response.ok:
            return event_id
        if response.status in (404, 410, 412):
            raise EventGone(f"{_safe_url(url)} no longer exists")
        if response.status == 409 and not _uid_conflict(response):
            raise EventGone(f"the calendar holding {_safe_url(url)} no longer exists")
        raise self._failure("update", "PUT", url, response)

    async def _stored_uid(self, url: str) -> str:
        response = await self._send("update", "GET", url)
        if response.status in (404, 410):
            raise EventGone(f"{_safe_url(url)} no longer exists")
        if not response.ok:
            raise self._failure("update", "GET", url, response)
        for props in _vevents(response.body.decode("utf-8", "replace")):
            uid = _text(props, "UID")
            if uid:
                return uid
        raise ProviderError(
            PROVIDER_ERROR, f"GET {_safe_url(url)}: the event has no UID", retriable=False
        )

    async def delete(self, mailbox: str, event_id: str) -> bool:
        url = self._event_url(mailbox, event_id)
        response = await self._send("delete", "DELETE", url)
        if response.ok:
            return True
        if response.status in (404, 410):
            return False
        raise self._failure("delete", "DELETE", url, response)

    async def _query(
        self, mailbox: str, prop_name: str | None, value: str | None, *, operation: str
    ) -> list[tuple[str, str]]:
        """REPORT calendar-query narrowed by a text-match on `prop_name`.
        Falls back to all events when the server rejects the filter; the
        caller checks each hit exactly."""
        url = self.calendar_url(mailbox)
        headers = {"Depth": "1", "Content-Type": "application/xml; charset=utf-8"}
        text = _search_text(value) if value is not None else None
        response = await self._send(
            operation, "REPORT", url, headers=headers, body=_calendar_query(prop_name, text)
        )
        if text and (
            response.status in (400, 501)
            or (response.status == 403 and b"supported-filter" in response.body)
        ):
            response = await self._send(
                operation, "REPORT", url, headers=headers, body=_calendar_query(None, None)
            )
        if response.status != 207:
            raise self._failure(operation, "REPORT", url, response)
        try:
            return _multistatus_items(response.body)
        except (ValueError, expat.ExpatError) as exc:
            raise ProviderError(
                PROVIDER_ERROR,
                f"REPORT {_safe_url(url)}: unreadable answer: {exc}",
                retriable=True,
            ) from exc

    async def find(self, mailbox: str, mark: Mark) -> list[str]:
        """Events carrying any form of `mark` (current, or as written before
        ids were encoded): one query per form, each hit checked exactly."""
        values = mark.values
        names: set[str] = set()
        for value in values:
            found = await self._query(mailbox, MARK_PROPERTY, value, operation="find")
            names.update(
                name
                for name, data in found
                if any(_text(props, MARK_PROPERTY) in values for props in _vevents(data))
            )
        return sorted(names)

    async def list_events(self, mailbox: str) -> list[ListedEvent]:
        """Every event of the employee's calendar as read back from the
        server, ordered by start; for the demo and for tests."""
        found = await self._query(mailbox, None, None, operation="list_events")
        events = [_listed(name, props) for name, data in found for props in _vevents(data)]
        return sorted(events, key=lambda e: (str(e["dtstart"]), e["id"]))

    async def ensure_calendar(self, mailbox: str) -> None:
        """Create the employee's calendar (and its parent collection) unless it
        exists. For the embedded demo server: the sync path never creates
        calendars, a missing one is `mailbox_not_found`."""
        url = self.calendar_url(mailbox)
        probe = await self._send("ensure_calendar", "PROPFIND", url, headers={"Depth": "0"})
        if probe.status == 207:
            return
        if probe.status != 404:
            raise self._failure("ensure_calendar", "PROPFIND", url, probe)
        body = _mkcalendar_body(mailbox)
        headers = {"Content-Type": "application/xml; charset=utf-8"}
        made = await self._send("ensure_calendar", "MKCALENDAR", url, headers=headers, body=body)
        if made.status == 409:
            parent = url.rstrip("/").rsplit("/", 1)[0] + "/"
            col = await self._send("ensure_calendar", "MKCOL", parent)
            if not col.ok and col.status != 405:
                raise self._failure("ensure_calendar", "MKCOL", parent, col)
            made = await self._send(
                "ensure_calendar", "MKCALENDAR", url, headers=headers, body=body
            )
        if not made.ok:
            raise self._failure("ensure_calendar", "MKCALENDAR", url, made)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
