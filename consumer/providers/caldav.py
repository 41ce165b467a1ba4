"""The CalDAV provider (docs/configuration.md, 'caldav'): any CalDAV server, basic auth, one
calendar collection per employee found through a URL template.

Each event is one iCalendar object in its own resource, named after a UID
derived from the transaction id. That makes `create` idempotent without any
server support beyond `If-None-Match: *`: a retried create targets the same
resource, and the server's 412 says it is already there.

The provider's event id is the resource name inside the employee's calendar
(`absence-sync-<hash>.ics`), not a full URL, so ids survive a change of the
server's host name. `find` returns the names of the resources it finds.

iCalendar is written and read with `icalendar` (which also generates the
VTIMEZONE, exact for the years the event spans), WebDAV XML is read with
`defusedxml` (no document type, so no entity expansion). HTTP goes through
the provider boundary (`consumer.providers.base`); this module adds only
what CalDAV means by a status. Creating calendars and listing events are
for the demo and tests: `consumer.caldav_tools`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import xml.etree.ElementTree as ET
import zoneinfo
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, unquote
from xml.sax.saxutils import escape as xml_escape
from xml.sax.saxutils import quoteattr

import aiohttp
import defusedxml.ElementTree as SafeET
import icalendar
import yarl
from defusedxml import DefusedXmlException
from icalendar.parser import unescape_backslash

from consumer.providers.base import (
    INVALID_EVENT,
    MAILBOX_NOT_FOUND,
    PROVIDER_ERROR,
    EventGone,
    Provider,
    ProviderContext,
    ProviderError,
    Reply,
    https_session,
    parse_retry_after,
    read_reply,
    status_error,
    transport_error,
)

if TYPE_CHECKING:
    from consumer.config import SyncConfig
    from consumer.render import DesiredEvent, Mark

__all__ = ["CalDAVProvider", "event_uid", "parse_retry_after", "parse_xml", "to_ical"]

PRODID = "-//absence-sync//EN"
MARK_PROPERTY = "X-ABSENCE-SYNC-MARK"
UID_PREFIX = "absence-sync-"

DAV = "DAV:"
CALDAV = "urn:ietf:params:xml:ns:caldav"
_UTC_ZONES = frozenset(
    {"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu"}
)
_BUSY_STATUS = {
    "free": "FREE", "tentative": "TENTATIVE", "busy": "BUSY", "oof": "OOF",
    "workingElsewhere": "WORKINGELSEWHERE",
}
_TRANSPARENT = frozenset({"free", "workingElsewhere"})
_NEEDS_ESCAPE = re.compile(r"[\\;,\r\n]")
_WRITES = frozenset({"create", "update"})
# calls that address the calendar itself: a missing collection means no such mailbox
CALENDAR_LOOKUPS = frozenset({"create", "find", "list_events"})


# --- iCalendar --------------------------------------------------------------


def event_uid(transaction_id: str) -> str:
    """The UID, and resource name stem, for the event a transaction creates."""
    return UID_PREFIX + hashlib.sha256(transaction_id.encode("utf-8")).hexdigest()[:32]


def to_ical(event: DesiredEvent, uid: str, *, stamp: dt.datetime) -> str:
    """The iCalendar object for `event` (rule 5.6: no alarm, no attendee, no
    description). `stamp` is the DTSTAMP, an aware datetime."""
    calendar = icalendar.Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    calendar.add("calscale", "GREGORIAN")
    vevent = icalendar.Event()
    vevent.add("uid", uid)
    vevent.add("dtstamp", stamp.astimezone(dt.UTC))
    if event.all_day:
        vevent.add("dtstart", event.start_date)
        vevent.add("dtend", event.end_date)
    elif event.time_zone in _UTC_ZONES:
        vevent.add("dtstart", event.start.replace(tzinfo=dt.UTC))
        vevent.add("dtend", event.end.replace(tzinfo=dt.UTC))
    else:
        try:
            zone = zoneinfo.ZoneInfo(event.time_zone)
            calendar.add_component(icalendar.Timezone.from_tzinfo(
                zone, event.time_zone,
                first_date=dt.date(event.start.year, 1, 1) - dt.timedelta(days=2),
                last_date=dt.date(event.end.year + 1, 1, 1),
            ))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ProviderError(
                INVALID_EVENT, f"unknown time zone {event.time_zone!r}", retriable=False
            ) from exc
        vevent.add("dtstart", event.start.replace(tzinfo=zone))
        vevent.add("dtend", event.end.replace(tzinfo=zone))
    show_as = event.show_as
    vevent.add("summary", event.subject)
    vevent.add("transp", "TRANSPARENT" if show_as in _TRANSPARENT else "OPAQUE")
    vevent.add("status", "TENTATIVE" if show_as == "tentative" else "CONFIRMED")
    vevent.add("class", "PRIVATE" if event.private else "PUBLIC")
    if event.category:
        vevent.add("categories", [event.category])
    vevent.add("x-microsoft-cdo-busystatus", _BUSY_STATUS[show_as])
    vevent.add(MARK_PROPERTY, icalendar.vText(event.mark.value))
    calendar.add_component(vevent)
    return str(calendar.to_ical().decode("utf-8"))


def vevents(data: str) -> list[icalendar.Event]:
    """The VEVENTs of a calendar object a server returned; none when unreadable."""
    try:
        return [c for c in icalendar.Calendar.from_ical(data).walk("VEVENT")]  # type: ignore[misc]
    except (ValueError, KeyError, IndexError, TypeError):
        return []


def text_of(vevent: icalendar.Event, name: str) -> str | None:
    """A property's text, unescaped; None when absent."""
    value = vevent.get(name)
    if value is None:
        return None
    if isinstance(value, list):  # a property given more than once: the first counts
        value = value[0]
    if isinstance(value, icalendar.prop.vCategory):
        return ",".join(str(c) for c in value.cats)
    if isinstance(value, icalendar.prop.vUnknown):  # an X- property: TEXT, still escaped
        return str(unescape_backslash(str(value)))
    return str(value)


