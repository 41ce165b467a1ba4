"""An HTTPS stand-in for Google's OAuth token endpoint and the Calendar API v3, for tests.

One aiohttp server on a free loopback port plays both hosts:
`https://localhost:PORT/token` is the token endpoint,
`https://127.0.0.1:PORT/calendar/v3` the Calendar API, and
`https://127.0.0.1:PORT/batch/calendar/v3` its batch endpoint (a trustme
certificate covers both names). It behaves like the real services where
the provider depends on it:

* token endpoint: the JWT bearer grant, the assertion's RS256 signature
  checked against the service account's public key (400 `invalid_grant`
  "Invalid JWT Signature."), audience the token URL, a subject that must be
  a user of the domain (400 `invalid_grant` "Invalid email or User ID"), a
  scope the administrator authorized for the client id (401
  `unauthorized_client` otherwise), scriptable answers.
* Calendar API: bearer tokens checked (401 `authError`), scope checked (403
  `insufficientPermissions`); `primary` and other calendars per user (404
  `notFound` for an unknown one); client-supplied ids (base32hex, 5-1024
  characters, else 400 `invalid`; 409 `duplicate` when the id was ever used,
  deleted events included); deleted events readable with `status:
  cancelled`, 410 `deleted` on a second delete; `privateExtendedProperty`
  filters, `showDeleted`, paging; payload validation with 400s (unknown
  fields, mixed date kinds, bad zones, end before start); out-of-office
  constraints (primary calendar only, never all-day, no attendees, the
  event type never changes); a per-user rate limit (403
  `rateLimitExceeded` past `user_rate` requests in `rate_window` seconds);
  scripted errors; and an insert whose response is lost (performed, then
  the connection is dropped).
* batch: multipart/mixed of `application/http` parts, each with its own
  Authorization (else the outer one), at most 50, answered multipart/mixed
  with `Content-ID: <response-item-N>`.

* Gmail settings (`https://127.0.0.1:PORT/gmail/v1`): GET and PUT
  `users/{user}/settings/vacation` (a full replace, like
  users.settings.updateVacation), the token's scope checked
  (gmail.settings.basic, 403 `insufficientPermissions` otherwise) and the
  user the token acts as (403 `forbidden` for another); VacationSettings
  validated (unknown fields, times as epoch milliseconds, end after start).
  `set_user_vacation` is the employee editing their responder in Gmail.
Errors use Google's body shape: `{"error": {"errors": [{"domain", "reason",
"message"}], "code", "message"}}`. Everything is recorded for assertions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import re
import secrets
import socket
import ssl
import time
import zoneinfo
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import jwt
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

Answer = tuple[int, Any]

CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar.events"
GMAIL_SCOPE = "https://www.googleapis.com/auth/gmail.settings.basic"
VACATION_FIELDS = frozenset({
    "enableAutoReply", "responseSubject", "responseBodyPlainText", "responseBodyHtml",
    "restrictToContacts", "restrictToDomain", "startTime", "endTime",
})
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
EVENT_FIELDS = frozenset({
    "id", "summary", "description", "start", "end", "transparency", "status", "visibility",
    "reminders", "extendedProperties", "eventType", "outOfOfficeProperties", "attendees",
    "guestsCanInviteOthers", "location", "colorId", "kind", "etag",
})
_ID = re.compile(r"^[0-9a-v]{5,1024}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?$")
_ZONES = frozenset(zoneinfo.available_timezones()) | {"UTC"}
_AUTODECLINE = frozenset({"declineNone", "declineAllConflictingInvitations",
                          "declineOnlyNewConflictingInvitations"})
_server_ids = itertools.count(1)


def google_error(status: int, reason: str, message: str, domain: str = "global") -> Answer:
    return status, {"error": {"errors": [{"domain": domain, "reason": reason, "message": message}],
                              "code": status, "message": message}}


def make_key(client_email: str, client_id: str = "109876543210987654321"
             ) -> tuple[str, rsa.RSAPublicKey]:
    """A service account JSON key (as the Cloud console gives it) and its public key."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    key = {
        "type": "service_account", "project_id": "absence-sync-test",
        "private_key_id": secrets.token_hex(20), "private_key": pem,
        "client_email": client_email, "client_id": client_id,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": "https://oauth2.googleapis.com/token",
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/x",
        "universe_domain": "googleapis.com",
    }
    return json.dumps(key, indent=2), private.public_key()


