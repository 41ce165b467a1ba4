"""An HTTPS stand-in for the Microsoft login host and Microsoft Graph, for tests.

One aiohttp server on a free loopback port plays both hosts, told apart by
the name the client used: `https://localhost:PORT` is the login authority,
`https://127.0.0.1:PORT/v1.0` is Graph (a trustme certificate covers both).
It behaves like the real services where the provider depends on it:

* login: OpenID discovery per tenant (400 AADSTS90002 for an unknown
  directory), the client-credentials token endpoint (secret by HTTP Basic or
  form field, or a certificate's signed client assertion), AADSTS700016 for
  a directory that never consented, AADSTS7000215 for a wrong secret, and
  scriptable errors.
* Graph: bearer tokens checked on every call; `/users/{u}/events` create
  (honouring `transactionId`), list with the extended-property `$filter` and
  paging, PATCH, DELETE; `$batch` (at most 20 steps, executed in parallel
  like Graph does); unknown mailboxes (404 ErrorInvalidUser), REST-disabled
  ones (404 MailboxNotEnabledForRESTAPI), access-denied ones (403
  ErrorAccessDenied); payload validation (400s); a real MailboxConcurrency
  check (429 when more than 4 requests are in flight for one mailbox);
  scripted 4xx/5xx replies with Retry-After.
* Mailbox settings: `GET /users/{u}/mailboxSettings[/automaticRepliesSetting]`
  and `PATCH /users/{u}/mailboxSettings` with `automaticRepliesSetting`
  (status disabled/alwaysEnabled/scheduled, externalAudience
  none/contactsOnly/all, schedule as dateTimeTimeZone), validated like Graph
  (400s), stored as Graph does: messages rewritten as HTML documents, the
  schedule returned in UTC; 403 ErrorAccessDenied for mailboxes in
  `settings_denied` (no MailboxSettings.ReadWrite). `set_user_reply` is the
  employee editing their reply in Outlook.

Everything is recorded for assertions: each request (arrival time, host,
path, mailbox, whether it came inside a batch), the maximum number in flight
per mailbox, batch sizes, token requests, and `early`: requests that arrived
while a Retry-After the server had sent for their mailbox was still running.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import itertools
import json
import re
import secrets
import socket
import ssl
import time
import zoneinfo
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, unquote_plus

import jwt
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes

GraphAnswer = tuple[int, dict[str, str], Any]

EVENT_PROPERTIES = frozenset({
    "subject", "body", "start", "end", "isAllDay", "showAs", "sensitivity", "categories",
    "isReminderOn", "reminderMinutesBeforeStart", "responseRequested", "attendees",
    "location", "importance", "singleValueExtendedProperties", "transactionId",
})
SHOW_AS = frozenset({"free", "tentative", "busy", "oof", "workingElsewhere", "unknown"})
SENSITIVITY = frozenset({"normal", "personal", "private", "confidential"})
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,7})?$")
_PROPERTY_ID = re.compile(r"^String \{[0-9a-fA-F-]{36}\} Name [A-Za-z0-9_]+$")
_FILTER = re.compile(
    r"^singleValueExtendedProperties/Any\(ep: ep/id eq '((?:[^']|'')*)' "
    r"and ep/value eq '((?:[^']|'')*)'\)$"
)
_ZONES = frozenset(zoneinfo.available_timezones()) | {"UTC"}
_ids = itertools.count(1)


def graph_error(status: int, code: str, message: str,
                headers: dict[str, str] | None = None) -> GraphAnswer:
    return status, dict(headers or {}), {"error": {"code": code, "message": message}}


@dataclass
class Recorded:
    at: float
    host: str
    method: str
    path: str
    mailbox: str | None = None
    batched: bool = False
    status: int = 0


@dataclass
class Throttle:
    """A Retry-After the server sent: nothing for `mailbox` should arrive in [sent, until)."""

    mailbox: str | None
    sent: float
    until: float


@dataclass
class GraphServer:
    ca: trustme.CA = field(default_factory=trustme.CA)
    client_id: str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    client_secret: str = "correct-horse-battery-staple"
    tenants: set[str] = field(default_factory=set)
    consented: set[str] = field(default_factory=set)
    mailboxes: set[str] = field(default_factory=set)
    rest_disabled: set[str] = field(default_factory=set)
    access_denied: set[str] = field(default_factory=set)
    certificates: dict[str, x509.Certificate] = field(default_factory=dict)
    events: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    #: mailbox -> its automaticRepliesSetting as Graph stores it
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings_denied: set[str] = field(default_factory=set)
    #: mailboxes whose settings reads wait, once a PATCH of them arrived, until
    #: `release_readback` (a crash between a write and its record)
    hold_readback: set[str] = field(default_factory=set)
    #: answers for the next mailbox settings requests of a mailbox (`script_settings`)
    settings_scripts: dict[str, list[GraphAnswer]] = field(
        default_factory=lambda: defaultdict(list)
    )
    _patched: set[str] = field(default_factory=set)
    _released: asyncio.Event | None = None
    requests: list[Recorded] = field(default_factory=list)
    unexpected: list[Recorded] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    tokens: dict[str, float] = field(default_factory=dict)
    token_lifetime: int = 3600
    concurrency_limit: int = 4
    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight: Counter[str] = field(default_factory=Counter)
    latency: dict[str, float] = field(default_factory=dict)
    page_size: dict[str, int] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    throttles: list[Throttle] = field(default_factory=list)
    early: list[Recorded] = field(default_factory=list)
    scripts: dict[str, list[GraphAnswer]] = field(default_factory=lambda: defaultdict(list))
    token_scripts: dict[str, list[tuple[int, dict[str, Any]]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    token_headers: dict[int, dict[str, str]] = field(default_factory=dict)
    port: int = 0
    ca_path: Path | None = None
    #: error answers quote the request's Authorization header, as some gateways'
    #: error pages do (for tests that credentials never go further)
    echo_authorization: bool = False
    _runner: web.AppRunner | None = None

    # ------------------------------------------------------------- lifecycle

    async def start(self, directory: Path) -> None:
        self.ca_path = directory / "graph-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ssl)
        app = web.Application(client_max_size=4 * 1024 * 1024)
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
    def authority_host(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def graph_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/v1.0"

    # ------------------------------------------------------------- scripting

    def add_tenant(self, tenant: str, *, consented: bool = True) -> str:
        self.tenants.add(tenant)
        if consented:
            self.consented.add(tenant)
        return tenant

    def add_mailbox(self, address: str) -> str:
        self.mailboxes.add(address.lower())
        return address

    def register_certificate(self, pem: bytes) -> str:
        cert = x509.load_pem_x509_certificate(pem)
        thumbprint = cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 - x5t
        self.certificates[thumbprint] = cert
        return thumbprint

    def script(self, mailbox: str, status: int, code: str, message: str = "scripted",
               retry_after: str | None = None, times: int = 1) -> None:
        """The next `times` Graph requests for `mailbox` ("*": any) get this answer."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        for _ in range(times):
            self.scripts[mailbox.lower()].append(graph_error(status, code, message, headers))

    def script_token(self, tenant: str, status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
        self.token_scripts[tenant].append((status, body))
        if headers:
            self.token_headers[id(body)] = headers

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    def token_requests_for(self, tenant: str) -> int:
        return sum(1 for r in self.token_requests if r["tenant"] == tenant)

    def graph_requests(self, mailbox: str) -> list[Recorded]:
        return [r for r in self.requests if r.mailbox == mailbox.lower()]

    # ------------------------------------------------------------- routing

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        record = Recorded(arrived, request.host, request.method, request.raw_path)
        path = request.raw_path.split("?", 1)[0]
        try:
            if path.startswith("/v1.0/"):
                self.requests.append(record)
                response = await self._graph_entry(request, record)
            elif path.endswith("/v2.0/.well-known/openid-configuration"):
                self.requests.append(record)
                response = self._discovery(path.split("/")[1])
            elif path.endswith("/oauth2/v2.0/token") and request.method == "POST":
                self.requests.append(record)
                response = await self._token(request, path.split("/")[1])
            else:
                self.unexpected.append(record)
                response = web.json_response({"error": "not_found"}, status=404)
        except Exception as exc:  # a bug in the fake must show, not hang a test
            response = web.json_response(
                {"error": {"code": "FakeServerBug", "message": repr(exc)}}, status=500
            )
        record.status = response.status
        return response

    # ------------------------------------------------------------- login

    def _discovery(self, tenant: str) -> web.Response:
        if tenant not in self.tenants:
            return web.json_response({
                "error": "invalid_tenant",
                "error_description": f"AADSTS90002: Tenant '{tenant}' not found. Check to "
                "make sure you have the correct tenant ID and are signing into the correct "
                "cloud.",
                "error_codes": [90002],
            }, status=400)
        base = f"{self.authority_host}/{tenant}"
        return web.json_response({
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "jwks_uri": f"{self.authority_host}/{tenant}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post", "private_key_jwt", "client_secret_basic",
            ],
            "tenant_region_scope": "EU",
        })

    def _token_error(self, status: int, error: str, code: int, text: str) -> web.Response:
        return web.json_response({
            "error": error,
            "error_description": f"AADSTS{code}: {text}",
            "error_codes": [code],
            "timestamp": dt.datetime.now(dt.UTC).isoformat(),
        }, status=status)

    async def _token(self, request: web.Request, tenant: str) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        client_id = form.get("client_id", "")
        secret = form.get("client_secret")
        method = "secret_post" if secret else ""
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            decoded = base64.b64decode(auth[6:]).decode()
            basic_id, _, basic_secret = decoded.partition(":")
            client_id, secret, method = unquote_plus(basic_id), unquote_plus(basic_secret), "basic"
        self.token_requests.append({
            "tenant": tenant, "scope": form.get("scope", ""), "client_id": client_id,
            "grant_type": form.get("grant_type", ""), "auth": method or "assertion",
        })
        if self.token_scripts.get(tenant):
            status, body = self.token_scripts[tenant].pop(0)
            return web.json_response(body, status=status,
                                     headers=self.token_headers.pop(id(body), None))
        if tenant not in self.tenants:
            return self._token_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            return self._token_error(400, "unsupported_grant_type", 70003, "unsupported grant")
        if client_id != self.client_id or tenant not in self.consented:
            return self._token_error(
                400, "unauthorized_client", 700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{tenant}'. This can happen if the application has not been installed by the "
                "administrator of the tenant or consented to by any user in the tenant.",
            )
        if not form.get("scope", "").endswith("/.default"):
            return self._token_error(400, "invalid_scope", 1002012, "The scope is invalid.")
        if "client_assertion" in form:
            if not self._assertion_ok(form["client_assertion"], tenant):
                return self._token_error(
                    401, "invalid_client", 700027, "Client assertion failed signature validation."
                )
        elif secret != self.client_secret:
            return self._token_error(
                401, "invalid_client", 7000215,
                f"Invalid client secret provided. Ensure the secret being sent in the request is "
                f"the client secret value, not the client secret ID, for a secret added to app "
                f"'{self.client_id}'.",
            )
        token = secrets.token_urlsafe(24)
        self.tokens[token] = time.monotonic() + self.token_lifetime
        return web.json_response({
            "token_type": "Bearer", "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime, "access_token": token,
        })

    def _assertion_ok(self, assertion: str, tenant: str) -> bool:
        try:
            header = jwt.get_unverified_header(assertion)
            if "x5t" in header:
                thumb = base64.urlsafe_b64decode(header["x5t"] + "==").hex().upper()
            else:
                thumb256 = base64.urlsafe_b64decode(header["x5t#S256"] + "==").hex()
                thumb = next(
                    t for t, c in self.certificates.items()
                    if c.fingerprint(hashes.SHA256()).hex() == thumb256
                )
            cert = self.certificates[thumb]
            claims = jwt.decode(
                assertion, cert.public_key(),  # type: ignore[arg-type]
                algorithms=["RS256", "PS256"],
                audience=f"{self.authority_host}/{tenant}/oauth2/v2.0/token",
            )
        except (KeyError, StopIteration, ValueError, jwt.PyJWTError):
            return False
        return bool(claims.get("iss") == claims.get("sub") == self.client_id)

    # ------------------------------------------------------------- Graph

    async def _graph_entry(self, request: web.Request, record: Recorded) -> web.Response:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if self.tokens.get(token, 0.0) < time.monotonic():
            status, headers, body = graph_error(
                401, "InvalidAuthenticationToken", "Access token validation failure. Invalid "
                "audience.", {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'},
            )
            return web.json_response(body, status=status, headers=headers)
        target = request.raw_path[len("/v1.0"):]
        raw = await request.read()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            status, headers, body = graph_error(400, "RequestBodyRead", "Invalid JSON body.")
            return web.json_response(body, status=status, headers=headers)
        if target.split("?", 1)[0] == "/$batch" and request.method == "POST":
            status, headers, body = await self._batch(payload, record.at)
        else:
            status, headers, body = await self._graph(
                request.method, target, payload, record.at, record
            )
        if self.echo_authorization:
            _echo(body, f"Authorization: {request.headers.get('Authorization', '')} "
                  f"on {request.method} {request.raw_path}")
        if status == 204:
            return web.Response(status=204, headers=headers)
        return web.json_response(body, status=status, headers=headers)

    async def _batch(self, payload: Any, arrived: float) -> GraphAnswer:
        steps = payload.get("requests") if isinstance(payload, dict) else None
        if not isinstance(steps, list) or not steps:
            return graph_error(400, "BadRequest", "Invalid batch payload format.")
        if len(steps) > 20:
            return graph_error(
                400, "BadRequest", "Number of batch request steps exceeds the maximum of 20."
            )
        ids = [str(s.get("id")) for s in steps if isinstance(s, dict)]
        if len(set(ids)) != len(steps):
            return graph_error(400, "BadRequest", "Batch request ids must be unique.")
        self.batch_sizes.append(len(steps))

        async def run(step: dict[str, Any]) -> dict[str, Any]:
            url = str(step.get("url", ""))
            record = Recorded(arrived, "(batch)", str(step.get("method")), url, batched=True)
            self.requests.append(record)
            headers = {str(k).lower(): v for k, v in (step.get("headers") or {}).items()}
            if url.startswith(("http://", "https://")):
                answer = graph_error(400, "BadRequest", "Batch step URLs must be relative.")
            elif "body" in step and "content-type" not in headers:
                answer = graph_error(
                    400, "BadRequest", "Content-Type header must be specified for a body."
                )
            else:
                path = url if url.startswith("/") else "/" + url
                answer = await self._graph(
                    str(step.get("method", "GET")).upper(), path, step.get("body"), arrived, record
                )
            record.status = answer[0]
            response: dict[str, Any] = {"id": step["id"], "status": answer[0]}
            if answer[1]:
                response["headers"] = answer[1]
            if answer[2] is not None:
                response["body"] = answer[2]
            return response

        responses = await asyncio.gather(*(run(s) for s in steps))
        return 200, {}, {"responses": list(reversed(responses))}

    async def _graph(self, method: str, target: str, payload: Any, arrived: float,
                     record: Recorded) -> GraphAnswer:
        path, _, query = target.partition("?")
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if len(parts) >= 3 and parts[0] == "users" and parts[2] == "mailboxSettings":
            record.mailbox = parts[1].lower()
            scripted = (self.settings_scripts.get(parts[1].lower())
                        or self.scripts.get(parts[1].lower()) or self.scripts.get("*"))
            if scripted:
                return scripted.pop(0)
            box = parts[1].lower()
            if method == "GET" and box in self.hold_readback and box in self._patched:
                if self._released is None:
                    self._released = asyncio.Event()
                await self._released.wait()
            answer = self._mailbox_settings(method, box, parts[3:], payload)
            if method == "PATCH" and answer[0] == 200:
                self._patched.add(box)
            return answer
        if len(parts) < 3 or parts[0] != "users" or parts[2] != "events" or len(parts) > 4:
            return graph_error(400, "BadRequest", f"Resource not found for the segment '{path}'.")
        mailbox = parts[1].lower()
        record.mailbox = mailbox
        for throttle in self.throttles:
            if throttle.mailbox in (None, mailbox) and throttle.sent <= arrived < throttle.until:
                self.early.append(record)
                break
        self.in_flight[mailbox] += 1
        self.max_in_flight[mailbox] = max(self.max_in_flight[mailbox], self.in_flight[mailbox])
        try:
            if self.in_flight[mailbox] > self.concurrency_limit:
                answer = graph_error(
                    429, "ApplicationThrottled",
                    "Application is over its MailboxConcurrency limit.", {"Retry-After": "1"},
                )
            else:
                if self.latency.get(mailbox):
                    await asyncio.sleep(self.latency[mailbox])
                scripted = self.scripts.get(mailbox) or self.scripts.get("*")
                if scripted:
                    answer = scripted.pop(0)
                else:
                    answer = self._operate(method, mailbox, parts[3:], query, payload)
        finally:
            self.in_flight[mailbox] -= 1
        retry_after = answer[1].get("Retry-After")
        if answer[0] in (429, 503) and retry_after is not None:
            now = time.monotonic()
            scope = None if answer[2]["error"]["code"] == "TooManyRequests" else mailbox
            self.throttles.append(Throttle(scope, now, now + float(retry_after)))
        return answer

    def _operate(self, method: str, mailbox: str, rest: list[str], query: str,
                 payload: Any) -> GraphAnswer:
        if mailbox in self.rest_disabled:
            return graph_error(404, "MailboxNotEnabledForRESTAPI",
                               "The mailbox is either inactive, soft-deleted, or is hosted "
                               "on-premise.")
        if mailbox not in self.mailboxes:
            return graph_error(404, "ErrorInvalidUser", f"The requested user '{mailbox}' is "
                               "invalid.")
        if mailbox in self.access_denied:
            return graph_error(403, "ErrorAccessDenied", "Access is denied. Check credentials "
                               "and try again.")
        box = self.events[mailbox]
        if not rest:
            if method == "POST":
                return self._create(box, payload)
            if method == "GET":
                return self._list(mailbox, box, query)
            return graph_error(405, "ErrorInvalidRequest", "Method not allowed.")
        event_id = rest[0]
        if event_id not in box:
            return graph_error(404, "ErrorItemNotFound",
                               "The specified object was not found in the store.")
        if method == "GET":
            return 200, {}, box[event_id]
        if method == "DELETE":
            del box[event_id]
            return 204, {}, None
        if method == "PATCH":
            problem = validate_event(payload, partial=True)
            if problem is not None:
                return problem
            if "transactionId" in payload and payload["transactionId"] != box[event_id].get(
                "transactionId"
            ):
                return graph_error(400, "ErrorInvalidRequest", "transactionId cannot change.")
            box[event_id].update(payload)
            return 200, {}, box[event_id]
        return graph_error(405, "ErrorInvalidRequest", "Method not allowed.")

    # ------------------------------------------------------------- mailbox settings

    def script_settings(self, mailbox: str, status: int, code: str,
                        retry_after: str | None = None) -> None:
        """The next mailbox settings request for `mailbox` (only those) gets this answer."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self.settings_scripts[mailbox.lower()].append(
            graph_error(status, code, "scripted", headers))

    def release_readback(self) -> None:
        self.hold_readback.clear()
        if self._released is not None:
            self._released.set()

    def reply_of(self, mailbox: str) -> dict[str, Any]:
        """The automaticRepliesSetting `mailbox` holds (Graph's form)."""
        return dict(self.replies.get(mailbox.lower(), _DISABLED_REPLY))

    def set_user_reply(self, mailbox: str, setting: dict[str, Any]) -> None:
        """The employee changes their reply in Outlook (same rules as a PATCH)."""
        answer = self._patch_reply(mailbox.lower(), setting)
        assert answer is None, answer

    def _mailbox_settings(self, method: str, mailbox: str, rest: list[str],
                          payload: Any) -> GraphAnswer:
        if mailbox not in self.mailboxes:
            return graph_error(404, "ErrorInvalidUser", f"The requested user '{mailbox}' is "
                               "invalid.")
        if mailbox in self.settings_denied or mailbox in self.access_denied:
            return graph_error(403, "ErrorAccessDenied", "Access is denied. Check credentials "
                               "and try again.")
        if method == "GET" and rest in ([], ["automaticRepliesSetting"]):
            reply = self.reply_of(mailbox)
            if rest:
                return 200, {}, reply
            return 200, {}, {"timeZone": "UTC", "automaticRepliesSetting": reply}
        if method == "PATCH" and not rest:
            if not isinstance(payload, dict):
                return graph_error(400, "RequestBodyRead", "A mailboxSettings body is required.")
            for key in payload:
                if key not in ("automaticRepliesSetting", "timeZone", "language",
                               "workingHours", "dateFormat", "timeFormat"):
                    return graph_error(400, "RequestBodyRead", f"The property '{key}' does not "
                                       "exist on type 'microsoft.graph.mailboxSettings'.")
            if "automaticRepliesSetting" in payload:
                problem = self._patch_reply(mailbox, payload["automaticRepliesSetting"])
                if problem is not None:
                    return problem
            return 200, {}, {"automaticRepliesSetting": self.reply_of(mailbox)}
        return graph_error(405, "ErrorInvalidRequest", "Method not allowed.")

    def _patch_reply(self, mailbox: str, setting: Any) -> GraphAnswer | None:
        if not isinstance(setting, dict):
            return graph_error(400, "RequestBodyRead", "Invalid automaticRepliesSetting.")
        allowed = {"status", "externalAudience", "internalReplyMessage",
                   "externalReplyMessage", "scheduledStartDateTime", "scheduledEndDateTime"}
        for key in setting:
            if key not in allowed:
                return graph_error(400, "RequestBodyRead", f"The property '{key}' does not "
                                   "exist on type 'microsoft.graph.automaticRepliesSetting'.")
        merged = {**self.reply_of(mailbox)}
        if setting.get("status", merged["status"]) not in ("disabled", "alwaysEnabled",
                                                           "scheduled"):
            return graph_error(400, "RequestBodyRead", "Invalid status value.")
        if setting.get("externalAudience", "none") not in ("none", "contactsOnly", "all"):
            return graph_error(400, "RequestBodyRead", "Invalid externalAudience value.")
        for key in ("internalReplyMessage", "externalReplyMessage"):
            if key in setting:
                merged[key] = _as_html(str(setting[key] or ""))
        for key in ("status", "externalAudience"):
            if key in setting:
                merged[key] = setting[key]
        for key in ("scheduledStartDateTime", "scheduledEndDateTime"):
            if key in setting:
                value = setting[key]
                if not isinstance(value, dict) or not _DATETIME.match(
                    str(value.get("dateTime", ""))
                ):
                    return graph_error(400, "ErrorInvalidRequest", f"Invalid '{key}' dateTime.")
                if value.get("timeZone") not in _ZONES:
                    return graph_error(400, "TimeZoneNotSupportedException",
                                       "A valid TimeZone value must be specified.")
                local = dt.datetime.fromisoformat(value["dateTime"][:19]).replace(
                    tzinfo=zoneinfo.ZoneInfo(value["timeZone"]))
                merged[key] = {
                    "dateTime": local.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.0000000"),
                    "timeZone": "UTC",
                }
        if merged["status"] == "scheduled" and (
            merged["scheduledEndDateTime"]["dateTime"]
            <= merged["scheduledStartDateTime"]["dateTime"]
        ):
            return graph_error(400, "ErrorInvalidScheduledOofDuration",
                               "The scheduled end time must be after the start time.")
        self.replies[mailbox] = merged
        return None

    def _create(self, box: dict[str, dict[str, Any]], payload: Any) -> GraphAnswer:
        problem = validate_event(payload, partial=False)
        if problem is not None:
            return problem
        transaction = payload.get("transactionId")
        if transaction:
            for event in box.values():
                if event.get("transactionId") == transaction:
                    return 201, {}, event
        event_id = "AAMkAD" + base64.urlsafe_b64encode(
            hashlib.sha256(f"{next(_ids)}".encode()).digest()[:24]
        ).decode()
        event = {**payload, "id": event_id}
        box[event_id] = event
        return 201, {}, event

    def _list(self, mailbox: str, box: dict[str, dict[str, Any]], query: str) -> GraphAnswer:
        params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
        events = list(box.values())
        if "$filter" in params:
            match = _FILTER.match(params["$filter"])
            if match is None:
                return graph_error(400, "ErrorInvalidUrlQueryFilter",
                                   "The query filter contains one or more invalid nodes.")
            prop_id = match.group(1).replace("''", "'")
            value = match.group(2).replace("''", "'")
            events = [
                e for e in events
                if any(
                    p.get("id", "").lower() == prop_id.lower() and p.get("value") == value
                    for p in e.get("singleValueExtendedProperties", [])
                )
            ]
        skip = int(params.get("$skip", "0"))
        size = self.page_size.get(mailbox, 10)
        page = events[skip:skip + size]
        if params.get("$select"):
            fields = {"id", *params["$select"].split(",")}
            page = [{k: v for k, v in e.items() if k in fields} for e in page]
        body: dict[str, Any] = {"value": page}
        if skip + size < len(events):
            rest = {k: v for k, v in params.items() if k != "$skip"}
            rest["$skip"] = str(skip + size)
            encoded = "&".join(f"{k}={quote(v, safe='')}" for k, v in rest.items())
            body["@odata.nextLink"] = (
                f"{self.graph_url}/users/{quote(mailbox, safe='@')}/events?{encoded}"
            )
        return 200, {}, body


_DISABLED_REPLY: dict[str, Any] = {
    "status": "disabled",
    "externalAudience": "all",
    "internalReplyMessage": "",
    "externalReplyMessage": "",
    "scheduledStartDateTime": {"dateTime": "2026-01-01T00:00:00.0000000", "timeZone": "UTC"},
    "scheduledEndDateTime": {"dateTime": "2026-01-02T00:00:00.0000000", "timeZone": "UTC"},
}


def _as_html(message: str) -> str:
    """What Exchange Online stores for a reply message: an HTML document."""
    if not message:
        return ""
    if "<html" in message.lower():
        return message
    return (f"<html>\n<head>\n<meta http-equiv=\"Content-Type\" content=\"text/html; "
            f"charset=utf-8\">\n</head>\n<body>\n<div>{message}</div>\n</body>\n</html>\n")


def _echo(body: Any, text: str) -> None:
    """Append `text` to every error message of a reply (and of its batch sub-replies)."""
    if not isinstance(body, dict):
        return
    error = body.get("error")
    if isinstance(error, dict):
        error["message"] = f"{error.get('message', '')} ({text})"
    for sub in body.get("responses", []) if isinstance(body.get("responses"), list) else []:
        if isinstance(sub, dict):
            _echo(sub.get("body"), text)


def validate_event(payload: Any, *, partial: bool) -> GraphAnswer | None:
    """Graph's 400s for event bodies the provider could plausibly get wrong."""
    if not isinstance(payload, dict):
        return graph_error(400, "RequestBodyRead", "An event body is required.")
    for key in payload:
        if key not in EVENT_PROPERTIES:
            return graph_error(400, "RequestBodyRead", f"The property '{key}' does not exist "
                               "on type 'microsoft.graph.event'.")
    if not partial:
        for key in ("subject", "start", "end"):
            if key not in payload:
                return graph_error(400, "ErrorInvalidRequest", f"'{key}' is required.")
    if "showAs" in payload and payload["showAs"] not in SHOW_AS:
        return graph_error(400, "RequestBodyRead", "Invalid showAs value.")
    if "sensitivity" in payload and payload["sensitivity"] not in SENSITIVITY:
        return graph_error(400, "RequestBodyRead", "Invalid sensitivity value.")
    if len(str(payload.get("subject", ""))) > 255:
        return graph_error(400, "ErrorInvalidRequest", "Subject too long.")
    for key in ("start", "end"):
        if key not in payload:
            continue
        value = payload[key]
        if not isinstance(value, dict) or not _DATETIME.match(str(value.get("dateTime", ""))):
            return graph_error(400, "ErrorInvalidRequest", f"Invalid '{key}' dateTime.")
        if value.get("timeZone") not in _ZONES:
            return graph_error(400, "TimeZoneNotSupportedException", "A valid TimeZone value "
                               f"must be specified. The following TimeZone value is not "
                               f"supported: '{value.get('timeZone')}'.")
    if "start" in payload and "end" in payload:
        start, end = payload["start"], payload["end"]
        if end["dateTime"] < start["dateTime"] and start["timeZone"] == end["timeZone"]:
            return graph_error(400, "ErrorInvalidRequest", "The end precedes the start.")
        midnights = start["dateTime"].endswith("T00:00:00") and end["dateTime"].endswith(
            "T00:00:00"
        )
        if payload.get("isAllDay") and (
            not midnights or start["timeZone"] != end["timeZone"]
            or end["dateTime"] <= start["dateTime"]
        ):
            return graph_error(
                400, "ErrorInvalidRequest",
                "All-day events must start and end at midnight in one time zone.",
            )
    for prop in payload.get("singleValueExtendedProperties", []):
        if not isinstance(prop, dict) or not _PROPERTY_ID.match(str(prop.get("id", ""))):
            return graph_error(400, "ErrorInvalidProperty", "Invalid extended property id.")
    return None
