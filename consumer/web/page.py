"""The administration page at `/`: server-rendered HTML, a little JavaScript.

Sign-in keeps the API token in an HttpOnly, SameSite=Strict cookie (Secure
when the page is reached over https), so scripts never see it. Every form
that changes something is CSRF-safe twice over: a double-submit token (a
random cookie that must equal the form's `csrf` field) and, when the browser
sends one, an `Origin` that must be this server. Every asset comes from the
worker (`/ui/static/`); the Content-Security-Policy allows nothing else.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
from aiohttp import web
from multidict import MultiDictProxy

from consumer import logs, tokens
from consumer.admin import Admin, AdminError, ItemsPage, NewFeed, job_json, public_document
from consumer.config import secret_names
from consumer.web import STATE
from consumer.web.api import ADMIN, Caller, caller_for

log = logs.get("page")
SESSION_COOKIE = "absence_sync_session"
CSRF_COOKIE = "absence_sync_csrf"
SESSION_SECONDS = 8 * 3600
_HERE = Path(__file__).parent
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
# secrets a configuration form offers, per provider (besides those already stored)
_FORM_SECRETS = {"exchange": ("password",), "caldav": ("password",), "google": ("service_account",)}
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)

PageHandler = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]


@web.middleware
async def security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    if request.path == "/" or request.path.startswith("/ui/"):
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        # not "no-referrer": Chromium then sends `Origin: null` with our own forms
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if not request.path.startswith("/ui/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
    return response


def _https(request: web.Request) -> bool:
    settings = request.app[STATE].settings
    public = settings.public_url if settings is not None else None
    return (
        request.secure
        or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
        or bool(public and public.startswith("https://"))
    )


def _set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str,
                max_age: int | None = None) -> None:
    response.set_cookie(
        name, value, httponly=True, samesite="Strict", secure=_https(request), path="/",
        max_age=max_age,
    )


def _csrf(request: web.Request) -> tuple[str, bool]:
    """The CSRF token of this browser, and whether it must be set now."""
    current = request.cookies.get(CSRF_COOKIE, "")
    if len(current) >= 32:
        return current, False
    return secrets.token_urlsafe(32), True


def _render(
    request: web.Request, template: str, *, status: int = 200, **context: Any
) -> web.Response:
    csrf, new = _csrf(request)
    context.setdefault("caller", None)
    body = _ENV.get_template(template).render(csrf=csrf, **context)
    response = web.Response(text=body, content_type="text/html", status=status)
    if new:
        _set_cookie(request, response, CSRF_COOKIE, csrf)
    return response


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not sent (older browsers): the double-submit token still guards
    allowed = {request.host}
    settings = request.app[STATE].settings
    if settings is not None and settings.public_url:
        allowed.add(urlsplit(settings.public_url).netloc)
    return urlsplit(origin).netloc in allowed


async def _checked_form(request: web.Request) -> MultiDictProxy[str | Any]:
    """The posted form, after the CSRF checks (raises 403 when they fail)."""
    form = await request.post()
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = form.get("csrf")
    if (
        not _same_origin(request)
        or not isinstance(sent, str)
        or len(cookie) < 32
        or not hmac.compare_digest(sent.encode(), cookie.encode())
    ):
        raise web.HTTPForbidden(
            text="This form is out of date or was sent from another site: reload the page "
            "and try again.",
        )
    return form


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _admin(request: web.Request) -> Admin:
    return request.app[ADMIN]


def signed_in(
    role: tokens.Role = "read",
) -> Callable[[PageHandler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Page handlers run with the caller of the session cookie; without a live
    session they send the browser to the sign-in page."""
    def wrap(handler: PageHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            token = request.cookies.get(SESSION_COOKIE, "")
            caller = await caller_for(request, token) if token else None
            if caller is None:
                if _wants_json(request):
                    return web.json_response(
                        {"error": {"code": "unauthorized", "message": "sign in again"}},
                        status=401,
                    )
                response = _redirect("/")
                if token:
                    response.del_cookie(SESSION_COOKIE, path="/")
                return response
            if not tokens.allows(caller.role, role):
                message = f"This needs the '{role}' role; your token has '{caller.role}'."
                if _wants_json(request):
                    return web.json_response(
                        {"error": {"code": "forbidden", "message": message}}, status=403
                    )
                return _page_error(request, caller, 403, "Not allowed", message)
            try:
                return await handler(request, caller)
            except AdminError as exc:
                if _wants_json(request):
                    return web.json_response(
                        {"error": {"code": exc.code, "message": exc.message}}, status=exc.status
                    )
                title = "Not found" if exc.status == 404 else "Cannot do that"
                return _page_error(request, caller, exc.status, title, exc.message)

        return run

    return wrap


def _page_error(
    request: web.Request, caller: Caller, status: int, title: str, message: str
) -> web.Response:
    return _render(request, "error.html", status=status, title=title, message=message,
                   **_who(caller))


def _who(caller: Caller) -> dict[str, Any]:
    return {"caller": caller}


def _base_url(request: web.Request) -> str:
    return str(request.url.origin())


# --- sign in / out --------------------------------------------------------------


async def home(request: web.Request) -> web.StreamResponse:
    token = request.cookies.get(SESSION_COOKIE, "")
    caller = await caller_for(request, token) if token else None
    if caller is None:
        response = _render(request, "signin.html", error=None)
        if token:
            response.del_cookie(SESSION_COOKIE, path="/")
        return response
    views = await _admin(request).syncs(caller.tenant, _base_url(request))
    return _render(request, "syncs.html", views=views, **_who(caller))


async def sign_in(request: web.Request) -> web.StreamResponse:
    form = await _checked_form(request)
    token = str(form.get("token", "")).strip()
    caller = await caller_for(request, token) if token else None
    if caller is None:
        return _render(request, "signin.html", status=401,
                       error="This token is unknown or revoked.")
    log.info("signed in to the page", tenant=caller.tenant, token_id=caller.token_id)
    response = _redirect("/")
    _set_cookie(request, response, SESSION_COOKIE, token, max_age=SESSION_SECONDS)
    return response


async def sign_out(request: web.Request) -> web.StreamResponse:
    await _checked_form(request)
    response = _redirect("/")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


# --- one configuration ------------------------------------------------------------


@dataclass
class _Resync:
    since: str | None = None
    establishments: str | None = None
    force: bool = False
    in_scope: int | None = None


@dataclass
class _Form:
    establishments: str = ""
    sync_pending: bool = True
    hide_labels: bool = True
    hidden_label: str = "Absent"
    busy_as: str = "busy"
    free_as: str = "free"
    private: bool = False
    category: str = ""
    whole_days_as_timed: bool = False
    morning: str = "09:00-12:30"
    afternoon: str = "13:30-18:00"
    time_zone: str = "UTC"
    provider: list[tuple[str, str]] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)


