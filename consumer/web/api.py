"""The administration API under /api/v1 (docs/administration.md), described by openapi.py.

Authentication is `Authorization: Bearer TOKEN` only (never a cookie, so a
browser cannot be made to send it cross-site). Order of answers: 401 without
a live token, 403 when its role is too low, then 404 for anything that is
not the token's tenant's, exactly as for what does not exist.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from consumer import logs, tokens
from consumer.admin import Admin, AdminError, job_json
from consumer.store import admin as admin_store
from consumer.web import STATE
from consumer.web.openapi import document

log = logs.get("api")
PREFIX = "/api/v1"
MAX_ITEMS_LIMIT = 500
DEFAULT_ITEMS_LIMIT = 100
ADMIN = web.AppKey("admin", Admin)


@dataclass(frozen=True, slots=True)
class Caller:
    token_id: str
    tenant: str
    role: str


Handler = Callable[[web.Request, Caller], Awaitable[web.Response]]
Route = Callable[[web.Request], Awaitable[web.Response]]


def error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status,
        headers={"Cache-Control": "no-store", **headers},
    )


def _unauthorized(message: str) -> web.Response:
    return error(401, "unauthorized", message,
                 **{"WWW-Authenticate": 'Bearer realm="absence-sync"'})


async def caller_for(request: web.Request, token: str) -> Caller | None:
    """The caller a token text stands for, or None for an unknown or revoked one.

    The row is found by the token's SHA-256 (an index look-up reveals nothing
    usable about a token); the stored hash is then compared in constant time."""
    if not tokens.looks_like_token(token):
        return None
    digest = tokens.token_hash(token)
    row = await admin_store.use_token(request.app[STATE].pool, digest)
    if row is None or not tokens.same_hash(row.hash, digest):
        return None
    return Caller(row.id, row.tenant, row.role)


def needs(role: tokens.Role) -> Callable[[Handler], Route]:
    """The handler runs with the caller of a live token of at least `role`."""
    def wrap(handler: Handler) -> Route:
        async def run(request: web.Request) -> web.Response:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return _unauthorized("an 'Authorization: Bearer TOKEN' header is required")
            caller = await caller_for(request, token.strip())
            if caller is None:
                return _unauthorized("the token is unknown or revoked")
            if not tokens.allows(caller.role, role):
                return error(403, "forbidden",
                             f"this needs a token with the '{role}' role (this one: "
                             f"'{caller.role}')")
            try:
                response = await handler(request, caller)
            except AdminError as exc:
                return error(exc.status, exc.code, exc.message)
            response.headers["Cache-Control"] = "no-store"
            return response

        run.__name__ = handler.__name__
        return run

    return wrap


async def _body(request: web.Request, *, optional: bool = False) -> Any:
    text = await request.text()
    if not text.strip():
        if optional:
            return None
        raise AdminError(400, "invalid_request", "a JSON body is required")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise AdminError(400, "invalid_request", f"the body is not JSON: {exc}") from exc


def _base_url(request: web.Request) -> str:
    return str(request.url.origin())


def _admin(request: web.Request) -> Admin:
    return request.app[ADMIN]


@needs("read")
async def list_syncs(request: web.Request, caller: Caller) -> web.Response:
    views = await _admin(request).syncs(caller.tenant, _base_url(request))
    return web.json_response({"syncs": [v.to_json() for v in views]})


@needs("read")
async def get_sync(request: web.Request, caller: Caller) -> web.Response:
    view = await _admin(request).sync(
        caller.tenant, request.match_info["id"], _base_url(request)
    )
    return web.json_response(view.to_json(detail=True))


@needs("read")
async def list_items(request: web.Request, caller: Caller) -> web.Response:
    query = request.query
    raw_limit = query.get("limit", str(DEFAULT_ITEMS_LIMIT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_ITEMS_LIMIT:
        raise AdminError(400, "invalid_request",
                         f"limit must be a whole number from 1 to {MAX_ITEMS_LIMIT}")
    page = await _admin(request).items(
        caller.tenant, request.match_info["id"], state=query.get("state") or None,
        cursor=query.get("cursor") or None, limit=int(raw_limit),
    )
    return web.json_response(page.to_json())


@needs("manage")
async def retry(request: web.Request, caller: Caller) -> web.Response:
    admin = _admin(request)
    config_id = request.match_info["id"]
    count = await admin.retry(caller.tenant, config_id, await _body(request, optional=True))
    log.info("retry requested", tenant=caller.tenant, config=config_id, token_id=caller.token_id,
             requeued=count)
    return web.json_response({"requeued": count})


@needs("manage")
async def resync(request: web.Request, caller: Caller) -> web.Response:
    admin = _admin(request)
    config_id = request.match_info["id"]
    outcome = await admin.resync(caller.tenant, config_id, await _body(request, optional=True))
    if isinstance(outcome, int):
        return web.json_response({"in_scope": outcome})
    log.info("resync started", tenant=caller.tenant, config=config_id, token_id=caller.token_id,
             job=outcome.id)
    return web.json_response(
        {**job_json(outcome), "job_id": outcome.id}, status=202,
        headers={"Location": f"{PREFIX}/jobs/{outcome.id}"},
    )


@needs("read")
async def get_job(request: web.Request, caller: Caller) -> web.Response:
    job = await _admin(request).job(caller.tenant, request.match_info["id"])
    return web.json_response(job_json(job))


@needs("configure")
async def put_sync(request: web.Request, caller: Caller) -> web.Response:
    admin = _admin(request)
    config_id = request.match_info["id"]
    created = await admin.put(caller.tenant, config_id, await _body(request))
    log.info("configuration written through the API", tenant=caller.tenant, config=config_id,
             token_id=caller.token_id, created=created)
    view = await admin.sync(caller.tenant, config_id, _base_url(request))
    return web.json_response(view.to_json(detail=True), status=201 if created else 200)


@needs("configure")
async def delete_sync(request: web.Request, caller: Caller) -> web.Response:
    purge_raw = request.query.get("purge", "false").lower()
    if purge_raw not in ("true", "false", "1", "0"):
        raise AdminError(400, "invalid_request", "purge must be true or false")
    config_id = request.match_info["id"]
    deleted = await _admin(request).delete(
        caller.tenant, config_id, purge=purge_raw in ("true", "1")
    )
    log.info("configuration deleted through the API", tenant=caller.tenant, config=config_id,
             token_id=caller.token_id, events_to_delete=deleted.events)
    if deleted.events:
        return web.json_response({"deleting": True, "events": deleted.events}, status=202)
    return web.Response(status=204)


@needs("manage")
async def list_feeds(request: web.Request, caller: Caller) -> web.Response:
    rows = await _admin(request).feeds(caller.tenant, request.match_info["id"])
    return web.json_response({"feeds": [r.as_dict() for r in rows]})


@needs("manage")
async def create_feed(request: web.Request, caller: Caller) -> web.Response:
    config_id = request.match_info["id"]
    created = await _admin(request).create_feed(
        caller.tenant, config_id, await _body(request, optional=True), _base_url(request)
    )
    log.info("feed created", tenant=caller.tenant, config=config_id, token_id=caller.token_id,
             feed=created.feed.id, kind=created.feed.as_dict()["kind"])
    return web.json_response(created.to_json(), status=201)


@needs("manage")
async def revoke_feed(request: web.Request, caller: Caller) -> web.Response:
    config_id = request.match_info["id"]
    row = await _admin(request).revoke_feed(caller.tenant, config_id, request.match_info["feed"])
    log.info("feed revoked", tenant=caller.tenant, config=config_id, token_id=caller.token_id,
             feed=row.id)
    return web.Response(status=204)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document(), headers={"Cache-Control": "no-cache"})


ROUTES: list[tuple[str, str, Route]] = [
    ("GET", "/syncs", list_syncs),
    ("GET", "/syncs/{id}", get_sync),
    ("PUT", "/syncs/{id}", put_sync),
    ("DELETE", "/syncs/{id}", delete_sync),
    ("GET", "/syncs/{id}/items", list_items),
    ("POST", "/syncs/{id}/retry", retry),
    ("POST", "/syncs/{id}/resync", resync),
    ("GET", "/jobs/{id}", get_job),
    ("GET", "/syncs/{id}/feeds", list_feeds),
    ("POST", "/syncs/{id}/feeds", create_feed),
    ("DELETE", "/syncs/{id}/feeds/{feed}", revoke_feed),
]


def setup(app: web.Application) -> None:
    state = app[STATE]
    app[ADMIN] = Admin(state.pool, state.settings, state.box, state.on_change, state.bootstrap)
    for method, path, handler in ROUTES:
        app.router.add_route(method, PREFIX + path, handler)
    app.router.add_get(PREFIX + "/openapi.json", openapi)
