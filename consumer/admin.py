"""What a tenant's administrator may see and do (docs/administration.md), without HTTP.

The JSON API and the web page are two thin clients of `Admin`. Every method
takes the tenant of the caller's token; a configuration or job of another
tenant is answered exactly as an unknown one (None, or `NotFound`), so no
caller can learn that it exists.

Configuration documents have the shape of a `config apply` entry and are
checked by `config.parse_sync`. Over the API a secret travels as its value
(`"password": "..."` in the provider block): `*_env` and `*_file` name the
worker's own environment and files, which belong to the operator, and a
tenant could otherwise have the worker send them to a server of its
choosing. A secret left out of a document keeps its stored value; `null`
removes it. Secrets are never returned.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import secrets as pysecrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

import asyncpg

from consumer import feeds, health, resync, store
from consumer.config import PROVIDERS, ConfigError, SyncConfig, parse_sync, secret_names
from consumer.errors import Unreachable
from consumer.providers.base import CONSENT_MISSING
from consumer.secrets import SecretBox
from consumer.settings import Settings
from consumer.store import admin as admin_store
from consumer.store import feeds as feed_store
from consumer.web import jobs

if TYPE_CHECKING:
    from consumer.probe import ProbeResult

HEALTH_WINDOW_SECONDS = 24 * 3600.0
HEALTH_WINDOW_OUTCOMES = 2000
MAX_SECRET_CHARS = 16_384
ITEM_STATES = ("pending", "synced", "failed", "deleted")
#: a reply item whose mailbox holds the employee's own reply (configurations
#: with `auto_reply` count it; any configuration's items may be listed by it)
SKIPPED_USER_REPLY = "skipped_user_reply"
LISTED_STATES = (*ITEM_STATES, SKIPPED_USER_REPLY)
_PLACEHOLDER = resources.files("consumer") / "secret_placeholder.txt"


class AdminError(Exception):
    """A request that cannot be carried out; `status` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class NotFound(AdminError):
    def __init__(self, what: str, ident: str) -> None:
        super().__init__(404, "not_found", f"no {what} with id {ident!r}")


@dataclass(frozen=True, slots=True)
class SyncView:
    """A configuration as monitoring shows it (never a secret value)."""

    stored: store.StoredConfig
    health: health.Health
    cause: str | None
    consent_url: str | None
    summary: admin_store.Summary

    @property
    def id(self) -> str:
        return self.stored.config.id

    @property
    def config(self) -> SyncConfig:
        return self.stored.config

    @property
    def paused(self) -> bool:
        """Paused by an operator (`absence-sync config pause`): nothing is written."""
        return self.stored.paused_at is not None

    def to_json(self, *, detail: bool = False) -> dict[str, Any]:
        config = self.stored.config
        states = LISTED_STATES if config.auto_reply is not None else ITEM_STATES
        doc: dict[str, Any] = {
            "id": config.id,
            "tenant": config.tenant,
            "provider": config.provider,
            "establishments": config.establishments,
            "health": self.health.status,
            "cause": self.cause,
            "consent_url": self.consent_url,
            "warnings": list(self.stored.warnings),
            "counts": {state: self.summary.counts.get(state, 0) for state in states},
            # the same counts at the top level, where a monitoring client looks first
            **{state: self.summary.counts.get(state, 0) for state in TOP_LEVEL_COUNTS},
            "counts_by_target": {
                target: {state: counts.get(state, 0) for state in states}
                for target, counts in sorted(self.summary.by_target.items())
            },
            "last_success_at": _iso(self.summary.last_success_at),
            "last_failure_at": _iso(self.summary.last_failure_at),
            "deleting": self.summary.deleting,
            "paused": self.paused,
        }
        if detail:
            doc["revision"] = self.stored.revision
            doc["updated_at"] = _iso(self.stored.updated_at)
            doc["configuration"] = public_document(config)
            doc["secrets"] = list(self.stored.secret_names)
        return doc


#: item counts also given at the top level of a sync (besides `counts`)
TOP_LEVEL_COUNTS = ("synced", "pending", "failed")


@dataclass(frozen=True, slots=True)
class ItemsPage:
    items: list[admin_store.ItemRow]
    next_cursor: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "items": [
                {
                    "absence_id": i.absence_id, "target": i.target,
                    "employee_email": i.employee_email,
                    "mailbox": i.mailbox, "state": i.state, "code": i.code,
                    "message": i.message, "hint": i.hint, "attempts": i.attempts,
                    "event_id": i.event_id, "updated_at": _iso(i.updated_at),
                }
                for i in self.items
            ],
            "next_cursor": self.next_cursor,
        }


