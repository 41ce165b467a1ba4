"""CalDAV helpers for the demo and the tests, outside the sync path.

The production provider never creates calendars (a missing one is
`mailbox_not_found`) and never lists them; the embedded demo and the tests
need both, through the same provider and its HTTP boundary.
"""

from __future__ import annotations

import datetime as dt
from typing import TypedDict
from xml.sax.saxutils import escape as xml_escape

from consumer.providers.caldav import (
    MARK_PROPERTY,
    NAMESPACES,
    CalDAVProvider,
    caldav_error,
    text_of,
    vevents,
)


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


async def ensure_calendar(caldav: CalDAVProvider, mailbox: str) -> None:
    """Create the employee's calendar (and its parent collection) unless it exists."""
    url = caldav.calendar_url(mailbox)
    probe = await caldav.request("ensure_calendar", "PROPFIND", url, headers={"Depth": "0"})
    if probe.status == 207:
        return
    if probe.status != 404:
        raise caldav_error("ensure_calendar", "PROPFIND", url, probe)
    body = (
        f'<?xml version="1.0" encoding="utf-8"?>\n<C:mkcalendar {NAMESPACES}><D:set><D:prop>'
        f"<D:displayname>{xml_escape(mailbox)}</D:displayname>"
        '<C:supported-calendar-component-set><C:comp name="VEVENT"/>'
        "</C:supported-calendar-component-set></D:prop></D:set></C:mkcalendar>"
    ).encode()
    headers = {"Content-Type": "application/xml; charset=utf-8"}
    made = await caldav.request("ensure_calendar", "MKCALENDAR", url, headers=headers, body=body)
    if made.status == 409:
        parent = url.rstrip("/").rsplit("/", 1)[0] + "/"
        col = await caldav.request("ensure_calendar", "MKCOL", parent)
        if not col.ok and col.status != 405:
            raise caldav_error("ensure_calendar", "MKCOL", parent, col)
        made = await caldav.request("ensure_calendar", "MKCALENDAR", url, headers=headers,
                                    body=body)
    if not made.ok:
        raise caldav_error("ensure_calendar", "MKCALENDAR", url, made)


async def list_events(caldav: CalDAVProvider, mailbox: str) -> list[ListedEvent]:
    """Every event of the employee's calendar as read back from the server,
    ordered by start."""
    found = await caldav.query(mailbox, None, None, operation="list_events")
    listed: list[ListedEvent] = []
    for name, data in found:
        for vevent in vevents(data):
            start = vevent.get("DTSTART")
            end = vevent.get("DTEND")
            dtstart = start.dt if start is not None else None
            listed.append(ListedEvent(
                id=name,
                uid=text_of(vevent, "UID"),
                summary=text_of(vevent, "SUMMARY"),
                dtstart=dtstart,
                dtend=end.dt if end is not None else None,
                all_day=dtstart is not None and not isinstance(dtstart, dt.datetime),
                time_zone=start.params.get("TZID") if start is not None else None,
                transp=text_of(vevent, "TRANSP"),
                status=text_of(vevent, "STATUS"),
                classification=text_of(vevent, "CLASS"),
                categories=text_of(vevent, "CATEGORIES"),
                busy_status=text_of(vevent, "X-MICROSOFT-CDO-BUSYSTATUS"),
                mark=text_of(vevent, MARK_PROPERTY),
            ))
    return sorted(listed, key=lambda e: (str(e["dtstart"]), e["id"]))