def _form_of(doc: Mapping[str, Any], provider: str, stored_secrets: tuple[str, ...]) -> _Form:
    block = doc.get(provider) or {}
    return _Form(
        establishments=", ".join(doc.get("establishments") or []),
        sync_pending=bool(doc.get("sync_pending")),
        hide_labels=bool(doc.get("hide_labels")),
        hidden_label=str(doc.get("hidden_label") or ""),
        busy_as=str(doc.get("busy_as")),
        free_as=str(doc.get("free_as")),
        private=bool(doc.get("private")),
        category=str(doc.get("category") or ""),
        whole_days_as_timed=bool(doc.get("whole_days_as_timed")),
        morning=str(doc.get("morning")),
        afternoon=str(doc.get("afternoon")),
        time_zone=str(doc.get("time_zone")),
        provider=[(k, v) for k, v in block.items() if isinstance(v, str)],
        secrets=sorted(
            {s for s in stored_secrets if s in secret_names(provider)}
            | set(_FORM_SECRETS.get(provider, ()))
        ),
    )


async def _sync_page(
    request: web.Request,
    caller: Caller,
    config_id: str,
    *,
    status: int = 200,
    resync: _Resync | None = None,
    edit_error: str | None = None,
    notice: str | None = None,
    probe: dict[str, Any] | None = None,
    new_feed: NewFeed | None = None,
    feed_error: str | None = None,
) -> web.Response:
    admin = _admin(request)
    view = await admin.sync(caller.tenant, config_id, _base_url(request))
    can_manage = tokens.allows(caller.role, "manage")
    # feed links of an ics configuration, for those who may create and revoke them
    feed_rows = (
        await admin.feeds(caller.tenant, config_id)
        if can_manage and view.config.provider == "ics" else None
    )
    cursor = request.query.get("cursor") or None
    failed: ItemsPage = await admin.items(
        caller.tenant, config_id, state="failed", cursor=cursor, limit=50
    )
    own_replies: ItemsPage | None = await admin.items(
        caller.tenant, config_id, state="skipped_user_reply", cursor=None, limit=50
    ) if view.config.auto_reply is not None else None
    form = _form_of(public_document(view.config), view.config.provider,
                    view.stored.secret_names)
    return _render(
        request, "sync.html", status=status, view=view, failed=failed,
        own_replies=own_replies,
        can_manage=can_manage,
        can_configure=tokens.allows(caller.role, "configure"),
        resync=resync or _Resync(), default_since=dt.datetime.now(dt.UTC).date().isoformat(),
        form=form, edit_error=edit_error, notice=notice, probe=probe, feeds=feed_rows,
        new_feed=new_feed, feed_error=feed_error, **_who(caller),
    )