@dataclass(frozen=True, slots=True)
class Deleted:
    """`events` left to delete from calendars (0: the configuration is gone already)."""

    events: int


def job_json(job: jobs.Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "sync_id": job.sync_id,
        "state": job.state,
        "since": job.scope.since.isoformat() if job.scope.since else None,
        "establishments": list(job.scope.establishments)
        if job.scope.establishments is not None else None,
        "force": job.scope.force,
        "phase": job.phase,
        "read": job.read,
        "total": job.total,
        "in_scope": job.in_scope,
        "marked": job.marked,
        "done": job.done,
        "written": job.written,
        "unchanged": job.unchanged,
        "failed": job.failed,
        "error": job.error,
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def public_document(config: SyncConfig) -> dict[str, Any]:
    """A configuration in the shape of a `config apply` entry, without secrets."""
    data = config.model_dump(exclude={"secrets", "provider_settings"})
    data[config.provider] = dict(config.provider_settings)
    return data


def parse_document(
    raw: Any, *, config_id: str, tenant: str, stored: store.StoredConfig | None
) -> SyncConfig:
    """A configuration document from the API (see the module docstring), checked
    by `parse_sync`; raises `AdminError` (400, or 403 for another tenant)."""
    where = f"sync {config_id!r}"
    if not isinstance(raw, dict):
        raise AdminError(400, "invalid_configuration",
                         f"{where}: the body must be a JSON object (a `config apply` entry)")
    doc = dict(raw)
    if doc.setdefault("id", config_id) != config_id:
        raise AdminError(400, "invalid_configuration",
                         f"{where}: field 'id': must be the id of the URL, {config_id!r}")
    if doc.setdefault("tenant", tenant) != tenant:
        raise AdminError(403, "forbidden",
                         f"{where}: field 'tenant': this token writes configurations of its "
                         "own tenant only")
    provider = doc.get("provider")
    given: dict[str, str] = {}
    removed: set[str] = set()
    if provider in PROVIDERS and isinstance(doc.get(provider), dict):
        plain: dict[str, Any] = {}
        for key, value in doc[provider].items():
            key = str(key)
            if key.endswith(("_env", "_file")):
                raise AdminError(
                    400, "invalid_configuration",
                    f"{where}: field '{provider}.{key}': over the API a secret is given as "
                    f"its value ('{key.rsplit('_', 1)[0]}'), never as a variable or a file "
                    "of the worker",
                )
            if key in secret_names(provider):
                if value is None:
                    removed.add(key)
                elif not isinstance(value, str) or not value.strip():
                    raise AdminError(400, "invalid_configuration",
                                     f"{where}: field '{provider}.{key}': must be a non-empty "
                                     "string")
                elif len(value) > MAX_SECRET_CHARS:
                    raise AdminError(400, "invalid_configuration",
                                     f"{where}: field '{provider}.{key}': longer than "
                                     f"{MAX_SECRET_CHARS} characters")
                else:
                    given[key] = value
            else:
                plain[key] = value
        doc[provider] = plain
    kept = dict(stored.config.secrets) if stored and stored.config.provider == provider else {}
    merged = {k: v for k, v in {**kept, **given}.items() if k not in removed}
    if merged and provider in PROVIDERS:
        # parse_sync checks the whole entry, required secrets included; it reads a
        # secret from a `*_file`, so each secret held is named through a placeholder
        # file and the real values are put in afterwards
        block = dict(doc.get(provider) or {})
        block.update({f"{name}_file": str(_PLACEHOLDER) for name in merged})
        doc[provider] = block
    try:
        config = parse_sync(where, doc)
    except ConfigError as exc:
        raise AdminError(400, "invalid_configuration", str(exc)) from exc
    return config.model_copy(update={"secrets": merged})


def _scope(body: Any) -> tuple[jobs.Scope, bool]:
    if not isinstance(body, dict):
        raise AdminError(400, "invalid_request", "the body must be a JSON object")
    unknown = set(body) - {"since", "establishments", "dry_run", "force"}
    if unknown:
        raise AdminError(400, "invalid_request", f"unknown field {sorted(unknown)[0]!r}")
    since_raw = body.get("since")
    since = None
    if since_raw is not None:
        try:
            since = dt.date.fromisoformat(since_raw) if isinstance(since_raw, str) else None
        except ValueError:
            since = None
        if since is None or len(since_raw) != 10:
            raise AdminError(400, "invalid_request", "field 'since': must be a date YYYY-MM-DD")
    establishments = body.get("establishments")
    if establishments is not None and (
        not isinstance(establishments, list)
        or not all(isinstance(e, str) and e for e in establishments)
    ):
        raise AdminError(400, "invalid_request",
                         "field 'establishments': must be a list of establishment ids")
    for name in ("dry_run", "force"):
        if not isinstance(body.get(name, False), bool):
            raise AdminError(400, "invalid_request", f"field {name!r}: must be true or false")
    scope = jobs.Scope(
        since, tuple(establishments) if establishments is not None else None,
        bool(body.get("force", False)),
    )
    return scope, bool(body.get("dry_run", False))


@dataclass
class Admin:
    pool: asyncpg.Pool
    settings: Settings | None = None
    box: SecretBox = field(default_factory=lambda: SecretBox(None))
    notify: Callable[[], None] = lambda: None
    #: the Kafka bootstrap servers, for resyncs (they re-read the topic)
    bootstrap: str | None = None

    # --- reads ---------------------------------------------------------------

    async def syncs(self, tenant: str, base_url: str) -> list[SyncView]:
        configs = await admin_store.tenant_configs(self.pool, tenant)
        return await self._views(tenant, configs, base_url)

    async def sync(self, tenant: str, config_id: str, base_url: str) -> SyncView:
        stored = await self._config(tenant, config_id)
        return (await self._views(tenant, [stored], base_url))[0]

    async def _config(
        self, tenant: str, config_id: str, box: SecretBox | None = None
    ) -> store.StoredConfig:
        stored = await admin_store.tenant_config(self.pool, tenant, config_id, box)
        if stored is None:
            raise NotFound("configuration", config_id)
        return stored

    async def _views(
        self, tenant: str, configs: Sequence[store.StoredConfig], base_url: str
    ) -> list[SyncView]:
        ids = [s.config.id for s in configs]
        summaries = await admin_store.summaries(self.pool, tenant, ids)
        windows = await admin_store.recent_outcomes(
            self.pool, ids, window_seconds=HEALTH_WINDOW_SECONDS, limit=HEALTH_WINDOW_OUTCOMES
        )
        views = []
        for stored in configs:
            summary = summaries.get(stored.config.id) or admin_store.Summary(
                {}, None, None, False
            )
            verdict = health.assess(
                [health.Outcome(o.mailbox, o.ok, o.code) for o in windows[stored.config.id]],
                failed_items=summary.counts.get("failed", 0),
                ever_written=summary.last_success_at is not None,
            )
            consent_missing = verdict.code == CONSENT_MISSING or (
                stored.config.provider == "microsoft365"
                and not stored.config.provider_settings.get("tenant_id")
            )
            link = await self._consent_url(stored, base_url) if consent_missing else None
            team = stored.config.team_calendar
            cause = health.cause_sentence(
                verdict, stored.config.provider, link,
                team_address=team.address if team is not None else None,
            )
            if cause is None and consent_missing:
                cause = health.consent_sentence(link)
            views.append(SyncView(stored, verdict, cause, link, summary))
        return views

    async def _consent_url(self, stored: store.StoredConfig, base_url: str) -> str | None:
        """The admin-consent link, as `absence-sync consent-url` builds it."""
        from consumer.providers.microsoft365 import consent_url

        if stored.config.provider != "microsoft365" or self.settings is None:
            return None
        if not self.settings.ms_client_id:
            return None
        base = self.settings.public_url or base_url
        redirect = base.rstrip("/") + "/consent/microsoft365/callback"
        state = await admin_store.consent_state(
            self.pool, stored.config.id, pysecrets.token_urlsafe(24)
        )
        return consent_url(self.settings, stored.config.id, state, redirect)

    async def items(
        self, tenant: str, config_id: str, *, state: str | None, cursor: str | None,
        limit: int,
    ) -> ItemsPage:
        stored = await self._config(tenant, config_id)
        if state is not None and state not in LISTED_STATES:
            raise AdminError(400, "invalid_request",
                             f"state must be one of {', '.join(LISTED_STATES)}")
        after = _decode_cursor(cursor) if cursor else None
        team = stored.config.team_calendar
        rows, more = await admin_store.items_page(
            self.pool, tenant, config_id, state=state, after=after, limit=limit,
            team_address=team.address if team is not None else None,
        )
        next_cursor = (
            _encode_cursor(rows[-1].absence_id, rows[-1].target) if more and rows else None
        )
        return ItemsPage(rows, next_cursor)

    async def test_connection(
        self, tenant: str, config_id: str, mailbox: str | None
    ) -> ProbeResult:
        """`absence-sync config test` for the page's "Test connection" button:
        reach the calendar service for one mailbox, writing nothing. Without a
        mailbox, one the configuration writes to (or a recent employee's)."""
        from consumer.probe import probe
        from consumer.providers.base import ProviderContext, make_ssl_context

        if self.settings is None:
            raise AdminError(503, "unavailable", "connection tests are not available here")
        stored = await self._config(tenant, config_id, self._box_for_reading())
        address = (mailbox or "").strip().lower() or await store.sample_mailbox(
            self.pool, config_id
        )
        if not address:
            raise AdminError(400, "invalid_request",
                             "no mailbox to try yet: give an employee's calendar address")
        if len(address) > 320 or "@" not in address or any(c.isspace() for c in address):
            raise AdminError(400, "invalid_request", "the mailbox must be an e-mail address")
        context = ProviderContext(self.settings, make_ssl_context(self.settings))
        return await probe(stored, context, address.lower())

    async def job(self, tenant: str, job_id: str) -> jobs.Job:
        job = await jobs.get(self.pool, job_id, tenant)
        if job is None:
            raise NotFound("job", job_id)
        return job

    # --- actions ---------------------------------------------------------------

    async def retry(self, tenant: str, config_id: str, body: Any) -> int:
        await self._config(tenant, config_id)
        if body is None:
            body = {}
        if not isinstance(body, dict) or set(body) - {"absence_ids"}:
            raise AdminError(400, "invalid_request",
                             "the body is empty or {\"absence_ids\": [...]}")
        ids = body.get("absence_ids")
        if ids is not None and (
            not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)
        ):
            raise AdminError(400, "invalid_request",
                             "field 'absence_ids': must be a list of absence ids")
        count = await store.requeue(self.pool, config_id, only_failed=True, absence_ids=ids)
        self.notify()
        return count

    async def resync(self, tenant: str, config_id: str, body: Any) -> int | jobs.Job:
        """A dry run answers the count in scope; otherwise the started job."""
        stored = await self._config(tenant, config_id)
        scope, dry_run = _scope(body)
        if self.settings is None or self.bootstrap is None:
            raise AdminError(503, "unavailable", "resync is not available in this process")
        try:
            if dry_run:
                return await jobs.count_in_scope(
                    self.pool, self.settings, self.bootstrap, stored, scope
                )
            job = await jobs.start(self.pool, self.settings, self.bootstrap, stored, scope)
        except resync.ResyncConflict as exc:
            raise AdminError(409, "resync_running", str(exc)) from exc
        except resync.UnknownConfiguration as exc:
            raise NotFound("configuration", config_id) from exc
        except resync.ResyncError as exc:
            raise AdminError(400, "invalid_request", str(exc)) from exc
        except Unreachable as exc:
            raise AdminError(503, "unavailable", str(exc)) from exc
        self.notify()
        return job

    async def put(self, tenant: str, config_id: str, raw: Any) -> bool:
        """Create or replace a configuration; True when it was created."""
        async with admin_store.config_id_lock(self.pool, config_id):
            owner = await admin_store.config_tenant(self.pool, config_id)
            if owner is not None and owner != tenant:
                raise NotFound("configuration", config_id)
            stored = None
            if owner is not None:
                stored = await self._config(tenant, config_id, self._box_for_reading())
            config = parse_document(raw, config_id=config_id, tenant=tenant, stored=stored)
            if config.secrets and not self.box.enabled:
                raise AdminError(
                    400, "invalid_configuration",
                    f"sync {config_id!r}: holds secrets, but the worker has no "
                    "ABSENCE_SYNC_SECRET_KEYS to store them",
                )
            await admin_store.cancel_purge(self.pool, config_id)
            try:
                await store.apply_configs(self.pool, [config], self.box)
            except store.ConflictError as exc:  # a directory another tenant uses
                raise AdminError(409, "conflict", str(exc)) from exc
        self.notify()
        return owner is None

    def _box_for_reading(self) -> SecretBox | None:
        return self.box if self.box.enabled else None

    async def delete(self, tenant: str, config_id: str, *, purge: bool) -> Deleted:
        async with admin_store.config_id_lock(self.pool, config_id):
            stored = await self._config(tenant, config_id)
            if purge:
                left = await admin_store.start_purge(self.pool, stored)
                if left:
                    self.notify()
                    return Deleted(left)
            await admin_store.delete_config(self.pool, tenant, config_id)
        self.notify()
        return Deleted(0)

    # --- feeds of ics configurations --------------------------------------------

    async def feeds(self, tenant: str, config_id: str) -> list[feed_store.FeedRow]:
        """The configuration's feed links (never their URLs), revoked ones too."""
        await self._config(tenant, config_id)
        return await feed_store.list_feeds(self.pool, config_id, tenant)

    async def create_feed(
        self, tenant: str, config_id: str, body: Any, base_url: str
    ) -> NewFeed:
        """A new feed link of an `ics` configuration: personal (`employee`) or the
        team feed. Its URL is returned this once; only its hash is kept."""
        stored = await self._config(tenant, config_id)
        _feeds_only(stored)
        employee, name = feed_request(body)
        feed_id, token = feeds.new_feed_token()
        row = await feed_store.create_feed(
            self.pool, feed_id=feed_id, config_id=config_id, tenant=tenant,
            employee=employee, name=name, digest=feeds.feed_token_hash(token),
        )
        if row is None:  # deleted meanwhile
            raise NotFound("configuration", config_id)
        base = (self.settings.public_url if self.settings is not None else None) or base_url
        return NewFeed(row, feeds.feed_url(base, token))

    async def revoke_feed(self, tenant: str, config_id: str, feed_id: str) -> feed_store.FeedRow:
        await self._config(tenant, config_id)
        row = await feed_store.revoke_feed(
            self.pool, feed_id, config_id=config_id, tenant=tenant
        )
        if row is None:
            raise NotFound("feed", feed_id)
        return row