@dataclass
class Recorded:
    at: float
    method: str
    path: str
    user: str | None = None
    batched: bool = False
    status: int = 0


@dataclass
class Account:
    client_email: str
    client_id: str
    public_key: rsa.RSAPublicKey
    scopes: set[str] = field(default_factory=set)  # authorized by the Workspace admin


class LoseResponse(Exception):
    """Abort the HTTP exchange after the work is done (the client never hears back)."""


@dataclass
class GoogleServer:
    ca: trustme.CA = field(default_factory=trustme.CA)
    accounts: dict[str, Account] = field(default_factory=dict)  # client_email -> account
    users: set[str] = field(default_factory=set)
    #: user -> calendar id -> event id -> event (deleted events stay, status cancelled)
    calendars: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    tokens: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    token_lifetime: int = 3600
    token_requests: list[dict[str, str]] = field(default_factory=list)
    token_scripts: dict[str, list[Answer]] = field(default_factory=lambda: defaultdict(list))
    requests: list[Recorded] = field(default_factory=list)
    unexpected: list[Recorded] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    batch_users: list[set[str | None]] = field(default_factory=list)
    #: methods the Calendar API answers 405 to (a double that only patches, say)
    refused_methods: set[str] = field(default_factory=set)
    scripts: dict[str, list[Answer]] = field(default_factory=lambda: defaultdict(list))
    lose_insert: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    user_rate: int = 600
    rate_window: float = 60.0
    arrivals: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    rate_limited: list[Recorded] = field(default_factory=list)
    page_size: int = 250
    #: user -> VacationSettings as Gmail holds them
    vacations: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: seconds every Calendar API request (or batch) takes before it is answered
    latency: float = 0.0
    port: int = 0
    ca_path: Path | None = None
    _runner: web.AppRunner | None = None

    # ------------------------------------------------------------- lifecycle

    async def start(self, directory: Path) -> None:
        self.ca_path = directory / "google-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ssl)
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0,
                                     handler_cancellation=True)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=server_ssl).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def token_url(self) -> str:
        return f"https://localhost:{self.port}/token"

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/calendar/v3"

    @property
    def gmail_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/gmail/v1"

    def vacation(self, user: str) -> dict[str, Any]:
        return dict(self.vacations.get(user.lower(), {"enableAutoReply": False}))

    def set_user_vacation(self, user: str, settings: dict[str, Any]) -> None:
        """The employee edits their vacation responder in Gmail."""
        status, body = self._put_vacation(user.lower(), settings)
        assert status == 200, body

    # ------------------------------------------------------------- scripting

    def add_account(self, client_email: str, *, scopes: tuple[str, ...] = (CALENDAR_SCOPE,),
                    client_id: str = "109876543210987654321") -> str:
        """A service account whose client id the administrator authorized for `scopes`;
        returns its JSON key."""
        key, public = make_key(client_email, client_id)
        self.accounts[client_email] = Account(client_email, client_id, public, set(scopes))
        return key

    def add_user(self, address: str, *calendars: str) -> str:
        self.users.add(address.lower())
        boxes = self.calendars[address.lower()]
        boxes.setdefault("primary", {})
        for calendar in calendars:
            boxes.setdefault(calendar, {})
        return address

    def script(self, user: str, status: int, reason: str, message: str = "scripted",
               times: int = 1, domain: str = "global") -> None:
        """The next `times` API requests as `user` ("*": anyone) get this error."""
        for _ in range(times):
            self.scripts[user.lower()].append(google_error(status, reason, message, domain))

    def script_token(self, user: str, status: int, body: dict[str, Any]) -> None:
        self.token_scripts[user.lower()].append((status, body))

    def events(self, user: str, calendar: str = "primary", *,
               deleted: bool = False) -> list[dict[str, Any]]:
        box = self.calendars.get(user.lower(), {}).get(calendar, {})
        return [e for e in box.values() if deleted or e.get("status") != "cancelled"]

    def api_requests(self, user: str) -> list[Recorded]:
        return [r for r in self.requests if r.user == user.lower()]

    # ------------------------------------------------------------- routing

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        record = Recorded(time.monotonic(), request.method, request.raw_path)
        path = request.raw_path.split("?", 1)[0]
        try:
            if path == "/token" and request.method == "POST":
                response = await self._token(request)
            elif path.startswith("/calendar/v3/"):
                self.requests.append(record)
                raw = await request.read()
                if self.latency:
                    await asyncio.sleep(self.latency)
                status, body = self._api(request.method, request.raw_path,
                                         request.headers.get("Authorization", ""), raw, record)
                response = _respond(status, body)
            elif path.startswith("/gmail/v1/"):
                self.requests.append(record)
                raw = await request.read()
                status, body = self._gmail(request.method, path,
                                           request.headers.get("Authorization", ""), raw, record)
                response = _respond(status, body)
            elif path == "/batch/calendar/v3" and request.method == "POST":
                response = await self._batch(request)
            else:
                self.unexpected.append(record)
                status, body = google_error(404, "notFound", "Not Found")
                response = _respond(status, body)
        except LoseResponse:
            if request.transport is not None:
                request.transport.abort()
            raise web.HTTPInternalServerError from None  # never reaches the client
        except Exception as exc:  # a bug in the fake must show, not hang a test
            status, body = google_error(500, "backendError", f"fake server bug: {exc!r}")
            response = _respond(status, body)
        record.status = response.status
        return response

    # ------------------------------------------------------------- token endpoint

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        assertion = form.get("assertion", "")
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            unverified = {}
        subject = str(unverified.get("sub", "")).lower()
        self.token_requests.append({"grant_type": form.get("grant_type", ""),
                                    "iss": str(unverified.get("iss", "")), "sub": subject,
                                    "scope": str(unverified.get("scope", "")),
                                    "aud": str(unverified.get("aud", ""))})
        if self.token_scripts.get(subject):
            status, body = self.token_scripts[subject].pop(0)
            return web.json_response(body, status=status)
        if form.get("grant_type") != JWT_BEARER:
            return _oauth(400, "unsupported_grant_type", "Invalid grant_type: "
                          + form.get("grant_type", ""))
        account = self.accounts.get(str(unverified.get("iss", "")))
        if account is None:
            return _oauth(400, "invalid_grant", "Invalid grant: account not found")
        try:
            claims = jwt.decode(assertion, account.public_key, algorithms=["RS256"],
                                audience=self.token_url, options={"require": ["exp", "iat"]})
        except jwt.InvalidAudienceError:
            return _oauth(400, "invalid_grant", "Invalid JWT: Failed audience check.")
        except jwt.PyJWTError:
            return _oauth(400, "invalid_grant", "Invalid JWT Signature.")
        if claims["exp"] - claims["iat"] > 3600:
            return _oauth(400, "invalid_grant", "Invalid JWT: Token must be a short-lived token "
                          "(60 minutes) and in a reasonable timeframe.")
        scopes = set(str(claims.get("scope", "")).split())
        if not scopes or not scopes <= account.scopes:
            return _oauth(401, "unauthorized_client", "Client is unauthorized to retrieve access "
                          "tokens using this method, or client not authorized for any of the "
                          "scopes requested.")
        if subject not in self.users:
            return _oauth(400, "invalid_grant", "Invalid email or User ID")
        token = "ya29." + secrets.token_urlsafe(32)
        self.tokens[token] = (subject, " ".join(sorted(scopes)),
                              time.monotonic() + self.token_lifetime)
        return web.json_response({"access_token": token, "expires_in": self.token_lifetime,
                                  "token_type": "Bearer"})

    # ------------------------------------------------------------- batch

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        content_type = request.headers.get("Content-Type", "")
        match = re.search(r'boundary="?([^";]+)"?', content_type)
        if not content_type.startswith("multipart/mixed") or match is None:
            status, body = google_error(400, "badRequest",
                                        "Batch requests must be multipart/mixed.")
            return _respond(status, body)
        raw = await request.read()
        if self.latency:
            await asyncio.sleep(self.latency)
        outer_auth = request.headers.get("Authorization", "")
        parts = []
        for chunk in raw.split(b"--" + match.group(1).encode())[1:]:
            if chunk.startswith(b"--"):
                break
            head, _, inner = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
            content_id = ""
            for line in head.decode().split("\r\n"):
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-id":
                    content_id = value.strip().strip("<>")
            request_head, _, body = inner.partition(b"\r\n\r\n")
            lines = request_head.decode().split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if body.endswith(b"\r\n"):
                body = body[:-2]
            parts.append((content_id, method, target, headers, body))
        if not parts or len(parts) > 50:
            status, answer = google_error(400, "badRequest",
                                          "A batch holds between 1 and 50 requests.")
            return _respond(status, answer)
        self.batch_sizes.append(len(parts))
        boundary = "batch_" + secrets.token_hex(8)
        out: list[bytes] = []
        arrived = time.monotonic()
        for content_id, method, target, headers, body in parts:
            record = Recorded(arrived, method, target, batched=True)
            self.requests.append(record)
            status, answer = self._api(method, target, headers.get("authorization", outer_auth),
                                       body, record)
            record.status = status
            text = b"" if answer is None else json.dumps(answer).encode()
            reason = {200: "OK", 204: "No Content"}.get(status, "Error")
            out.append(
                (f"--{boundary}\r\nContent-Type: application/http\r\n"
                 f"Content-ID: <response-{content_id}>\r\n\r\n"
                 f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=UTF-8\r\n"
                 f"Content-Length: {len(text)}\r\n\r\n").encode() + text + b"\r\n"
            )
        self.batch_users.append({r.user for r in self.requests[-len(parts):]})
        out.append(f"--{boundary}--\r\n".encode())
        return web.Response(body=b"".join(out), status=200,
                            headers={"Content-Type": f"multipart/mixed; boundary={boundary}"})

    # ------------------------------------------------------------- Calendar API

    def _api(self, method: str, target: str, authorization: str, raw: bytes,
             record: Recorded) -> Answer:
        token = authorization[7:] if authorization.startswith("Bearer ") else ""
        granted = self.tokens.get(token)
        if granted is None or granted[2] < time.monotonic():
            return 401, {"error": {"errors": [{
                "domain": "global", "reason": "authError", "message": "Invalid Credentials",
                "locationType": "header", "location": "Authorization"}],
                "code": 401, "message": "Invalid Credentials"}}
        user, scopes, _ = granted
        record.user = user
        if CALENDAR_SCOPE not in scopes.split():
            return google_error(403, "insufficientPermissions",
                                "Request had insufficient authentication scopes.")
        arrivals = self.arrivals[user]
        arrivals.append(record.at)
        recent = [t for t in arrivals if t > record.at - self.rate_window]
        self.arrivals[user] = recent
        if len(recent) > self.user_rate:
            self.rate_limited.append(record)
            return google_error(403, "rateLimitExceeded", "Rate Limit Exceeded", "usageLimits")
        if method in self.refused_methods:
            return google_error(405, "methodNotAllowed", "Method Not Allowed")
        scripted = self.scripts.get(user) or self.scripts.get("*")
        if scripted:
            return scripted.pop(0)
        path, _, query = target.partition("?")
        parts = [unquote(p) for p in path.split("/")[3:]]  # after /calendar/v3
        if len(parts) not in (3, 4) or parts[0] != "calendars" or parts[2] != "events":
            return google_error(404, "notFound", "Not Found")
        calendar = parts[1]
        if calendar == user:
            calendar = "primary"
        box = self.calendars.get(user, {}).get(calendar)
        if box is None:
            return google_error(404, "notFound", "Not Found")
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            return google_error(400, "parseError", "Parse Error")
        params = {k: v for k, v in parse_qs(query, keep_blank_values=True).items()}
        if len(parts) == 3:
            if method == "POST":
                answer = self._insert(user, calendar, box, payload)
                if answer[0] == 200 and self.lose_insert.get(user, 0) > 0:
                    self.lose_insert[user] -= 1
                    raise LoseResponse
                return answer
            if method == "GET":
                return self._list(box, params)
            return google_error(405, "methodNotAllowed", "Method Not Allowed")
        event_id = parts[3]
        event = box.get(event_id)
        if event is None:
            return google_error(404, "notFound", "Not Found")
        if method == "GET":
            return 200, event
        if method == "DELETE":
            if event.get("status") == "cancelled":
                return google_error(410, "deleted", "Resource has been deleted")
            event["status"] = "cancelled"
            return 204, None
        if method in ("PUT", "PATCH"):
            if event.get("status") == "cancelled":
                return google_error(410, "deleted", "Resource has been deleted")
            merged = dict(payload or {}) if method == "PUT" else {**event, **(payload or {})}
            merged.pop("kind", None)
            merged.pop("etag", None)
            if merged.get("id", event_id) != event_id:
                return google_error(400, "invalid", "The event id cannot change.")
            merged["id"] = event_id
            if (merged.get("eventType") or "default") != (event.get("eventType") or "default"):
                return google_error(400, "eventTypeChangeForbidden",
                                    "The event type of an event cannot be changed.")
            problem = validate_event(merged, calendar)
            if problem is not None:
                return problem
            box[event_id] = _stored(merged)
            return 200, box[event_id]
        return google_error(405, "methodNotAllowed", "Method Not Allowed")

    # ------------------------------------------------------------- Gmail settings

    def _gmail(self, method: str, path: str, authorization: str, raw: bytes,
               record: Recorded) -> Answer:
        token = authorization[7:] if authorization.startswith("Bearer ") else ""
        granted = self.tokens.get(token)
        if granted is None or granted[2] < time.monotonic():
            return google_error(401, "authError", "Invalid Credentials")
        user, scopes, _ = granted
        record.user = user
        if GMAIL_SCOPE not in scopes.split():
            return google_error(403, "insufficientPermissions",
                                "Request had insufficient authentication scopes.")
        parts = [unquote(p) for p in path.split("/")[3:]]  # users/{id}/settings/vacation
        if len(parts) != 4 or parts[0] != "users" or parts[2:] != ["settings", "vacation"]:
            return google_error(404, "notFound", "Not Found")
        if parts[1].lower() not in ("me", user):
            return google_error(403, "forbidden", "Delegation denied for " + user)
        scripted = self.scripts.get(user) or self.scripts.get("*")
        if scripted:
            return scripted.pop(0)
        if method == "GET":
            return 200, self.vacation(user)
        if method == "PUT":
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                return google_error(400, "parseError", "Parse Error")
            return self._put_vacation(user, payload)
        return google_error(405, "methodNotAllowed", "Method Not Allowed")

    def _put_vacation(self, user: str, payload: Any) -> Answer:
        if not isinstance(payload, dict):
            return google_error(400, "invalidArgument", "VacationSettings required")
        for key in payload:
            if key not in VACATION_FIELDS:
                return google_error(400, "invalidArgument",
                                    f'Invalid JSON payload received. Unknown name "{key}"')
        times = {}
        for key in ("startTime", "endTime"):
            if key in payload:
                try:
                    times[key] = int(payload[key])
                except (TypeError, ValueError):
                    return google_error(400, "invalidArgument", f"Invalid value at '{key}'")
        if len(times) == 2 and times["endTime"] <= times["startTime"]:
            return google_error(400, "invalidArgument", "Start time must be before end time")
        stored = {k: v for k, v in payload.items() if k not in times}
        stored.update({k: str(v) for k, v in times.items()})
        stored["enableAutoReply"] = bool(payload.get("enableAutoReply", False))
        for key in ("restrictToContacts", "restrictToDomain"):
            stored[key] = bool(payload.get(key, False))
        self.vacations[user] = stored
        return 200, dict(stored)

    def _insert(self, user: str, calendar: str, box: dict[str, dict[str, Any]],
                payload: Any) -> Answer:
        if not isinstance(payload, dict):
            return google_error(400, "required", "Missing event body.")
        event_id = payload.get("id")
        if event_id is None:
            event_id = f"{next(_server_ids):05d}" + secrets.token_hex(8)
        elif not isinstance(event_id, str) or not _ID.match(event_id):
            return google_error(400, "invalid", "Invalid resource id value.")
        if event_id in box:
            return google_error(409, "duplicate", "The requested identifier already exists.")
        problem = validate_event(payload, calendar)
        if problem is not None:
            return problem
        event = _stored({**payload, "id": event_id})
        box[event_id] = event
        return 200, event

    def _list(self, box: dict[str, dict[str, Any]], params: dict[str, list[str]]) -> Answer:
        events = list(box.values())
        if params.get("showDeleted", ["false"])[0] != "true":
            events = [e for e in events if e.get("status") != "cancelled"]
        for condition in params.get("privateExtendedProperty", []):
            name, sep, value = condition.partition("=")
            if not sep:
                return google_error(400, "invalid", "Invalid privateExtendedProperty value.")
            events = [e for e in events
                      if e.get("extendedProperties", {}).get("private", {}).get(name) == value]
        size = min(int(params.get("maxResults", ["250"])[0]), self.page_size)
        start = int(params.get("pageToken", ["0"])[0] or 0)
        body: dict[str, Any] = {"kind": "calendar#events", "items": events[start:start + size]}
        if start + size < len(events):
            body["nextPageToken"] = str(start + size)
        return 200, body