@signed_in("read")
async def sync_page(request: web.Request, caller: Caller) -> web.StreamResponse:
    notice = None
    requeued = request.query.get("requeued", "")
    if requeued.isdigit():
        notice = f"Re-queued {int(requeued)} failed absence(s): they are being written again."
    elif request.query.get("saved") == "1":
        notice = "Settings saved."
    elif request.query.get("revoked") == "1":
        notice = "Feed link revoked: it no longer answers."
    return await _sync_page(request, caller, request.match_info["id"], notice=notice)


@signed_in("manage")
async def retry(request: web.Request, caller: Caller) -> web.StreamResponse:
    await _checked_form(request)
    config_id = request.match_info["id"]
    count = await _admin(request).retry(caller.tenant, config_id, None)
    log.info("retry requested on the page", tenant=caller.tenant, config=config_id,
             token_id=caller.token_id, requeued=count)
    if _wants_json(request):
        return web.json_response({"requeued": count})
    return _redirect(f"/ui/syncs/{config_id}?requeued={count}")


def _resync_body(form: Mapping[str, Any]) -> tuple[dict[str, Any], _Resync]:
    since = str(form.get("since", "")).strip() or None
    establishments = str(form.get("establishments", "")).strip()
    force = str(form.get("force", "")) in ("1", "on", "true")
    body: dict[str, Any] = {"force": force, "dry_run": str(form.get("dry_run", "1")) != "0"}
    if since:
        body["since"] = since
    if establishments:
        body["establishments"] = [e.strip() for e in establishments.split(",") if e.strip()]
    return body, _Resync(since, establishments or None, force)


@signed_in("manage")
async def resync(request: web.Request, caller: Caller) -> web.StreamResponse:
    form = await _checked_form(request)
    config_id = request.match_info["id"]
    body, shown = _resync_body(form)
    outcome = await _admin(request).resync(caller.tenant, config_id, body)
    if isinstance(outcome, int):
        if _wants_json(request):
            return web.json_response({"in_scope": outcome})
        shown.in_scope = outcome
        return await _sync_page(request, caller, config_id, resync=shown)
    log.info("resync started on the page", tenant=caller.tenant, config=config_id,
             token_id=caller.token_id, job=outcome.id)
    if _wants_json(request):
        return web.json_response(job_json(outcome), status=202)
    return _redirect(f"/ui/jobs/{outcome.id}")


@signed_in("read")
async def job_page(request: web.Request, caller: Caller) -> web.StreamResponse:
    job = await _admin(request).job(caller.tenant, request.match_info["id"])
    if _wants_json(request):
        return web.json_response(job_json(job))
    return _render(request, "job.html", job=job, **_who(caller))


def _document_from_form(base: dict[str, Any], provider: str, form: Mapping[str, Any]
                        ) -> dict[str, Any]:
    """The stored document with the form's fields laid over it."""
    doc = dict(base)
    establishments = [e.strip() for e in str(form.get("establishments", "")).split(",")]
    doc["establishments"] = [e for e in establishments if e] or None
    for name in ("sync_pending", "hide_labels", "private", "whole_days_as_timed"):
        doc[name] = str(form.get(name, "")) in ("1", "on", "true")
    for name in ("hidden_label", "busy_as", "free_as", "morning", "afternoon", "time_zone"):
        doc[name] = str(form.get(name, "")).strip()
    doc["category"] = str(form.get("category", "")).strip() or None
    block = dict(base.get(provider) or {})
    for key, value in form.items():
        plain = key.startswith("p.") and isinstance(block.get(key[2:]), str)
        secret = key.startswith("s.") and bool(str(value).strip())  # empty: keep the stored one
        if plain or secret:
            block[key[2:]] = str(value).strip()
    doc[provider] = block
    return doc


