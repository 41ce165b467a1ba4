"""An HTTPS stand-in for an Exchange Server's EWS endpoint, for tests.

One aiohttp server on a free loopback port answers SOAP at
`https://127.0.0.1:PORT/EWS/Exchange.asmx` (a trustme certificate, or a truly
self-signed one with `self_signed=True`). It behaves like Exchange where the
provider depends on it:

* Authentication of the service account on every connection: HTTP basic, and
  NTLM through a real NTLM acceptor (pyspnego, credentials from a
  `NTLM_USER_FILE` written at start) with IIS's connection-based semantics:
  after the three-leg handshake the connection stays authenticated. 401 with
  `WWW-Authenticate` for the enabled schemes otherwise.
* Versions: `version` "2010", "2013", "2016" or "2019" sets the
  `ServerVersionInfo` header of every answer; a `RequestServerVersion` newer
  than the server gets the SOAP fault `ErrorInvalidServerVersion` (HTTP 500),
  which is how exchangelib probes. Elements a version lacks are refused with
  `ErrorSchemaValidation` (`WorkingElsewhere` and `SuppressReadReceipts`
  before 2013).
* Impersonation: item operations must carry `ExchangeImpersonation`; an
  unknown address gets the fault `ErrorNonExistentMailbox`, a mailbox
  outside the service account's impersonation scope `ErrorImpersonateUserDenied`.
* ConvertId (exchangelib's version probe), CreateItem, UpdateItem (Set/Delete
  fields, extended properties), DeleteItem, GetItem and FindItem (IdOnly /
  Default shapes with additional properties, restrictions IsEqualTo,
  IsNotEqualTo, Exists, And, Or, Not on field and extended-property URIs,
  indexed paging) against per-mailbox calendars; ErrorItemNotFound for
  unknown ids, per item.
* Automatic replies: GetUserOofSettings and SetUserOofSettings (impersonated,
  the request's mailbox must be the impersonated one), validated like
  Exchange (state, audience, a scheduled reply's duration), stored as
  Exchange does: messages rewritten as HTML documents, times in UTC.
  `set_user_oof` is the employee editing their reply in Outlook.
* Scripted faults for the next matching requests (`script`): ErrorServerBusy
  with BackOffMilliseconds, any HTTP status (optionally after performing the
  write: a 503 after a successful CreateItem), 401, any EWS fault. And
  `busy_above`: ErrorServerBusy whenever more requests than that are in
  flight (with `latency`, a server that is busy under load).

Everything is recorded for assertions: the items per mailbox (`items`), each
request (`requests`: operation, mailbox, HTTP status, response codes,
requested version, user), requests in flight, the back-off windows the server
announced for a mailbox and the requests for it that arrived inside one
(`early`), and
`anomalies`: what real Exchange would accept but the product must never send
(reminders, attendees, a body, invitations, non-midnight all-day bounds).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import ipaddress
import itertools
import os
import secrets
import socket
import ssl
import tempfile
import time
import weakref
import zoneinfo
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import spnego
import spnego.exceptions
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from exchangelib.winzone import MS_TIMEZONE_TO_IANA_MAP
from lxml import etree

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
T = "http://schemas.microsoft.com/exchange/services/2006/types"
E = "http://schemas.microsoft.com/exchange/services/2006/errors"
PATH = "/EWS/Exchange.asmx"

# request server versions, oldest first
API_VERSIONS = (
    "Exchange2007", "Exchange2007_SP1", "Exchange2010", "Exchange2010_SP1", "Exchange2010_SP2",
    "Exchange2013", "Exchange2013_SP1", "Exchange2015", "Exchange2016",
)
# server version -> (build, Version attribute of ServerVersionInfo, newest API it accepts)
SERVER_VERSIONS: dict[str, tuple[tuple[int, int, int, int], str, str]] = {
    "2010": ((14, 3, 123, 4), "Exchange2010_SP2", "Exchange2010_SP2"),
    "2013": ((15, 0, 1497, 2), "Exchange2013_SP1", "Exchange2013_SP1"),
    "2016": ((15, 1, 2507, 6), "V2017_07_11", "Exchange2016"),
    "2019": ((15, 2, 1118, 7), "V2017_07_11", "Exchange2016"),
}
FREE_BUSY = frozenset({"Free", "Tentative", "Busy", "OOF", "NoData", "WorkingElsewhere"})
SENSITIVITY = frozenset({"Normal", "Personal", "Private", "Confidential"})
_ids = itertools.count(1)


def q(ns: str, name: str) -> str:
    return f"{{{ns}}}{name}"


def local(tag: Any) -> str:
    return etree.QName(tag).localname if isinstance(tag, str) else ""


# --------------------------------------------------------------------------- model


@dataclass
class Item:
    """A calendar item as the server stores it."""

    id: str
    changekey: str
    mailbox: str
    fields: dict[str, str] = field(default_factory=dict)  # element name -> text / Id
    categories: list[str] = field(default_factory=list)
    extended: dict[tuple[str, str, str], str] = field(default_factory=dict)
    created: float = 0.0
    updates: int = 0

    def ext(self, set_id: str, name: str) -> str | None:
        for (s, n, _), value in self.extended.items():
            if s == set_id.lower() and n == name:
                return value
        return None

    @property
    def subject(self) -> str:
        return self.fields.get("Subject", "")

    @property
    def all_day(self) -> bool:
        return _bool(self.fields.get("IsAllDayEvent", "false"))

    @property
    def free_busy(self) -> str:
        return self.fields.get("LegacyFreeBusyStatus", "Busy")

    @property
    def zone(self) -> str:
        """The IANA zone of the item's start time zone."""
        return iana(self.fields.get("StartTimeZone", "UTC"))

    @property
    def start(self) -> dt.datetime:
        return _when(self.fields["Start"])

    @property
    def end(self) -> dt.datetime:
        return _when(self.fields["End"])

    @property
    def local_start(self) -> dt.datetime:
        return self.start.astimezone(zoneinfo.ZoneInfo(self.zone)).replace(tzinfo=None)

    @property
    def local_end(self) -> dt.datetime:
        return self.end.astimezone(zoneinfo.ZoneInfo(self.zone)).replace(tzinfo=None)


