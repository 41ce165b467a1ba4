"""HTTP: /metrics, /healthz, /readyz, the Microsoft 365 consent redirect, the
administration API (`/api/v1`, see `api.py`) and page (`/`, see `page.py`), and
the iCalendar feeds (`/feeds/{token}.ics`, see `feeds.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer import logs, store
from consumer.metrics import Metrics
from consumer.outages import KAFKA_UNREACHABLE, Outages
from consumer.providers.base import ProviderError
from consumer.secrets import SecretBox
from consumer.settings import Settings
from consumer.store import admin as admin_store

log = logs.get("web")


@dataclass
class WebState:
    metrics: Metrics
    pool: asyncpg.Pool
    kafka_ready: Callable[[], bool] = lambda: False
    on_change: Callable[[], None] = lambda: None
    extra_checks: list[Callable[[], Awaitable[str | None]]] = field(default_factory=list)
    #: (directory, configuration id) -> None once a token for the directory is
    #: obtained, else raises ProviderError; None: no Microsoft 365 application configured
    confirm_consent: Callable[[str, str], Awaitable[None]] | None = None
    # for the administration API and page: consent links, secrets of configurations
    settings: Settings | None = None
    box: SecretBox = field(default_factory=lambda: SecretBox(None))
    #: Kafka bootstrap servers, for resyncs started from the API or the page
    bootstrap: str | None = None
    housekeeping_seconds: float = 2.0
    # a problem sentence or None; replaces `kafka_ready` when given
    kafka_check: Callable[[], Awaitable[str | None]] | None = None
    # the outages intake and dispatch are waiting out
    outages: Outages | None = None


STATE = web.AppKey("state", WebState)
READY_DATABASE_SECONDS = 2.0  # under the readiness probe's timeout


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        # bounded: /metrics answers during a database outage too
        async with asyncio.timeout(READY_DATABASE_SECONDS):
            backlog = await store.backlog(state.pool)
    except Exception as exc:  # noqa: BLE001 - the other metrics are served all the same
        log.debug("backlog not measured", error_type=type(exc).__name__)
    else:
        state.metrics.backlog.set(backlog.pending)
        state.metrics.backlog_age.set(backlog.oldest_seconds)
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """503 with one fixed sentence per problem (never an exception's text, which
    may carry a DSN or host), 200 when PostgreSQL and Kafka answer, partitions
    are assigned and no outage is being waited out."""
    state = request.app[STATE]
    problems: list[str] = []
    try:
        async with asyncio.timeout(READY_DATABASE_SECONDS):
            await state.pool.fetchval("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - whatever it is, not ready
        problems.append(
            "postgresql: unreachable" if store.is_unavailable(exc) else "postgresql: query failed"
        )
    if state.outages is not None:
        state.outages.probed("postgresql", not problems)
    if state.kafka_check is not None:
        kafka = await state.kafka_check()
        if kafka is not None:
            problems.append(kafka)
        if state.outages is not None:
            state.outages.probed("kafka", kafka != KAFKA_UNREACHABLE)
    elif not state.kafka_ready():
        problems.append("kafka: no partition assigned yet")
    if state.outages is not None:
        problems.extend(state.outages.problems())
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


async def consent_callback(request: web.Request) -> web.Response:
    """Admin consent redirect: `?admin_consent=True&tenant=...&state=...` or an error.

    A directory is recorded only when the redirect reports consent for a
    directory id (a GUID), the state is one `consent-url` issued, no other
    tenant's configuration uses that directory, and the vendor application
    actually obtains a token for it."""
    state = request.app[STATE]
    query = request.query
    if "error" in query:
        message = query.get("error_description") or query["error"]
        return _page("Consent was not granted", message, status=400)
    directory = query.get("tenant", "").strip()
    consent_state = query.get("state", "").strip()
    if not directory or not consent_state:
        return _page("Consent failed", "The redirect lacks 'tenant' or 'state'.", status=400)
    if query.get("admin_consent", "").strip().lower() != "true":
        return _page("Consent was not granted",
                     "The redirect does not report an administrator's consent "
                     "(admin_consent=True).", status=400)
    if not _GUID.match(directory):
        return _page("Consent failed",
                     "The redirect's directory id is not a directory (tenant) GUID.", status=400)
    pending = await store.consent_request(state.pool, consent_state)
    if pending is None:
        return _expired()
    if await store.directory_taken(state.pool, directory, pending.tenant):
        return _taken(directory)
    if state.confirm_consent is None:
        return _page("Consent cannot be confirmed",
                     "This server has no Microsoft 365 application configured "
                     "(ABSENCE_SYNC_MS_CLIENT_ID).", status=503)
    try:
        await state.confirm_consent(directory, pending.config_id)
    except ProviderError as exc:
        log.warning("admin consent not confirmed", config=pending.config_id,
                    directory=directory, code=exc.code, error=exc.message[:300])
        return _page(
            "Consent could not be confirmed",
            f"The application obtained no access token for directory {directory} "
            f"({exc.code}). {exc.hint} Then open the consent link again.",
            status=502 if exc.retriable else 403,
        )
    try:
        config_id = await store.grant_consent(state.pool, consent_state, directory)
    except store.ConflictError:
        return _taken(directory)
    if config_id is None:
        return _expired()
    state.on_change()
    log.info("admin consent granted", config=config_id, directory=directory)
    return _page(
        "Consent granted",
        f"Directory {directory} is now linked to configuration {config_id}; "
        "its absences are being synchronized.",
    )


def _expired() -> web.Response:
    return _page(
        "Consent link expired",
        "This consent request is unknown or expired: run "
        "'absence-sync consent-url CONFIG_ID' again.",
        status=400,
    )


def _taken(directory: str) -> web.Response:
    return _page(
        "Directory already linked",
        f"Directory {directory} is already linked to another customer's configuration, so "
        "it cannot be linked to this one. If this is unexpected, contact your vendor.",
        status=409,
    )


def _page(title: str, text: str, status: int = 200) -> web.Response:
    body = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
    )
    return web.Response(text=body, content_type="text/html", status=status)


async def _housekeeping(app: web.Application) -> AsyncIterator[None]:
    """Removes the configurations whose purge has finished (see `Admin.delete`)."""
    state = app[STATE]

    async def loop() -> None:
        while True:
            try:
                for config_id in await admin_store.finish_purges(state.pool):
                    log.info("configuration purged and removed", config=config_id)
            except Exception as exc:
                if not (store.is_unavailable(exc) or isinstance(exc, asyncpg.PostgresError)):
                    raise
                # the database is away (an outage intake and dispatch wait out): next round
                log.warning("purge check failed", error=str(exc))
            await asyncio.sleep(state.housekeeping_seconds)

    task = asyncio.create_task(loop(), name="web-housekeeping")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(state: WebState) -> web.Application:
    from consumer.web import api, feeds, page

    app = web.Application(middlewares=[page.security_headers])
    app[STATE] = state
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/consent/microsoft365/callback", consent_callback)
    api.setup(app)
    page.setup(app)
    feeds.setup(app)  # /feeds/{token}.ics
    app.cleanup_ctx.append(_housekeeping)
    return app