def _stored(event: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "calendar#event", "etag": f'"{secrets.token_hex(6)}"',
            "status": "confirmed", "eventType": "default", **event}


def _respond(status: int, body: Any) -> web.Response:
    if status == 204 or body is None:
        return web.Response(status=status)
    return web.json_response(body, status=status)


def _oauth(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _moment(value: Any, key: str) -> tuple[str, dt.datetime] | Answer:
    """('date' or 'dateTime', comparable UTC moment), or a 400."""
    if not isinstance(value, dict):
        return google_error(400, "required", f"Missing {key} time.")
    if "date" in value and "dateTime" in value:
        return google_error(400, "invalid", f"Invalid {key} time: date and dateTime.")
    if "date" in value:
        if not _DATE.match(str(value["date"])):
            return google_error(400, "invalid", f"Invalid {key} date.")
        return "date", dt.datetime.fromisoformat(value["date"]).replace(tzinfo=dt.UTC)
    text = str(value.get("dateTime", ""))
    if not _DATETIME.match(text):
        return google_error(400, "invalid", f"Invalid {key} time.")
    zone = value.get("timeZone")
    if zone is not None and zone not in _ZONES:
        return google_error(400, "invalid", f"Invalid time zone definition for {key} time.")
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        if zone is None:
            return google_error(400, "missingTimeZone",
                                "Missing time zone definition for start time.")
        moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(zone))
    return "dateTime", moment.astimezone(dt.UTC)


