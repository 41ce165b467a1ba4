"""The CalDAV provider against a real Radicale over HTTPS (a `trustme` CA),
plus an HTTPS double for the answers Radicale never gives (429, 503, 5xx,
a server that rejects prop-filter, a slow server)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import itertools
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from xml.sax.saxutils import escape

import aiohttp
import pytest
import trustme
import vobject
from aiohttp import web

from consumer import caldav_tools
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
    make_ssl_context,
)
from consumer.providers.caldav import (
    CalDAVProvider,
    event_uid,
    parse_retry_after,
    parse_xml,
    to_ical,
)
from consumer.radicale_server import RadicaleError, RadicaleServer, free_port
from consumer.render import Mark
from consumer.settings import Settings
from tests.provider_contract import ProviderContract, desired, legacy

USER = "absence-sync"
PASSWORD = "s3cret;pass"
STAMP = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
_boxes = itertools.count()


# --- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="session")
def server_cert(ca: trustme.CA, tls_dir: Path) -> tuple[Path, Path]:
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tls_dir / "server.pem", tls_dir / "server.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.fixture(scope="session")
def settings(ca: trustme.CA, tls_dir: Path) -> Settings:
    bundle = tls_dir / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return Settings(ca_bundle=bundle, request_timeout_seconds=10)


@pytest.fixture(scope="session")
def context(settings: Settings) -> ProviderContext:
    return ProviderContext(settings, make_ssl_context(settings))


@pytest.fixture(scope="session")
def radicale(
    tmp_path_factory: pytest.TempPathFactory, server_cert: tuple[Path, Path]
) -> Iterator[RadicaleServer]:
    cert, key = server_cert
    with RadicaleServer.start(
        tmp_path_factory.mktemp("radicale"), users={USER: PASSWORD}, cert=cert, key=key
    ) as server:
        yield server


def _provider(
    url: str, context: ProviderContext, password: str | None = PASSWORD
) -> CalDAVProvider:
    return CalDAVProvider(url + "{email}/calendar/", context, username=USER, password=password)


@pytest.fixture
async def provider(
    radicale: RadicaleServer, context: ProviderContext
) -> AsyncIterator[CalDAVProvider]:
    caldav = _provider(radicale.url, context)
    yield caldav
    await caldav.close()


@pytest.fixture
async def mailbox(provider: CalDAVProvider) -> str:
    address = f"user{next(_boxes)}@example.com"
    await caldav_tools.ensure_calendar(provider, address)
    return address


@pytest.fixture
def missing_mailbox() -> str:
    return f"nobody{next(_boxes)}@elsewhere.test"


class TestCalDAVProvider(ProviderContract):
    """The shared contract, against Radicale."""


# --- iCalendar rendering ----------------------------------------------------


def _lines(text: str) -> list[str]:
    """Unfolded content lines."""
    assert text.endswith("\r\n")
    assert "\n" not in text.replace("\r\n", "")
    return text.replace("\r\n ", "").split("\r\n")[:-1]


def _vevent_value(text: str, name: str) -> str:
    found = [line.split(":", 1)[1] for line in _lines(text) if line.split(":")[0] == name]
    assert len(found) == 1, (name, found)
    return found[0]


def test_all_day_event_uses_dates_with_exclusive_end() -> None:
    text = to_ical(desired("a@example.com"), "uid-1", stamp=STAMP)
    lines = _lines(text)
    assert "DTSTART;VALUE=DATE:20261201" in lines
    assert "DTEND;VALUE=DATE:20261204" in lines
    assert "BEGIN:VTIMEZONE" not in lines
    assert lines[0] == "BEGIN:VCALENDAR"
    assert {"PRODID:-//absence-sync//EN", "VERSION:2.0"} <= set(lines[1:4])
    assert "UID:uid-1" in lines
    assert "DTSTAMP:20260102T030405Z" in lines
    assert "X-ABSENCE-SYNC-MARK:absence-sync:cfg-1:abs-1" in lines
    for forbidden in ("VALARM", "ATTENDEE", "DESCRIPTION", "ORGANIZER"):
        assert forbidden not in text
    parsed = vobject.readOne(text).vevent
    assert parsed.dtstart.value == dt.date(2026, 12, 1)
    assert parsed.dtend.value == dt.date(2026, 12, 4)


def test_timed_event_on_dst_day_keeps_wall_clock() -> None:
    event = desired(
        "a@example.com",
        all_day=False,
        time_zone="Europe/Paris",
        start=dt.datetime(2026, 3, 29, 9, 0),
        end=dt.datetime(2026, 3, 29, 18, 0),
    )
    text = to_ical(event, "uid-1", stamp=STAMP)
    lines = _lines(text)
    assert "DTSTART;TZID=Europe/Paris:20260329T090000" in lines
    assert "DTEND;TZID=Europe/Paris:20260329T180000" in lines
    assert lines.count("BEGIN:VTIMEZONE") == 1
    # the zone's change that day is in the VTIMEZONE: CET -> CEST
    daylight = lines[lines.index("BEGIN:DAYLIGHT"):lines.index("END:DAYLIGHT")]
    assert "TZOFFSETFROM:+0100" in daylight and "TZOFFSETTO:+0200" in daylight
    assert any(line.startswith("DTSTART:20260329T0") for line in daylight)
    parsed = vobject.readOne(text).vevent
    assert parsed.dtstart.value.astimezone(dt.UTC) == dt.datetime(2026, 3, 29, 7, tzinfo=dt.UTC)
    assert parsed.dtend.value.astimezone(dt.UTC) == dt.datetime(2026, 3, 29, 16, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("zone", "start", "end", "utc_start", "utc_end"),
    [
        # across the spring change: starts in CET, ends in CEST
        (
            "Europe/Paris",
            dt.datetime(2026, 3, 28, 13, 30),
            dt.datetime(2026, 3, 30, 12, 30),
            dt.datetime(2026, 3, 28, 12, 30),
            dt.datetime(2026, 3, 30, 10, 30),
        ),
        # across the autumn change and a year end in the southern hemisphere
        (
            "Australia/Sydney",
            dt.datetime(2026, 12, 31, 9, 0),
            dt.datetime(2027, 4, 6, 18, 0),
            dt.datetime(2026, 12, 30, 22, 0),
            dt.datetime(2027, 4, 6, 8, 0),
        ),
        # a zone without daylight saving time
        (
            "Asia/Tokyo",
            dt.datetime(2026, 7, 1, 9, 0),
            dt.datetime(2026, 7, 1, 12, 30),
            dt.datetime(2026, 7, 1, 0, 0),
            dt.datetime(2026, 7, 1, 3, 30),
        ),
        (
            "America/New_York",
            dt.datetime(2026, 11, 1, 1, 30),
            dt.datetime(2026, 11, 2, 9, 0),
            dt.datetime(2026, 11, 1, 5, 30),
            dt.datetime(2026, 11, 2, 14, 0),
        ),
    ],
)
def test_vtimezone_resolves_like_zoneinfo(
    zone: str, start: dt.datetime, end: dt.datetime, utc_start: dt.datetime, utc_end: dt.datetime
) -> None:
    event = desired("a@example.com", all_day=False, time_zone=zone, start=start, end=end)
    text = to_ical(event, "uid-1", stamp=STAMP)
    parsed = vobject.readOne(text).vevent
    assert parsed.dtstart.value.astimezone(dt.UTC) == utc_start.replace(tzinfo=dt.UTC)
    assert parsed.dtend.value.astimezone(dt.UTC) == utc_end.replace(tzinfo=dt.UTC)
    assert (utc_start.replace(tzinfo=dt.UTC), utc_end.replace(tzinfo=dt.UTC)) == event.utc_bounds()


def test_utc_event_uses_z_form_without_vtimezone() -> None:
    event = desired(
        "a@example.com",
        all_day=False,
        time_zone="UTC",
        start=dt.datetime(2026, 3, 29, 9, 0),
        end=dt.datetime(2026, 3, 29, 12, 30),
    )
    lines = _lines(to_ical(event, "uid-1", stamp=STAMP))
    assert "DTSTART:20260329T090000Z" in lines
    assert "DTEND:20260329T123000Z" in lines
    assert "BEGIN:VTIMEZONE" not in lines


@pytest.mark.parametrize(
    ("show_as", "transp", "status", "busy"),
    [
        ("free", "TRANSPARENT", "CONFIRMED", "FREE"),
        ("workingElsewhere", "TRANSPARENT", "CONFIRMED", "WORKINGELSEWHERE"),
        ("tentative", "OPAQUE", "TENTATIVE", "TENTATIVE"),
        ("busy", "OPAQUE", "CONFIRMED", "BUSY"),
        ("oof", "OPAQUE", "CONFIRMED", "OOF"),
    ],
)
def test_show_as_mapping(show_as: str, transp: str, status: str, busy: str) -> None:
    text = to_ical(desired("a@example.com", show_as=show_as), "uid-1", stamp=STAMP)
    assert _vevent_value(text, "TRANSP") == transp
    assert _vevent_value(text, "STATUS") == status
    assert _vevent_value(text, "X-MICROSOFT-CDO-BUSYSTATUS") == busy


def test_private_and_category() -> None:
    public = to_ical(desired("a@example.com"), "uid-1", stamp=STAMP)
    assert _vevent_value(public, "CLASS") == "PUBLIC"
    assert "CATEGORIES" not in public
    private = to_ical(
        desired("a@example.com", private=True, category="Absences, HR"), "uid-1", stamp=STAMP
    )
    assert _vevent_value(private, "CLASS") == "PRIVATE"
    assert _vevent_value(private, "CATEGORIES") == "Absences\\, HR"
    assert vobject.readOne(private).vevent.categories.value == ["Absences, HR"]


def test_text_escaping() -> None:
    subject = "Leave; paid, half\\day\nsecond line"
    text = to_ical(desired("a@example.com", subject=subject), "uid-1", stamp=STAMP)
    assert _vevent_value(text, "SUMMARY") == "Leave\\; paid\\, half\\\\day\\nsecond line"
    assert vobject.readOne(text).vevent.summary.value == subject


def test_long_subject_is_folded_and_round_trips() -> None:
    subject = ("Congé payé é😀 " * 30)[:300]
    text = to_ical(desired("a@example.com", subject=subject), "uid-1", stamp=STAMP)
    physical = text.split("\r\n")[:-1]
    assert max(len(line.encode("utf-8")) for line in physical) <= 75
    assert any(line.startswith(" ") for line in physical)
    assert _vevent_value(text, "SUMMARY") == subject
    assert vobject.readOne(text).vevent.summary.value == subject


def test_folding_never_splits_a_character() -> None:
    for width in range(60, 90):
        subject = "X" * width + "é" * 50 + "😀" * 30
        text = to_ical(desired("a@example.com", subject=subject), "uid-1", stamp=STAMP)
        assert all(len(p.encode("utf-8")) <= 75 for p in text.split("\r\n"))
        assert _vevent_value(text, "SUMMARY") == subject


def test_uid_is_deterministic() -> None:
    assert event_uid("t-1") == event_uid("t-1") != event_uid("t-2")
    assert event_uid("t-1").startswith("absence-sync-")
    assert len(event_uid("t-1")) == len("absence-sync-") + 32


def test_xml_with_doctype_is_refused() -> None:
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaa">]>'
        b'<multistatus xmlns="DAV:">&a;</multistatus>'
    )
    with pytest.raises(ValueError, match="document type"):
        parse_xml(bomb)
    root = parse_xml(b'<m xmlns="DAV:"><href>x</href></m>')
    assert root.findtext("{DAV:}href") == "x"


def test_parse_retry_after() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    assert parse_retry_after("7", now=now) == 7.0
    later = email.utils.format_datetime(now + dt.timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(later, now=now) == 90.0
    past = email.utils.format_datetime(now - dt.timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after(None) is None


# --- against Radicale -------------------------------------------------------


async def test_list_events_reads_back_what_was_written(
    provider: CalDAVProvider, mailbox: str
) -> None:
    timed = desired(
        mailbox,
        "abs-timed",
        all_day=False,
        show_as="tentative",
        private=True,
        category="HR",
        subject="Half day; am",
        start=dt.datetime(2026, 3, 29, 9, 0),
        end=dt.datetime(2026, 3, 29, 12, 30),
    )
    whole = desired(mailbox, "abs-whole", show_as="free")
    timed_id = await provider.create(timed, transaction_id="t-timed")
    whole_id = await provider.create(whole, transaction_id="t-whole")
    events = {e["id"]: e for e in await caldav_tools.list_events(provider, mailbox)}
    assert set(events) == {timed_id, whole_id}

    first = events[timed_id]
    assert first["uid"] == event_uid("t-timed")
    assert first["summary"] == "Half day; am"
    assert first["all_day"] is False
    assert first["time_zone"] == "Europe/Paris"
    assert isinstance(first["dtstart"], dt.datetime)
    assert first["dtstart"].replace(tzinfo=None) == dt.datetime(2026, 3, 29, 9, 0)
    assert first["dtstart"].astimezone(dt.UTC) == dt.datetime(2026, 3, 29, 7, tzinfo=dt.UTC)
    assert (first["transp"], first["status"]) == ("OPAQUE", "TENTATIVE")
    assert first["classification"] == "PRIVATE"
    assert first["categories"] == "HR"
    assert first["mark"] == "absence-sync:cfg-1:abs-timed"

    second = events[whole_id]
    assert second["all_day"] is True
    assert (second["dtstart"], second["dtend"]) == (dt.date(2026, 12, 1), dt.date(2026, 12, 4))
    assert (second["transp"], second["status"]) == ("TRANSPARENT", "CONFIRMED")
    assert second["busy_status"] == "FREE"


async def test_find_matches_marks_exactly(provider: CalDAVProvider, mailbox: str) -> None:
    # CalDAV text-match is a substring test; "abs-1" must not find "abs-10".
    short = await provider.create(desired(mailbox, "abs-1"), transaction_id="t-short")
    long = await provider.create(desired(mailbox, "abs-10"), transaction_id="t-long")
    odd_id = "a,b;c\\d\nnext"
    odd = await provider.create(desired(mailbox, odd_id), transaction_id="t-odd")
    assert await provider.find(mailbox, Mark("cfg-1", "abs-1")) == [short]
    assert await provider.find(mailbox, Mark("cfg-1", "abs-10")) == [long]
    assert await provider.find(mailbox, Mark("cfg-1", odd_id)) == [odd]
    assert await provider.find(mailbox, Mark("cfg-1", "a,b")) == []


async def test_find_matches_marks_written_before_ids_were_encoded(
    provider: CalDAVProvider, mailbox: str
) -> None:
    mark = Mark("cfg-1", "abs:old%")
    old = await provider.create(legacy(mailbox, mark), transaction_id="t-legacy-old")
    new = await provider.create(desired(mailbox, mark=mark), transaction_id="t-legacy-new")
    marks = {e["id"]: e["mark"] for e in await caldav_tools.list_events(provider, mailbox)}
    assert marks == {old: "absence-sync:cfg-1:abs:old%", new: "absence-sync:cfg-1:abs%3Aold%25"}
    assert await provider.find(mailbox, mark) == sorted([old, new])
    # the old form is ambiguous: the other pair it could name finds the old event (only)
    assert await provider.find(mailbox, Mark("cfg-1:abs", "old%")) == [old]


async def test_update_changes_content(provider: CalDAVProvider, mailbox: str) -> None:
    event_id = await provider.create(desired(mailbox), transaction_id="t-up")
    await provider.update(mailbox, event_id, desired(mailbox, subject="Paid leave", private=True))
    (listed,) = await caldav_tools.list_events(provider, mailbox)
    assert (listed["summary"], listed["classification"]) == ("Paid leave", "PRIVATE")


async def test_update_in_missing_calendar_is_event_gone(
    provider: CalDAVProvider, mailbox: str
) -> None:
    event_id = await provider.create(desired(mailbox), transaction_id="t-calgone")
    other = f"gone{next(_boxes)}@example.com"
    with pytest.raises(EventGone):
        await provider.update(other, event_id, desired(other))


async def test_concurrent_creates_share_one_session(provider: CalDAVProvider, mailbox: str) -> None:
    events = [desired(mailbox, f"abs-c{i}") for i in range(12)]
    ids = await asyncio.gather(
        *(provider.create(e, transaction_id=f"t-c{i}") for i, e in enumerate(events)),
        provider.create(events[0], transaction_id="t-c0"),
    )
    assert ids[0] == ids[-1]
    assert len(set(ids)) == 12
    assert len(await caldav_tools.list_events(provider, mailbox)) == 12


async def test_events_renamed_by_a_client_are_still_ours(
    provider: CalDAVProvider, mailbox: str, context: ProviderContext
) -> None:
    # A client may store an event under another resource name than its UID.
    calendar = provider.calendar_url(mailbox)
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    headers = {"Authorization": f"Basic {token}", "Content-Type": "text/calendar"}
    moved = desired(mailbox, "abs-moved")
    renamed = desired(mailbox, "abs-renamed")
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context.ssl_context), headers=headers
    ) as session:
        for name, uid, event in (
            ("moved.ics", event_uid("t-moved"), moved),
            ("renamed.ics", "client-chosen-uid", renamed),
        ):
            ics = to_ical(event, uid, stamp=STAMP)
            async with session.put(calendar + name, data=ics.encode()) as response:
                assert response.status == 201

    # a retried create finds its UID under the other name
    assert await provider.create(moved, transaction_id="t-moved") == "moved.ics"
    # an update keeps the UID the resource already holds
    assert await provider.find(mailbox, renamed.mark) == ["renamed.ics"]
    await provider.update(mailbox, "renamed.ics", desired(mailbox, "abs-renamed", subject="New"))
    listed = {e["id"]: e for e in await caldav_tools.list_events(provider, mailbox)}
    assert (listed["renamed.ics"]["uid"], listed["renamed.ics"]["summary"]) == (
        "client-chosen-uid",
        "New",
    )
    assert set(listed) == {"moved.ics", "renamed.ics"}


async def test_ensure_calendar_is_idempotent(provider: CalDAVProvider) -> None:
    address = f"fresh{next(_boxes)}+tag@example.com"
    await caldav_tools.ensure_calendar(provider, address)
    await caldav_tools.ensure_calendar(provider, address)
    assert await caldav_tools.list_events(provider, address) == []


async def test_find_in_missing_calendar(provider: CalDAVProvider, missing_mailbox: str) -> None:
    with pytest.raises(ProviderError) as info:
        await provider.find(missing_mailbox, Mark("cfg-1", "abs-1"))
    assert info.value.code == MAILBOX_NOT_FOUND
    assert await provider.delete(missing_mailbox, "absence-sync-x.ics") is False


async def test_wrong_password_is_auth_failed(
    radicale: RadicaleServer, context: ProviderContext
) -> None:
    caldav = _provider(radicale.url, context, password="wrong")
    try:
        with pytest.raises(ProviderError) as info:
            await caldav.create(desired("a@example.com"), transaction_id="t-auth")
    finally:
        await caldav.close()
    assert info.value.code == AUTH_FAILED
    assert info.value.retriable is False


async def test_certificate_from_untrusted_ca(radicale: RadicaleServer, tls_dir: Path) -> None:
    bundle = tls_dir / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(bundle))
    settings = Settings(ca_bundle=bundle)
    caldav = _provider(radicale.url, ProviderContext(settings, make_ssl_context(settings)))
    try:
        with pytest.raises(ProviderError) as info:
            await caldav.find("a@example.com", Mark("cfg-1", "abs-1"))
    finally:
        await caldav.close()
    assert info.value.code == TLS_UNTRUSTED_CERTIFICATE
    assert info.value.retriable is False
    assert "ABSENCE_SYNC_CA_BUNDLE" in info.value.hint


async def test_closed_port_is_server_unreachable(context: ProviderContext) -> None:
    caldav = _provider(f"https://127.0.0.1:{free_port()}/", context)
    try:
        with pytest.raises(ProviderError) as info:
            await caldav.create(desired("a@example.com"), transaction_id="t-closed")
    finally:
        await caldav.close()
    assert info.value.code == SERVER_UNREACHABLE
    assert info.value.retriable is True


def test_from_config(context: ProviderContext) -> None:
    from consumer.config import SyncConfig

    config = SyncConfig(
        id="cfg",
        tenant="t",
        provider="caldav",
        provider_settings={"url": "https://dav.example.com/{email}/cal", "username": USER},
        secrets={"password": PASSWORD},
    )
    caldav = CalDAVProvider.from_config(config, context)
    assert caldav.kind == "caldav"
    assert (
        caldav.calendar_url("a/b@example.com") == "https://dav.example.com/a%2Fb@example.com/cal/"
    )


# --- the embedded server ----------------------------------------------------


async def test_radicale_without_users_over_http(tmp_path: Path, context: ProviderContext) -> None:
    server = await asyncio.to_thread(RadicaleServer.start, tmp_path)
    caldav = CalDAVProvider(server.url + "{email}/calendar/", context)
    try:
        assert server.url.startswith("http://")
        await caldav_tools.ensure_calendar(caldav, "anon@example.com")
        event_id = await caldav.create(desired("anon@example.com"), transaction_id="t-anon")
        assert await caldav.find("anon@example.com", Mark("cfg-1", "abs-1")) == [event_id]
    finally:
        await caldav.close()
        await asyncio.to_thread(server.stop)
    assert not server.running


def test_radicale_on_a_taken_port_raises(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RadicaleError, match="in use"):
            RadicaleServer.start(tmp_path, port=port)


def test_radicale_that_dies_raises_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(RadicaleError, match="exited") as info:
        RadicaleServer.start(tmp_path, cert=tmp_path / "none.pem", key=tmp_path / "none.key")
    assert "none.pem" in str(info.value)


# --- an HTTPS double for answers Radicale does not give ---------------------


def _multistatus(events: dict[str, str]) -> str:
    responses = "".join(
        f"<D:response><D:href>/x/calendar/{name}</D:href><D:propstat><D:prop>"
        f"<C:calendar-data>{escape(data)}</C:calendar-data></D:prop>"
        "<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>"
        for name, data in events.items()
    )
    return (
        '<?xml version="1.0"?><D:multistatus xmlns:D="DAV:" '
        f'xmlns:C="urn:ietf:params:xml:ns:caldav">{responses}</D:multistatus>'
    )


async def _double_handler(request: web.Request) -> web.Response:
    behaviour = request.match_info["behaviour"]
    if behaviour == "slow":
        await asyncio.sleep(5)
        return web.Response(status=201)
    if behaviour == "nofilter":
        # Rejects prop-filter like some servers; unfiltered, answers everything.
        body = await request.read()
        if b"prop-filter" in body:
            return web.Response(status=400)
        events = {
            f"{absence}.ics": to_ical(desired("x@example.com", absence), absence, stamp=STAMP)
            for absence in ("abs-1", "abs-10", "abs-2")
        }
        return web.Response(status=207, text=_multistatus(events), content_type="application/xml")
    if behaviour == "503date":
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)
        headers = {"Retry-After": email.utils.format_datetime(when, usegmt=True)}
        return web.Response(status=503, headers=headers)
    status = int(behaviour)
    headers = {"Retry-After": "7"} if status == 429 else {}
    return web.Response(status=status, headers=headers, text="nope")


@pytest.fixture(scope="session")
async def double(ca: trustme.CA) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{behaviour}/{tail:.*}", _double_handler)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ssl)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_ssl)
    await site.start()
    yield f"https://127.0.0.1:{port}/"
    await runner.cleanup()


@pytest.mark.parametrize(
    ("behaviour", "operation", "code", "retriable", "retry_after"),
    [
        ("429", "create", THROTTLED, True, 7.0),
        ("503", "create", PROVIDER_ERROR, True, None),
        ("500", "update", PROVIDER_ERROR, True, None),
        ("502", "delete", PROVIDER_ERROR, True, None),
        ("403", "create", ACCESS_DENIED, False, None),
        ("401", "find", AUTH_FAILED, False, None),
        ("400", "create", INVALID_EVENT, False, None),
        ("415", "update", INVALID_EVENT, False, None),
        ("422", "create", INVALID_EVENT, False, None),
        ("404", "create", MAILBOX_NOT_FOUND, False, None),
        ("409", "create", MAILBOX_NOT_FOUND, False, None),
        ("404", "find", MAILBOX_NOT_FOUND, False, None),
        ("301", "create", PROVIDER_ERROR, False, None),
    ],
)
async def test_status_translation(
    double: str,
    context: ProviderContext,
    behaviour: str,
    operation: str,
    code: str,
    retriable: bool,
    retry_after: float | None,
) -> None:
    caldav = CalDAVProvider(double + behaviour + "/{email}/", context)
    event = desired("a@example.com")
    try:
        with pytest.raises(ProviderError) as info:
            if operation == "create":
                await caldav.create(event, transaction_id="t")
            elif operation == "update":
                await caldav.update(event.mailbox, "x.ics", event)
            elif operation == "delete":
                await caldav.delete(event.mailbox, "x.ics")
            else:
                await caldav.find(event.mailbox, event.mark)
    finally:
        await caldav.close()
    assert not isinstance(info.value, EventGone)
    assert (info.value.code, info.value.retriable, info.value.retry_after) == (
        code,
        retriable,
        retry_after,
    )
    assert info.value.hint


async def test_503_with_http_date_is_throttled(double: str, context: ProviderContext) -> None:
    caldav = CalDAVProvider(double + "503date/{email}/", context)
    try:
        with pytest.raises(ProviderError) as info:
            await caldav.create(desired("a@example.com"), transaction_id="t")
    finally:
        await caldav.close()
    assert info.value.code == THROTTLED
    assert info.value.retriable is True
    assert info.value.retry_after is not None
    assert 100 <= info.value.retry_after <= 120


async def test_timeout_is_server_unreachable(double: str, settings: Settings) -> None:
    quick = settings.model_copy(update={"request_timeout_seconds": 0.3})
    caldav = CalDAVProvider(
        double + "slow/{email}/", ProviderContext(quick, make_ssl_context(quick))
    )
    try:
        with pytest.raises(ProviderError) as info:
            await caldav.create(desired("a@example.com"), transaction_id="t")
    finally:
        await caldav.close()
    assert info.value.code == SERVER_UNREACHABLE
    assert info.value.retriable is True


async def test_find_falls_back_when_prop_filter_is_rejected(
    double: str, context: ProviderContext
) -> None:
    caldav = CalDAVProvider(double + "nofilter/{email}/", context)
    try:
        assert await caldav.find("x@example.com", Mark("cfg-1", "abs-1")) == ["abs-1.ics"]
        assert await caldav.find("x@example.com", Mark("cfg-2", "abs-1")) == []
    finally:
        await caldav.close()


def test_provider_is_a_provider() -> None:
    assert issubclass(CalDAVProvider, Provider)