def feed_request(body: Any) -> tuple[str | None, str | None]:
    """(employee e-mail or None for the team feed, name or None) of a feed request
    body (`{"employee": ..., "name": ...}`, both optional); AdminError (400) otherwise."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise AdminError(400, "invalid_request", "the body must be a JSON object")
    unknown = sorted(set(body) - {"employee", "name"})
    if unknown:
        raise AdminError(400, "invalid_request",
                         f"unknown field {unknown[0]!r} (a feed takes 'employee' and 'name')")
    employee = body.get("employee")
    if employee is not None:
        if not isinstance(employee, str):
            raise AdminError(400, "invalid_request", "field 'employee': must be an e-mail")
        try:
            employee = feeds.normalise_employee(employee)
        except ValueError as exc:
            raise AdminError(400, "invalid_request", f"field 'employee': {exc}") from exc
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > feeds.MAX_NAME):
        raise AdminError(400, "invalid_request",
                         f"field 'name': must be text of at most {feeds.MAX_NAME} characters")
    return employee, feeds.clean_name(name)


def _feeds_only(stored: store.StoredConfig) -> None:
    if stored.config.provider != "ics":
        raise AdminError(
            400, "invalid_request",
            f"configuration {stored.config.id!r} writes to {stored.config.provider}: feeds are "
            "served for configurations with provider: ics",
        )


@dataclass(frozen=True, slots=True)
class NewFeed:
    """A feed just created; `url` holds its token and is shown this once."""

    feed: feed_store.FeedRow
    url: str

    def to_json(self) -> dict[str, Any]:
        return {**self.feed.as_dict(), "url": self.url}


def _encode_cursor(absence_id: str, target: str) -> str:
    """Opaque to clients: the last item of the page (absence id, NUL, target), base64url."""
    raw = f"{absence_id}\x00{target}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str | None]:
    """(absence id, target); a cursor made before targets existed names an
    absence only (target None: the page goes on after all of its items)."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        after = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise AdminError(400, "invalid_request", "cursor: not a cursor of this API") from exc
    absence_id, sep, target = after.rpartition("\x00")
    if not sep:
        absence_id, target = after, ""
    if not absence_id:
        raise AdminError(400, "invalid_request", "cursor: not a cursor of this API")
    return absence_id, target or None