@signed_in("configure")
async def save_settings(request: web.Request, caller: Caller) -> web.StreamResponse:
    form = await _checked_form(request)
    config_id = request.match_info["id"]
    admin = _admin(request)
    view = await admin.sync(caller.tenant, config_id, _base_url(request))
    doc = _document_from_form(public_document(view.config), view.config.provider, form)
    try:
        await admin.put(caller.tenant, config_id, doc)
    except AdminError as exc:
        if exc.status != 400:
            raise
        return await _sync_page(request, caller, config_id, status=400, edit_error=exc.message)
    log.info("configuration saved on the page", tenant=caller.tenant, config=config_id,
             token_id=caller.token_id)
    return _redirect(f"/ui/syncs/{config_id}?saved=1")


@signed_in("configure")
async def test_connection(request: web.Request, caller: Caller) -> web.StreamResponse:
    """The "Test connection" button: `absence-sync config test` for one mailbox."""
    form = await _checked_form(request)
    config_id = request.match_info["id"]
    mailbox = str(form.get("mailbox", "")).strip() or None
    result = await _admin(request).test_connection(caller.tenant, config_id, mailbox)
    error = result.error
    doc = {
        "ok": result.ok, "provider": result.provider, "mailbox": result.mailbox,
        "code": error.code if error else None,
        "message": logs.redact_text(error.message) if error else None,
        "hint": error.hint if error else None,
    }
    log.info("connection tested on the page", tenant=caller.tenant, config=config_id,
             token_id=caller.token_id, ok=result.ok, code=doc["code"])
    if _wants_json(request):
        return web.json_response(doc)
    return await _sync_page(request, caller, config_id, probe=doc)


@signed_in("manage")
async def create_feed(request: web.Request, caller: Caller) -> web.StreamResponse:
    """Create a feed link and show its URL once, on the page this answers (never in
    a redirect, which would put the link in the browser history)."""
    form = await _checked_form(request)
    config_id = request.match_info["id"]
    body = {k: str(form.get(k, "")).strip() for k in ("employee", "name")}
    try:
        created = await _admin(request).create_feed(
            caller.tenant, config_id, {k: v for k, v in body.items() if v},
            _base_url(request),
        )
    except AdminError as exc:
        if exc.status != 400:
            raise
        return await _sync_page(request, caller, config_id, status=400, feed_error=exc.message)
    log.info("feed created on the page", tenant=caller.tenant, config=config_id,
             token_id=caller.token_id, feed=created.feed.id)
    if _wants_json(request):
        return web.json_response(created.to_json(), status=201)
    return await _sync_page(request, caller, config_id, new_feed=created)


@signed_in("manage")
async def revoke_feed(request: web.Request, caller: Caller) -> web.StreamResponse:
    await _checked_form(request)
    config_id = request.match_info["id"]
    row = await _admin(request).revoke_feed(caller.tenant, config_id, request.match_info["feed"])
    log.info("feed revoked on the page", tenant=caller.tenant, config=config_id,
             token_id=caller.token_id, feed=row.id)
    return _redirect(f"/ui/syncs/{config_id}?revoked=1#feeds-title")


def setup(app: web.Application) -> None:
    app.router.add_get("/", home)
    app.router.add_post("/ui/signin", sign_in)
    app.router.add_post("/ui/signout", sign_out)
    app.router.add_get("/ui/syncs/{id}", sync_page)
    app.router.add_post("/ui/syncs/{id}/retry", retry)
    app.router.add_post("/ui/syncs/{id}/resync", resync)
    app.router.add_post("/ui/syncs/{id}/settings", save_settings)
    app.router.add_post("/ui/syncs/{id}/test", test_connection)
    app.router.add_post("/ui/syncs/{id}/feeds", create_feed)
    app.router.add_post("/ui/syncs/{id}/feeds/{feed}/revoke", revoke_feed)
    app.router.add_get("/ui/jobs/{id}", job_page)
    app.router.add_static("/ui/static/", _HERE / "static", append_version=False)