def validate_event(event: dict[str, Any], calendar: str) -> Answer | None:
    """Google's 400s for event bodies the provider could plausibly get wrong."""
    for key in event:
        if key not in EVENT_FIELDS:
            return google_error(400, "invalid", f"Invalid field: {key}.")
    start = _moment(event.get("start"), "start")
    end = _moment(event.get("end"), "end")
    for value in (start, end):
        if isinstance(value[0], int):
            return value  # type: ignore[return-value]
    assert isinstance(start[1], dt.datetime) and isinstance(end[1], dt.datetime)
    if start[0] != end[0]:
        return google_error(400, "invalid", "Start and end times must either both be date "
                            "or both be dateTime.")
    if end[1] <= start[1]:
        return google_error(400, "timeRangeEmpty", "The specified time range is empty.")
    if len(str(event.get("summary", ""))) > 1024:
        return google_error(400, "invalid", "Summary too long.")
    for key, allowed in (("transparency", {"opaque", "transparent"}),
                         ("status", {"confirmed", "tentative", "cancelled"}),
                         ("visibility", {"default", "public", "private", "confidential"}),
                         ("eventType", {"default", "outOfOffice", "focusTime",
                                        "workingLocation"})):
        if key in event and event[key] not in allowed:
            return google_error(400, "invalid", f"Invalid value for {key}.")
    reminders = event.get("reminders")
    if reminders is not None and (not isinstance(reminders, dict) or (
        reminders.get("useDefault") and reminders.get("overrides")
    )):
        return google_error(400, "cannotUseDefaultRemindersAndSpecifyOverride",
                            "Cannot specify both default reminders and overrides at the same "
                            "time.")
    private = event.get("extendedProperties", {}).get("private", {})
    for name, value in private.items():
        if len(name) > 44 or len(str(value)) > 1024:
            return google_error(400, "invalid", "Extended property too long.")
    if event.get("eventType") == "outOfOffice":
        if calendar != "primary":
            return google_error(400, "eventTypeRestriction", "Out of office events can only "
                                "be created on the primary calendar.")
        if start[0] == "date":
            return google_error(400, "eventTypeRestriction",
                                "An out of office event cannot be an all-day event.")
        if event.get("attendees"):
            return google_error(400, "eventTypeRestriction",
                                "An out of office event cannot have attendees.")
        mode = (event.get("outOfOfficeProperties") or {}).get("autoDeclineMode", "declineNone")
        if mode not in _AUTODECLINE:
            return google_error(400, "invalid", "Invalid autoDeclineMode.")
    elif "outOfOfficeProperties" in event:
        return google_error(400, "invalid", "outOfOfficeProperties need an outOfOffice event.")
    return None
