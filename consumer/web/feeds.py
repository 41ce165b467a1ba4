"""`GET /feeds/{token}.ics`: the iCalendar feeds of `ics` configurations.

The token in the path is the only credential (calendar clients cannot send
headers); it is looked up by its SHA-256. An unknown or revoked token, and a
configuration that is gone or no longer `ics`, are all answered the same
404. The feed is computed from the database at request time; its ETag comes
from its inputs, so `If-None-Match` is answered 304 before anything is
rendered. Rendering runs in a worker thread, a few feeds at a time, so a
large team feed never stalls the event loop (intake, dispatch, probes).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from aiohttp import web

from consumer import feeds, logs, store
from consumer.events import InvalidEvent, absence_from_data
from consumer.store import admin as admin_store
from consumer.store import feeds as feed_store
from consumer.web import STATE

log = logs.get("feeds")
#: feeds rendered at once per worker; more wait their turn
RENDER_SLOTS = 2
_SLOTS = web.AppKey("feed_slots", asyncio.Semaphore)
_HEADERS = {
    "Cache-Control": "private, no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _not_found() -> web.Response:
    return web.Response(status=404, text="No such feed: the link is unknown or was revoked.\n",
                        headers=_HEADERS)


def _build(
    spec: feeds.FeedSpec,
    keys: list[feeds.FeedKey],
    known: dict[str, feeds.FeedEvent | None],
    data: dict[str, dict[str, Any]],
    window: feeds.Window,
) -> bytes:
    """Parse the absences the memo lacked, then build the feed (in a worker thread)."""
    absences = {}
    for absence_id, doc in data.items():
        try:
            absences[absence_id] = absence_from_data(spec.config.tenant, False, doc)
        except (InvalidEvent, ValueError, OverflowError, KeyError, TypeError):
            continue  # no longer valid (say its zone left the database): not shown
    return feeds.build(spec, keys, known, absences, window)


async def feed(request: web.Request) -> web.StreamResponse:
    token = request.match_info["token"]
    if not feeds.looks_like_feed_token(token):
        return _not_found()
    pool = request.app[STATE].pool
    try:
        row = await feed_store.use_feed(pool, feeds.feed_token_hash(token))
        stored = (
            await admin_store.tenant_config(pool, row.tenant, row.config_id)
            if row is not None else None
        )
        if row is None or stored is None or stored.config.provider != "ics":
            return _not_found()
        spec = feeds.FeedSpec(
            feed_id=row.id,
            name=feeds.feed_name(row.name, employee=row.employee, config_id=row.config_id),
            employee=row.employee,
            config=stored.config,
            revision=stored.revision,
            config_updated_at=stored.updated_at,
        )
        window = feeds.Window.around(dt.datetime.now(dt.UTC).date())
        scope = feed_store.FeedScope(
            stored.config.tenant, row.employee, window.start, stored.config.establishments
        )
        async with feed_store.feed_snapshot(pool, scope) as snapshot:
            tag = feeds.etag(spec, window, await snapshot.fingerprint())
            if feeds.etag_matches(request.headers.get("If-None-Match"), tag):
                return web.Response(status=304, headers={**_HEADERS, "ETag": tag})
            keys = [feeds.FeedKey(*k) for k in await snapshot.keys()]
            known, missing = await asyncio.to_thread(feeds.lookup, spec, keys)
            data = await snapshot.data([k.id for k in missing])
    except Exception as exc:
        if not store.is_unavailable(exc):
            raise
        log.warning("feed not served: PostgreSQL unavailable", error_type=type(exc).__name__)
        return web.Response(status=503, text="Temporarily unavailable; try again.\n",
                            headers={**_HEADERS, "Retry-After": "60"})
    async with request.app[_SLOTS]:
        body = await asyncio.to_thread(_build, spec, keys, known, data, window)
    return web.Response(
        body=body,
        headers={
            **_HEADERS,
            "Content-Type": "text/calendar; charset=utf-8",
            "Content-Disposition": 'inline; filename="absences.ics"',
            "ETag": tag,
        },
    )


def setup(app: web.Application) -> None:
    app[_SLOTS] = asyncio.Semaphore(RENDER_SLOTS)
    app.router.add_get("/feeds/{token}.ics", feed)