# --- WebDAV XML -------------------------------------------------------------


def parse_xml(body: bytes) -> ET.Element:
    """Parse a server's XML answer. Document type declarations are refused,
    so no entity is ever expanded (no billion laughs, no external fetch)."""
    try:
        root: ET.Element = SafeET.fromstring(body, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise ValueError("XML with a document type declaration is refused") from exc
    return root


_XML_HEAD = '<?xml version="1.0" encoding="utf-8"?>\n'
NAMESPACES = f'xmlns:D="{DAV}" xmlns:C="{CALDAV}"'


def _calendar_query(prop_name: str | None, text: str | None) -> bytes:
    prop_filter = ""
    if prop_name is not None and text:
        prop_filter = (
            f"<C:prop-filter name={quoteattr(prop_name)}>"
            f'<C:text-match collation="i;octet">{xml_escape(text)}</C:text-match>'
            "</C:prop-filter>"
        )
    return (
        f"{_XML_HEAD}<C:calendar-query {NAMESPACES}>"
        "<D:prop><D:getetag/><C:calendar-data/></D:prop>"
        '<C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT">'
        f"{prop_filter}</C:comp-filter></C:comp-filter></C:filter></C:calendar-query>"
    ).encode()


def _multistatus_items(body: bytes) -> list[tuple[str, str]]:
    """(resource name, calendar data) of each event in a 207 answer."""
    root = parse_xml(body)
    items: list[tuple[str, str]] = []
    for response in root.iter(f"{{{DAV}}}response"):
        href = response.findtext(f"{{{DAV}}}href")
        if not href or href.endswith("/"):
            continue
        for propstat in response.iter(f"{{{DAV}}}propstat"):
            status = propstat.findtext(f"{{{DAV}}}status") or ""
            data = propstat.find(f"{{{DAV}}}prop/{{{CALDAV}}}calendar-data")
            if data is not None and data.text and " 200" in status:
                name = unquote(href.strip().rstrip("/").rsplit("/", 1)[-1])
                items.append((name, data.text))
    return items


def _search_text(value: str) -> str:
    """The part of `value` a server can match whether or not it unescapes
    TEXT before comparing (Radicale does; others may not). The match is a
    substring test anyway, so callers re-check each hit exactly."""
    return _NEEDS_ESCAPE.split(value, maxsplit=1)[0]


# --- errors -----------------------------------------------------------------


def safe_url(url: str) -> str:
    parsed = yarl.URL(url, encoded=True)
    return str(parsed.with_user(None)) if parsed.user or parsed.password else url


def _vendor(operation: str) -> Any:
    """What CalDAV means by a status, for the boundary's ladder: a missing
    collection is no such mailbox for calls that address the calendar; a 4xx
    on a read is not an invalid event."""

    def hook(reply: Reply, message: str) -> ProviderError | None:
        status = reply.status
        if status in (404, 409, 410) and operation in CALENDAR_LOOKUPS:
            return ProviderError(
                MAILBOX_NOT_FOUND, message, retriable=False,
                hint="No calendar exists at this address. The employee's address in the HR "
                "system may differ from the calendar's, or the configuration's URL template "
                "does not match the server's layout.",
            )
        if status in (400, 413, 415, 422) and operation not in _WRITES:
            return ProviderError(PROVIDER_ERROR, message, retriable=False)
        return None

    return hook


def caldav_error(operation: str, method: str, url: str, reply: Reply) -> ProviderError:
    """The engine's error for a failed CalDAV answer (`operation` is the
    provider call: create, update, delete, find, or a tool's)."""
    detail = reply.text
    message = f"{method} {safe_url(url)} answered {reply.status}" + (
        f": {detail}" if detail else ""
    )
    return status_error(reply, message, _vendor(operation))


def _uid_conflict(reply: Reply) -> bool:
    """RFC 4791 5.3.2.1: the calendar already holds this UID in another resource."""
    return reply.status == 409 and b"no-uid-conflict" in reply.body


# --- the provider -----------------------------------------------------------


class CalDAVProvider(Provider):
    """Writes events into `<url template with {email}>` collections.

    Safe for concurrent calls: all requests share one HTTP session (the
    boundary's), opened on first use and closed by `close()`."""

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
        self._context = context
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

    async def request(
        self,
        operation: str,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Reply:
        """One request (no redirect followed); transport failures come back as
        `ProviderError`s, HTTP statuses as they are."""
        if self._session is None or self._session.closed:
            self._session = https_session(self._context, headers=self._headers)
        try:
            async with self._session.request(
                method, yarl.URL(url, encoded=True), headers=dict(headers or {}), data=body,
                allow_redirects=False,
            ) as response:
                return await read_reply(response)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            where = f"{method} {safe_url(url)}"
            error = transport_error(exc, where=where, timeout=self._timeout)
            if error is None:  # a ValueError aiohttp raises for a URL it cannot use
                error = ProviderError(PROVIDER_ERROR, f"{where}: invalid URL: {exc}",
                                      retriable=False,
                                      hint="Check the configuration's CalDAV URL template.")
            raise error from exc

    async def _put_event(
        self, operation: str, url: str, event: DesiredEvent, uid: str, precondition: dict[str, str]
    ) -> Reply:
        ics = to_ical(event, uid, stamp=dt.datetime.now(dt.UTC))
        headers = {"Content-Type": "text/calendar; charset=utf-8", **precondition}
        return await self.request(operation, "PUT", url, headers=headers,
                                  body=ics.encode("utf-8"))

    async def create(self, event: DesiredEvent, *, transaction_id: str) -> str:
        uid = event_uid(transaction_id)
        event_id = f"{uid}.ics"
        url = self._event_url(event.mailbox, event_id)
        reply = await self._put_event("create", url, event, uid, {"If-None-Match": "*"})
        if reply.ok or reply.status == 412:
            # 412: the resource exists, which only our own earlier attempt
            # with this transaction id can have made.
            return event_id
        if _uid_conflict(reply):
            # The UID lives under another resource name (moved by a client).
            for name, data in await self.query(event.mailbox, "UID", uid, operation="create"):
                if any(text_of(v, "UID") == uid for v in vevents(data)):
                    return name
        raise caldav_error("create", "PUT", url, reply)

    async def update(self, mailbox: str, event_id: str, event: DesiredEvent) -> str:
        url = self._event_url(mailbox, event_id)
        uid = event_id.removesuffix(".ics")
        reply = await self._put_event("update", url, event, uid, {"If-Match": "*"})
        if _uid_conflict(reply):
            # The resource holds another UID than its name says (a client
            # rewrote it): keep that UID, the server refuses to change it.
            uid = await self._stored_uid(url)
            reply = await self._put_event("update", url, event, uid, {"If-Match": "*"})
        if reply.ok:
            return event_id
        if reply.status in (404, 410, 412):
            raise EventGone(f"{safe_url(url)} no longer exists")
        if reply.status == 409 and not _uid_conflict(reply):
            raise EventGone(f"the calendar holding {safe_url(url)} no longer exists")
        raise caldav_error("update", "PUT", url, reply)

    async def _stored_uid(self, url: str) -> str:
        reply = await self.request("update", "GET", url)
        if reply.status in (404, 410):
            raise EventGone(f"{safe_url(url)} no longer exists")
        if not reply.ok:
            raise caldav_error("update", "GET", url, reply)
        for vevent in vevents(reply.body.decode("utf-8", "replace")):
            uid = text_of(vevent, "UID")
            if uid:
                return uid
        raise ProviderError(
            PROVIDER_ERROR, f"GET {safe_url(url)}: the event has no UID", retriable=False
        )

    async def delete(self, mailbox: str, event_id: str) -> bool:
        url = self._event_url(mailbox, event_id)
        reply = await self.request("delete", "DELETE", url)
        if reply.ok:
            return True
        if reply.status in (404, 410):
            return False
        raise caldav_error("delete", "DELETE", url, reply)

    async def query(
        self, mailbox: str, prop_name: str | None, value: str | None, *, operation: str
    ) -> list[tuple[str, str]]:
        """REPORT calendar-query narrowed by a text-match on `prop_name`:
        (resource name, calendar data) of each hit. Falls back to all events
        when the server rejects the filter; callers check each hit exactly."""
        url = self.calendar_url(mailbox)
        headers = {"Depth": "1", "Content-Type": "application/xml; charset=utf-8"}
        text = _search_text(value) if value is not None else None
        reply = await self.request(
            operation, "REPORT", url, headers=headers, body=_calendar_query(prop_name, text)
        )
        if text and (
            reply.status in (400, 501)
            or (reply.status == 403 and b"supported-filter" in reply.body)
        ):
            reply = await self.request(
                operation, "REPORT", url, headers=headers, body=_calendar_query(None, None)
            )
        if reply.status != 207:
            raise caldav_error(operation, "REPORT", url, reply)
        try:
            return _multistatus_items(reply.body)
        except (ValueError, ET.ParseError) as exc:
            raise ProviderError(
                PROVIDER_ERROR, f"REPORT {safe_url(url)}: unreadable answer: {exc}",
                retriable=True,
            ) from exc

    async def find(self, mailbox: str, mark: Mark) -> list[str]:
        """Events carrying any form of `mark` (current, or as written before
        ids were encoded): one query per form, each hit checked exactly."""
        values = mark.values
        names: set[str] = set()
        for value in values:
            found = await self.query(mailbox, MARK_PROPERTY, value, operation="find")
            names.update(
                name for name, data in found
                if any(text_of(v, MARK_PROPERTY) in values for v in vevents(data))
            )
        return sorted(names)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