@dataclass
class Recorded:
    at: float
    operation: str
    mailbox: str | None = None
    status: int = 0
    codes: list[str] = field(default_factory=list)
    version: str | None = None
    user: str | None = None
    count: int = 0
    delay: float = 0.0


@dataclass
class Script:
    """An answer for the next `times` requests matching `operation` and `mailbox`."""

    operation: str
    mailbox: str | None
    times: int
    status: int | None = None
    retry_after: str | None = None
    after: bool = False
    fault: str | None = None
    message: str = "scripted"
    back_off_ms: int | None = None
    delay: float = 0.0
    per_item: bool = False


@dataclass
class _Connection:
    context: Any = None
    user: str | None = None


class Fault(Exception):
    """A SOAP fault (HTTP 500), as Exchange sends for request-level errors."""

    def __init__(self, code: str, message: str, *, values: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.values = values or {}


class Refused(Exception):
    """A per-item error response message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def iana(windows_id: str) -> str:
    if windows_id in MS_TIMEZONE_TO_IANA_MAP:
        return str(MS_TIMEZONE_TO_IANA_MAP[windows_id])
    if windows_id == "UTC":
        return "UTC"
    raise Refused("ErrorTimeZone", f"The time zone '{windows_id}' is not valid.")


def _bool(text: str) -> bool:
    return text.strip().lower() in ("true", "1")


def _when(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.strip())
    if value.tzinfo is None:  # EWS reads a bare time in the request's time zone context: UTC
        value = value.replace(tzinfo=dt.UTC)
    return value


_NTLM_USERS = Path(tempfile.mkdtemp(prefix="ews-ntlm-")) / "users"


def _register_ntlm_account(domain: str, user: str, upn: str, password: str) -> None:
    """pyspnego's NTLM acceptor reads the accounts it may authenticate from the file
    named by NTLM_USER_FILE: one file for the process, holding every server's account
    (the first line for a user wins)."""
    lines = [f"{domain}:{user}:{password}", f":{upn}:{password}"]
    known = _NTLM_USERS.read_text(encoding="utf-8").splitlines() if _NTLM_USERS.exists() else []
    with _NTLM_USERS.open("a", encoding="utf-8") as handle:
        for line in lines:
            if line not in known:
                handle.write(line + "\n")
    os.environ["NTLM_USER_FILE"] = str(_NTLM_USERS)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "exchange.acme.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "self-signed.pem", directory / "self-signed.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return cert_path, key_path


_OOF_OPERATIONS = frozenset({"GetUserOofSettingsRequest", "SetUserOofSettingsRequest"})
_OOF_DISABLED: dict[str, Any] = {
    "state": "Disabled", "audience": "All", "start": "2026-01-01T00:00:00Z",
    "end": "2026-01-02T00:00:00Z", "internal": "", "external": "",
}


def _oof_html(message: str) -> str:
    """What Exchange stores for a reply message: an HTML document."""
    if not message or "<html" in message.lower():
        return message
    return f"<html>\r\n<body>\r\n{message}\r\n</body>\r\n</html>\r\n"


# --------------------------------------------------------------------------- server


@dataclass
class EwsServer:
    version: str = "2019"
    auth: tuple[str, ...] = ("ntlm", "basic")
    domain: str = "ACME"
    user: str = "svc-absence"
    upn: str = "svc-absence@acme.test"
    password: str = "Correct-Horse-9"
    self_signed: bool = False
    convert_id: bool = True  # False: a server that refuses exchangelib's version probe
    announce: bool = True  # False: a 401 names no scheme (WWW-Authenticate missing)
    mailboxes: set[str] = field(default_factory=set)
    impersonation_denied: set[str] = field(default_factory=set)
    refuse_subjects: dict[str, str] = field(default_factory=dict)  # subject -> EWS error code
    items: dict[str, dict[str, Item]] = field(default_factory=lambda: defaultdict(dict))
    #: mailbox -> its OOF settings (state, audience, start, end, internal, external)
    oof: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    scripts: list[Script] = field(default_factory=list)
    latency: float = 0.0
    busy_above: int | None = None
    busy_back_off_ms: int = 200
    in_flight: int = 0
    max_in_flight: int = 0
    throttles: list[tuple[str | None, float, float]] = field(default_factory=list)
    early: list[Recorded] = field(default_factory=list)
    handshakes: int = 0
    ca: trustme.CA = field(default_factory=trustme.CA)
    ca_path: Path | None = None
    port: int = 0
    _connections: weakref.WeakKeyDictionary[Any, _Connection] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    _runner: web.AppRunner | None = None

    # ------------------------------------------------------------- lifecycle

    async def start(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if self.self_signed:
            cert_path, key_path = _self_signed(directory)
            server_ssl.load_cert_chain(str(cert_path), str(key_path))
        else:
            self.ca_path = directory / "ews-ca.pem"
            self.ca.cert_pem.write_to_path(str(self.ca_path))
            self.ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ssl)
        _register_ntlm_account(self.domain, self.user, self.upn, self.password)
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=server_ssl).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{PATH}"

    @property
    def username(self) -> str:
        """The service account as configured on the product (DOMAIN\\user)."""
        return f"{self.domain}\\{self.user}"

    # ------------------------------------------------------------- scripting

    def add_mailbox(self, address: str) -> str:
        self.mailboxes.add(address.lower())
        return address

    def script(self, operation: str = "*", mailbox: str | None = None, *, times: int = 1,
               status: int | None = None, retry_after: str | None = None, after: bool = False,
               fault: str | None = None, message: str = "scripted",
               back_off_ms: int | None = None, delay: float = 0.0,
               per_item: bool = False) -> None:
        """The next `times` requests for `operation` ("*": any item operation; "auth":
        any request, refused with 401 before authentication) and `mailbox` (None: any)
        get: an HTTP `status` (after performing the operation when `after`), a SOAP
        `fault`, ErrorServerBusy with `back_off_ms` (as a fault, or with `per_item` as
        every item's error), or (alone) their normal answer `delay` seconds late."""
        if back_off_ms is not None:
            fault = "ErrorServerBusy"
        self.scripts.append(Script(operation, mailbox.lower() if mailbox else None, times,
                                   status, retry_after, after, fault, message, back_off_ms,
                                   delay, per_item))

    def calendar(self, mailbox: str) -> list[Item]:
        return list(self.items.get(mailbox.lower(), {}).values())

    def marked(self, mailbox: str, set_id: str, name: str) -> dict[str, list[Item]]:
        """The items of `mailbox` by the value of an extended property."""
        found: dict[str, list[Item]] = defaultdict(list)
        for item in self.calendar(mailbox):
            value = item.ext(set_id, name)
            if value is not None:
                found[value].append(item)
        return dict(found)

    def operations(self, mailbox: str | None = None) -> Counter[str]:
        return Counter(
            r.operation for r in self.requests
            if mailbox is None or r.mailbox == mailbox.lower()
        )

    # ------------------------------------------------------------- HTTP

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path.lower() != PATH.lower():
            self.unexpected.append(f"{request.method} {request.path}")
            return web.Response(status=404, text="<html><body>404 Not Found</body></html>",
                                content_type="text/html")
        if request.method != "POST":
            return web.Response(status=405, text="Method not allowed")
        connection = self._connections.setdefault(request.transport, _Connection())
        refusal, user = self._authenticate(request, connection)
        if refusal is not None:
            return refusal
        record = Recorded(time.monotonic(), "?", user=user)
        self.requests.append(record)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            status, text, headers = self._soap(body, record, self.in_flight)
            if record.delay:
                await asyncio.sleep(record.delay)
        except Exception as exc:  # a bug in the fake must show, not hang a test
            record.codes.append("FakeServerBug")
            status, text, headers = 500, f"fake server bug: {exc!r}", {}
            self.unexpected.append(repr(exc))
        finally:
            self.in_flight -= 1
        record.status = status
        content_type = "text/xml" if text.startswith("<?xml") else "text/html"
        return web.Response(status=status, body=text.encode(), headers=headers,
                            content_type=content_type, charset="utf-8")

    def _challenge(self, token: str | None = None) -> web.Response:
        headers: list[tuple[str, str]] = []
        if self.announce and token is not None:
            headers.append(("WWW-Authenticate", f"NTLM {token}"))
        elif self.announce:
            if "ntlm" in self.auth:
                headers.append(("WWW-Authenticate", "NTLM"))
            if "basic" in self.auth:
                headers.append(("WWW-Authenticate", 'Basic realm="127.0.0.1"'))
        response = web.Response(status=401, text="401 - Unauthorized: Access is denied.",
                                content_type="text/html")
        for name, value in headers:
            response.headers.add(name, value)
        return response

    def _authenticate(self, request: web.Request,
                      connection: _Connection) -> tuple[web.Response | None, str | None]:
        if self._take_script("auth", None) is not None:
            self.requests.append(Recorded(time.monotonic(), "auth", status=401))
            return self._challenge(), None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "basic" and "basic" in self.auth:
            try:
                user, _, password = base64.b64decode(token).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return self._challenge(), None
            if self._known(user) and password == self.password:
                return None, user
            return self._challenge(), None
        if scheme.lower() in ("ntlm", "negotiate") and "ntlm" in self.auth:
            return self._ntlm(token, connection)
        if connection.user is not None:  # IIS keeps an NTLM-authenticated connection
            return None, connection.user
        return self._challenge(), None

    def _known(self, user: str) -> bool:
        return user.lower() in (self.username.lower(), self.upn.lower())

    def _ntlm(self, token: str, connection: _Connection
              ) -> tuple[web.Response | None, str | None]:
        try:
            raw = base64.b64decode(token)
            if connection.context is None or raw[8:12] == b"\x01\x00\x00\x00":  # Negotiate
                connection.context = spnego.server(protocol="ntlm")
                connection.user = None
            out = connection.context.step(raw)
        except (ValueError, spnego.exceptions.SpnegoError):
            connection.context = None
            return self._challenge(), None
        if out:
            return self._challenge(base64.b64encode(out).decode()), None
        if connection.context.complete:
            connection.user = str(connection.context.client_principal)
            connection.context = None
            self.handshakes += 1
            return None, connection.user
        return self._challenge(), None

    def _take_script(self, operation: str, mailbox: str | None) -> Script | None:
        """The first script for this request. "auth" scripts (a 401 for any request)
        apply before authentication; "*" matches every item operation, not the probe."""
        for script in self.scripts:
            if operation == "auth":
                if script.operation != "auth":
                    continue
            elif script.operation == "auth" or (
                script.operation != operation
                and (script.operation != "*" or operation == "ConvertId")
            ):
                continue
            if script.mailbox is not None and script.mailbox != mailbox:
                continue
            script.times -= 1
            if script.times <= 0:
                self.scripts.remove(script)
            return script
        return None

    # ------------------------------------------------------------- SOAP

    def _soap(self, body: bytes, record: Recorded, in_flight: int
              ) -> tuple[int, str, dict[str, str]]:
        try:
            root = etree.fromstring(body, parser=etree.XMLParser(resolve_entities=False))
        except etree.XMLSyntaxError as exc:
            return self._fault(Fault("ErrorSchemaValidation", f"The request is not XML: {exc}"),
                               record)
        header = root.find(q(SOAP, "Header"))
        soap_body = root.find(q(SOAP, "Body"))
        if soap_body is None or len(soap_body) == 0:
            return self._fault(Fault("ErrorInvalidRequest", "No SOAP body."), record)
        operation_elem = soap_body[0]
        operation = local(operation_elem.tag)
        record.operation = operation
        requested = None
        impersonated = None
        if header is not None:
            version_elem = header.find(q(T, "RequestServerVersion"))
            if version_elem is not None:
                requested = version_elem.get("Version")
            sid = header.find(f"{q(T, 'ExchangeImpersonation')}/{q(T, 'ConnectingSID')}")
            if sid is not None and len(sid):
                impersonated = (sid[0].text or "").strip().lower()
        record.version = requested
        record.mailbox = impersonated
        for mailbox, sent, until in self.throttles:
            if mailbox in (None, impersonated) and sent <= record.at < until:
                self.early.append(record)
                break
        try:
            self._check_version(requested, operation_elem)
            if impersonated is not None:
                self._check_impersonation(impersonated)
            scripted = self._take_script(operation, impersonated)
            if scripted is None and self.busy_above is not None and in_flight > self.busy_above:
                scripted = Script(operation, impersonated, 1, fault="ErrorServerBusy",
                                  back_off_ms=self.busy_back_off_ms,
                                  message="The server cannot service this request right now.")
            if scripted is not None and scripted.fault is not None:
                values = {}
                if scripted.back_off_ms is not None:
                    values["BackOffMilliseconds"] = str(scripted.back_off_ms)
                    now = time.monotonic()
                    self.throttles.append((impersonated, now, now + scripted.back_off_ms / 1000))
                if scripted.per_item:
                    count = sum(1 for e in operation_elem.iter() if local(e.tag) in (
                        "CalendarItem", "ItemChange", "ItemId",
                    ) and local(e.getparent().tag) in ("Items", "ItemChanges", "ItemIds"))
                    refused = Refused(scripted.fault, scripted.message)
                    record.codes.extend([scripted.fault] * count)
                    return 200, self._envelope(operation, "".join(
                        self._message(operation, error=refused, values=values)
                        for _ in range(count)
                    )), {}
                raise Fault(scripted.fault, scripted.message, values=values)
            if scripted is not None:
                record.delay = scripted.delay
            if scripted is not None and scripted.status is not None and not scripted.after:
                return self._http(scripted, record)
            if operation in _OOF_OPERATIONS:
                return 200, self._oof(operation, operation_elem, impersonated, record), {}
            messages = self._operate(operation, operation_elem, impersonated, record)
        except Fault as fault:
            return self._fault(fault, record)
        if scripted is not None and scripted.status is not None:  # after performing it
            return self._http(scripted, record)
        return 200, self._envelope(operation, messages), {}

    def _http(self, script: Script, record: Recorded) -> tuple[int, str, dict[str, str]]:
        assert script.status is not None
        record.codes.append(f"HTTP {script.status}")
        headers = {"Retry-After": script.retry_after} if script.retry_after else {}
        text = f"<html><body><h1>{script.status} {escape(script.message)}</h1></body></html>"
        return script.status, text, headers

    def _check_version(self, requested: str | None, operation: Any) -> None:
        newest = SERVER_VERSIONS[self.version][2]
        if requested is not None and (
            requested not in API_VERSIONS
            or API_VERSIONS.index(requested) > API_VERSIONS.index(newest)
        ):
            raise Fault("ErrorInvalidServerVersion", "The specified server version is invalid.")
        effective = requested or "Exchange2007_SP1"
        before_2013 = API_VERSIONS.index(effective) < API_VERSIONS.index("Exchange2013")
        if before_2013 and operation.get("SuppressReadReceipts") is not None:
            raise Fault("ErrorSchemaValidation", "The request failed schema validation: The "
                        "'SuppressReadReceipts' attribute is not declared.")
        if before_2013 and any(
            (e.text or "").strip() == "WorkingElsewhere"
            for e in operation.iter(q(T, "LegacyFreeBusyStatus"))
        ):
            raise Fault("ErrorSchemaValidation", "The request failed schema validation: The "
                        "'LegacyFreeBusyStatus' element is invalid - The value "
                        "'WorkingElsewhere' is invalid according to its datatype.")

    def _check_impersonation(self, address: str) -> None:
        if address not in self.mailboxes:
            raise Fault("ErrorNonExistentMailbox",
                        "The SMTP address has no mailbox associated with it.")
        if address in self.impersonation_denied:
            raise Fault("ErrorImpersonateUserDenied",
                        "The account does not have permission to impersonate the requested user.")

    def _version_header(self) -> str:
        (major, minor, build, revision), label, _ = SERVER_VERSIONS[self.version]
        return (
            f'<s:Header><h:ServerVersionInfo MajorVersion="{major}" MinorVersion="{minor}" '
            f'MajorBuildNumber="{build}" MinorBuildNumber="{revision}" Version="{label}" '
            f'xmlns:h="{T}" xmlns="{T}"/></s:Header>'
        )

    def _envelope(self, operation: str, messages: str) -> str:
        return (
            f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}">'
            f"{self._version_header()}<s:Body>"
            f'<m:{operation}Response xmlns:m="{M}" xmlns:t="{T}"><m:ResponseMessages>'
            f"{messages}</m:ResponseMessages></m:{operation}Response></s:Body></s:Envelope>"
        )

    def _fault(self, fault: Fault, record: Recorded) -> tuple[int, str, dict[str, str]]:
        record.codes.append(fault.code)
        values = "".join(
            f"<t:Value Name={quoteattr(k)}>{escape(v)}</t:Value>" for k, v in fault.values.items()
        )
        message_xml = f'<t:MessageXml xmlns:t="{T}">{values}</t:MessageXml>' if values else ""
        text = (
            f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}"><s:Body>'
            f"<s:Fault><faultcode xmlns:a=\"{T}\">a:{fault.code}</faultcode>"
            f'<faultstring xml:lang="en-US">{escape(fault.message)}</faultstring><detail>'
            f'<e:ResponseCode xmlns:e="{E}">{fault.code}</e:ResponseCode>'
            f'<e:Message xmlns:e="{E}">{escape(fault.message)}</e:Message>{message_xml}'
            "</detail></s:Fault></s:Body></s:Envelope>"
        )
        return 500, text, {}

    @staticmethod
    def _message(operation: str, content: str = "", error: Refused | None = None,
                 values: dict[str, str] | None = None) -> str:
        tag = f"m:{operation}ResponseMessage"
        if error is not None:
            xml = "".join(
                f"<t:Value Name={quoteattr(k)}>{escape(v)}</t:Value>"
                for k, v in (values or {}).items()
            )
            return (
                f'<{tag} ResponseClass="Error"><m:MessageText>{escape(error.message)}'
                f"</m:MessageText><m:ResponseCode>{error.code}</m:ResponseCode>"
                f"<m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>"
                + (f"<m:MessageXml>{xml}</m:MessageXml>" if xml else "")
                + f"{content}</{tag}>"
            )
        return (
            f'<{tag} ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>'
            f"{content}</{tag}>"
        )

    # ------------------------------------------------------------- automatic replies

    def oof_of(self, mailbox: str) -> dict[str, Any]:
        return dict(self.oof.get(mailbox.lower(), _OOF_DISABLED))

    def set_user_oof(self, mailbox: str, **changes: Any) -> None:
        """The employee edits their reply in Outlook."""
        current = self.oof_of(mailbox)
        for key in ("internal", "external"):
            if key in changes:
                changes[key] = _oof_html(str(changes[key]))
        current.update(changes)
        self.oof[mailbox.lower()] = current

    def _oof(self, operation: str, elem: Any, mailbox: str | None, record: Recorded) -> str:
        name = operation.removesuffix("Request")
        if mailbox is None:
            raise Fault("ErrorNonExistentMailbox", f"The service account {self.upn} has no "
                        "mailbox: OOF operations here need ExchangeImpersonation.")
        address = elem.find(f"{q(T, 'Mailbox')}/{q(T, 'Address')}")
        target = (address.text or "").strip().lower() if address is not None else ""
        if target != mailbox:
            return self._oof_answer(name, Refused(
                "ErrorAccessDenied", "Access is denied. Check credentials and try again."))
        if name == "SetUserOofSettings":
            refused = self._set_oof(mailbox, elem.find(q(T, "UserOofSettings")))
            if refused is not None:
                record.codes.append(refused.code)
            return self._oof_answer(name, refused)
        held = self.oof_of(mailbox)
        settings = (
            f'<OofSettings xmlns="{T}"><OofState>{held["state"]}</OofState>'
            f'<ExternalAudience>{held["audience"]}</ExternalAudience>'
            f'<Duration><StartTime>{held["start"]}</StartTime><EndTime>{held["end"]}</EndTime>'
            f'</Duration><InternalReply><Message>{escape(held["internal"])}</Message>'
            f'</InternalReply><ExternalReply><Message>{escape(held["external"])}</Message>'
            "</ExternalReply></OofSettings><AllowExternalOof>All</AllowExternalOof>"
        )
        return self._oof_answer(name, None, settings)

    def _set_oof(self, mailbox: str, settings: Any) -> Refused | None:
        if settings is None:
            return Refused("ErrorInvalidRequest", "UserOofSettings is required.")

        def text(*path: str) -> str | None:
            node = settings.find("/".join(q(T, p) for p in path))
            return None if node is None else (node.text or "")

        state = text("OofState")
        audience = text("ExternalAudience") or "All"
        if state not in ("Enabled", "Scheduled", "Disabled"):
            return Refused("ErrorInvalidParameter", f"Invalid OofState {state!r}.")
        if audience not in ("None", "Known", "All"):
            return Refused("ErrorInvalidParameter", f"Invalid ExternalAudience {audience!r}.")
        held = self.oof_of(mailbox)
        start, end = text("Duration", "StartTime"), text("Duration", "EndTime")
        if start is not None and end is not None:
            try:
                begin, finish = _when(start), _when(end)
            except ValueError:
                return Refused("ErrorInvalidParameter", "Invalid Duration.")
            if state == "Scheduled" and finish <= begin:
                return Refused("ErrorInvalidScheduledOofDuration",
                               "The end time must be after the start time.")
            held["start"] = begin.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            held["end"] = finish.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        elif state == "Scheduled":
            return Refused("ErrorInvalidScheduledOofDuration", "A schedule needs a Duration.")
        held["state"], held["audience"] = state, audience
        for key, tag in (("internal", "InternalReply"), ("external", "ExternalReply")):
            value = text(tag, "Message")
            if value is not None:
                held[key] = _oof_html(value)
        self.oof[mailbox] = held
        return None

    def _oof_answer(self, name: str, refused: Refused | None, content: str = "") -> str:
        if refused is None:
            message = ('<ResponseMessage ResponseClass="Success"><ResponseCode>NoError'
                       "</ResponseCode></ResponseMessage>")
        else:
            message = (f'<ResponseMessage ResponseClass="Error"><MessageText>'
                       f"{escape(refused.message)}</MessageText><ResponseCode>{refused.code}"
                       "</ResponseCode><DescriptiveLinkKey>0</DescriptiveLinkKey>"
                       "</ResponseMessage>")
            content = ""
        return (
            f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}">'
            f"{self._version_header()}<s:Body>"
            f'<{name}Response xmlns="{M}">{message}{content}</{name}Response>'
            "</s:Body></s:Envelope>"
        )

    # ------------------------------------------------------------- operations

    def _operate(self, operation: str, elem: Any, mailbox: str | None, record: Recorded) -> str:
        if operation == "ConvertId" and not self.convert_id:
            raise Fault("ErrorInvalidRequest", "The request is invalid.")
        if operation == "ConvertId":
            sources = elem.find(q(M, "SourceIds"))
            count = len(sources) if sources is not None else 0
            record.codes.append("ErrorInvalidIdMalformed")
            return "".join(
                self._message("ConvertId", error=Refused("ErrorInvalidIdMalformed",
                                                         "Id is malformed."))
                for _ in range(count)
            )
        handlers = {
            "CreateItem": self._create, "UpdateItem": self._update, "DeleteItem": self._delete,
            "GetItem": self._get, "FindItem": self._find,
        }
        if operation not in handlers:
            self.unexpected.append(operation)
            raise Fault("ErrorInvalidOperation", f"The operation {operation} is not supported.")
        if mailbox is None:
            raise Fault("ErrorNonExistentMailbox", f"The service account {self.upn} has no "
                        "mailbox: item operations need ExchangeImpersonation.")
        parts: list[str] = handlers[operation](elem, mailbox, record)
        return "".join(parts)

    def _folder_owner(self, folder_ids: Any, mailbox: str) -> None:
        if folder_ids is None or len(folder_ids) == 0:
            raise Fault("ErrorInvalidRequest", "A folder id is required.")
        for folder in folder_ids:
            if local(folder.tag) != "DistinguishedFolderId" or folder.get("Id") != "calendar":
                raise Refused("ErrorFolderNotFound", "The specified folder could not be found.")
            address = folder.find(f"{q(T, 'Mailbox')}/{q(T, 'EmailAddress')}")
            if address is not None and (address.text or "").strip().lower() != mailbox:
                raise Refused("ErrorAccessDenied", "Access is denied. Check credentials and try "
                              "again.")

    def _create(self, elem: Any, mailbox: str, record: Recorded) -> list[str]:
        if elem.get("SendMeetingInvitations") != "SendToNone":
            self.anomalies.append(f"CreateItem SendMeetingInvitations="
                                  f"{elem.get('SendMeetingInvitations')}")
        items = elem.find(q(M, "Items"))
        record.count = len(items) if items is not None else 0
        try:
            self._folder_owner(elem.find(q(M, "SavedItemFolderId")), mailbox)
        except Refused as refused:
            record.codes.append(refused.code)
            return [self._message("CreateItem", "<m:Items/>", refused)] * record.count
        out: list[str] = []
        for child in items if items is not None else []:
            try:
                if local(child.tag) != "CalendarItem":
                    raise Refused("ErrorInvalidItemForOperationCreateItem", "Not a calendar item.")
                item = Item(self._new_id(), self._new_changekey(), mailbox,
                            created=time.monotonic())
                for prop in child:
                    self._set(item, prop)
                self._validate(item)
                self.items[mailbox][item.id] = item
                record.codes.append("NoError")
                out.append(self._message(
                    "CreateItem", f"<m:Items><t:CalendarItem>{self._item_id(item)}"
                    "</t:CalendarItem></m:Items>",
                ))
            except Refused as refused:
                record.codes.append(refused.code)
                out.append(self._message("CreateItem", "<m:Items/>", refused))
        return out

    def _update(self, elem: Any, mailbox: str, record: Recorded) -> list[str]:
        changes = elem.find(q(M, "ItemChanges"))
        out: list[str] = []
        for change in changes if changes is not None else []:
            record.count += 1
            try:
                item_id = change.find(q(T, "ItemId"))
                stored = self.items[mailbox].get(item_id.get("Id") if item_id is not None else "")
                if stored is None:
                    raise Refused("ErrorItemNotFound",
                                  "The specified object was not found in the store.")
                changed = Item(stored.id, stored.changekey, mailbox, dict(stored.fields),
                               list(stored.categories), dict(stored.extended), stored.created,
                               stored.updates)
                for update in change.find(q(T, "Updates")):
                    kind = local(update.tag)
                    uri = update[0]
                    if kind == "SetItemField":
                        inner = update.find(q(T, "CalendarItem"))
                        if inner is None:
                            raise Refused("ErrorInvalidPropertySet", "Not a calendar item.")
                        name = self._uri_name(uri)
                        for prop in inner:
                            if local(prop.tag) == name or (
                                local(uri.tag) == "ExtendedFieldURI"
                                and local(prop.tag) == "ExtendedProperty"
                            ):
                                self._set(changed, prop)
                    elif kind == "DeleteItemField":
                        self._unset(changed, uri)
                    else:
                        self.anomalies.append(f"UpdateItem {kind}")
                self._validate(changed)
                changed.changekey = self._new_changekey()
                changed.updates += 1
                self.items[mailbox][changed.id] = changed
                record.codes.append("NoError")
                out.append(self._message(
                    "UpdateItem", f"<m:Items><t:CalendarItem>{self._item_id(changed)}"
                    '</t:CalendarItem></m:Items><m:ConflictResults><t:Count>0</t:Count>'
                    "</m:ConflictResults>",
                ))
            except Refused as refused:
                record.codes.append(refused.code)
                out.append(self._message("UpdateItem", "<m:Items/>", refused))
        return out

    def _delete(self, elem: Any, mailbox: str, record: Recorded) -> list[str]:
        ids = elem.find(q(M, "ItemIds"))
        out: list[str] = []
        for item_id in ids if ids is not None else []:
            record.count += 1
            if self.items[mailbox].pop(item_id.get("Id", ""), None) is None:
                refused = Refused("ErrorItemNotFound",
                                  "The specified object was not found in the store.")
                record.codes.append(refused.code)
                out.append(self._message("DeleteItem", error=refused))
            else:
                record.codes.append("NoError")
                out.append(self._message("DeleteItem"))
        return out

    def _get(self, elem: Any, mailbox: str, record: Recorded) -> list[str]:
        shape = elem.find(q(M, "ItemShape"))
        ids = elem.find(q(M, "ItemIds"))
        out: list[str] = []
        for item_id in ids if ids is not None else []:
            record.count += 1
            stored = self.items[mailbox].get(item_id.get("Id", ""))
            if stored is None:
                refused = Refused("ErrorItemNotFound",
                                  "The specified object was not found in the store.")
                record.codes.append(refused.code)
                out.append(self._message("GetItem", "<m:Items/>", refused))
                continue
            record.codes.append("NoError")
            out.append(self._message(
                "GetItem", f"<m:Items>{self._render(stored, shape)}</m:Items>"
            ))
        return out

    def _find(self, elem: Any, mailbox: str, record: Recorded) -> list[str]:
        try:
            self._folder_owner(elem.find(q(M, "ParentFolderIds")), mailbox)
        except Refused as refused:
            record.codes.append(refused.code)
            return [self._message("FindItem", error=refused)]
        restriction = elem.find(q(M, "Restriction"))
        matching = [
            item for item in self.items[mailbox].values()
            if restriction is None or len(restriction) == 0 or self._matches(item, restriction[0])
        ]
        view = elem.find(q(M, "IndexedPageItemView"))
        offset = int(view.get("Offset", "0")) if view is not None else 0
        size = int(view.get("MaxEntriesReturned", "1000")) if view is not None else 1000
        page = matching[offset:offset + size]
        last = offset + len(page) >= len(matching)
        record.count = len(page)
        record.codes.append("NoError")
        shape = elem.find(q(M, "ItemShape"))
        rendered = "".join(self._render(item, shape) for item in page)
        next_offset = f' IndexedPagingOffset="{offset + len(page)}"' if not last else ""
        return [self._message(
            "FindItem",
            f'<m:RootFolder{next_offset} TotalItemsInView="{len(matching)}" '
            f'IncludesLastItemInRange="{"true" if last else "false"}">'
            f"<t:Items>{rendered}</t:Items></m:RootFolder>",
        )]

    # ------------------------------------------------------------- item helpers

    @staticmethod
    def _new_id() -> str:
        digest = hashlib.sha256(f"item-{next(_ids)}-{secrets.token_hex(4)}".encode()).digest()
        return "AAMkAD" + base64.b64encode(digest + digest[:12]).decode()

    @staticmethod
    def _new_changekey() -> str:
        return "DwAAABYA" + base64.b64encode(secrets.token_bytes(12)).decode()

    @staticmethod
    def _item_id(item: Item) -> str:
        return f"<t:ItemId Id={quoteattr(item.id)} ChangeKey={quoteattr(item.changekey)}/>"

    @staticmethod
    def _ext_key(uri: Any) -> tuple[str, str, str]:
        set_id = (uri.get("PropertySetId") or uri.get("DistinguishedPropertySetId") or "").lower()
        name = uri.get("PropertyName") or uri.get("PropertyTag") or uri.get("PropertyId") or ""
        return set_id, name, uri.get("PropertyType", "")

    @staticmethod
    def _uri_name(uri: Any) -> str:
        return str(uri.get("FieldURI", "")).split(":")[-1]

    def _set(self, item: Item, prop: Any) -> None:
        name = local(prop.tag)
        if name == "ExtendedProperty":
            uri = prop.find(q(T, "ExtendedFieldURI"))
            value = prop.find(q(T, "Value"))
            if uri is None or value is None:
                raise Refused("ErrorInvalidExtendedProperty", "An extended property is malformed.")
            item.extended[self._ext_key(uri)] = value.text or ""
        elif name == "Categories":
            item.categories = [(s.text or "") for s in prop.findall(q(T, "String"))]
        elif name in ("StartTimeZone", "EndTimeZone", "MeetingTimeZone"):
            item.fields[name] = prop.get("Id") or ""
        elif name in ("RequiredAttendees", "OptionalAttendees", "Resources"):
            self.anomalies.append(f"{name} sent")
        elif name == "Body":
            if (prop.text or "").strip():
                self.anomalies.append("a body was sent")
        else:
            item.fields[name] = (prop.text or "").strip()

    def _unset(self, item: Item, uri: Any) -> None:
        if local(uri.tag) == "ExtendedFieldURI":
            item.extended.pop(self._ext_key(uri), None)
            return
        name = self._uri_name(uri)
        if name == "Categories":
            item.categories = []
        else:
            item.fields.pop(name, None)

    def _validate(self, item: Item) -> None:
        if item.subject in self.refuse_subjects:
            raise Refused(self.refuse_subjects[item.subject], "Refused for this test.")
        if len(item.subject) > 255:
            raise Refused("ErrorInvalidPropertyValue", "The subject is too long.")
        for key in ("Start", "End"):
            if key not in item.fields:
                raise Refused("ErrorInvalidPropertyValue", f"{key} is required.")
            try:
                _when(item.fields[key])
            except ValueError as exc:
                raise Fault("ErrorSchemaValidation", f"{key} is not a date and time.") from exc
        for key in ("StartTimeZone", "EndTimeZone"):
            if key in item.fields:
                iana(item.fields[key])
        if item.end < item.start:
            raise Refused("ErrorCalendarEndDateIsEarlierThanStartDate",
                          "The end date is earlier than the start date.")
        if item.free_busy not in FREE_BUSY:
            raise Fault("ErrorSchemaValidation", f"LegacyFreeBusyStatus {item.free_busy!r}.")
        if item.fields.get("Sensitivity", "Normal") not in SENSITIVITY:
            raise Fault("ErrorSchemaValidation", "Sensitivity is invalid.")
        if _bool(item.fields.get("ReminderIsSet", "true")):
            self.anomalies.append(f"{item.id[:12]}: ReminderIsSet is not false")
        if item.all_day:
            zone = zoneinfo.ZoneInfo(item.zone)
            for key, moment in (("Start", item.start), ("End", item.end)):
                if moment.astimezone(zone).time() != dt.time():
                    self.anomalies.append(
                        f"{item.id[:12]}: all-day {key} {item.fields[key]} is not midnight in "
                        f"{item.zone}"
                    )

    def _matches(self, item: Item, node: Any) -> bool:
        kind = local(node.tag)
        if kind == "And":
            return all(self._matches(item, child) for child in node)
        if kind == "Or":
            return any(self._matches(item, child) for child in node)
        if kind == "Not":
            return not self._matches(item, node[0])
        uri = node[0]
        value = self._value(item, uri)
        if kind == "Exists":
            return value is not None
        if kind in ("IsEqualTo", "IsNotEqualTo"):
            constant = node.find(f"{q(T, 'FieldURIOrConstant')}/{q(T, 'Constant')}")
            if constant is None:
                raise Fault("ErrorUnsupportedQueryFilter", "Only constants are supported.")
            equal = value == constant.get("Value")
            return equal if kind == "IsEqualTo" else not equal
        raise Fault("ErrorUnsupportedQueryFilter", f"The restriction {kind} is not supported.")

    def _value(self, item: Item, uri: Any) -> str | None:
        if local(uri.tag) == "ExtendedFieldURI":
            set_id, name, _ = self._ext_key(uri)
            return item.ext(set_id, name)
        return item.fields.get(self._uri_name(uri))

    def _render(self, item: Item, shape: Any) -> str:
        base = shape.findtext(q(T, "BaseShape")) if shape is not None else "Default"
        parts = [self._item_id(item)]
        if base in ("Default", "AllProperties"):
            for name in ("Subject", "Sensitivity", "ReminderIsSet", "Start", "End",
                         "IsAllDayEvent", "LegacyFreeBusyStatus"):
                if name in item.fields:
                    parts.append(f"<t:{name}>{escape(item.fields[name])}</t:{name}>")
            if item.categories:
                parts.append("<t:Categories>" + "".join(
                    f"<t:String>{escape(c)}</t:String>" for c in item.categories
                ) + "</t:Categories>")
        extra = shape.find(q(T, "AdditionalProperties")) if shape is not None else None
        for uri in extra if extra is not None else []:
            if local(uri.tag) == "ExtendedFieldURI":
                key = self._ext_key(uri)
                value = item.ext(key[0], key[1])
                if value is not None:
                    attrs = " ".join(f"{k}={quoteattr(v)}" for k, v in uri.attrib.items())
                    parts.append(
                        f"<t:ExtendedProperty><t:ExtendedFieldURI {attrs}/>"
                        f"<t:Value>{escape(value)}</t:Value></t:ExtendedProperty>"
                    )
            elif local(uri.tag) == "FieldURI":
                name = self._uri_name(uri)
                if name in item.fields and base == "IdOnly":
                    parts.append(f"<t:{name}>{escape(item.fields[name])}</t:{name}>")
        return f"<t:CalendarItem>{''.join(parts)}</t:CalendarItem>"
