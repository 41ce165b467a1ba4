"""The `absence-sync` command: thin wrappers that parse, call and print."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets as pysecrets
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import asyncpg
import click
from aiokafka.errors import KafkaError

from consumer import logs, store, tokens
from consumer.config import ConfigError, config_warnings, load_file
from consumer.embedded import EmbeddedError
from consumer.errors import Unreachable
from consumer.resync import ResyncConflict, ResyncError, ResyncRequest, resync
from consumer.secrets import SecretBox, SecretsError
from consumer.settings import Settings, SettingsError, load_settings, unknown_variables
from consumer.worker import Endpoints, NotConfigured, embedded_endpoints, run_worker

T = TypeVar("T")
# a bad DSN, a missing database, refused credentials: reported, not a traceback
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError)
_SETTINGS_DOC = "Settings: ABSENCE_SYNC_* environment variables (README, 'Settings')."
_CONFIG_DOC = "File format: docs/configuration.md."


@dataclass
class _Options:
    """What the global flags asked for."""

    embedded: bool = False
    debug: bool = False
    json_errors: bool = False  # `run` with JSON logs: errors are log lines too


_OPTIONS = _Options()
_log = logs.get("cli")


def _fail(message: str, code: int = 2) -> NoReturn:
    message = logs.redact_text(message)
    if _OPTIONS.debug and sys.exc_info()[0] is not None:
        traceback.print_exc()
    if _OPTIONS.json_errors:
        _log.error(message)
    else:
        click.echo(f"absence-sync: error: {message}", err=True)
    sys.exit(code)


def _warn(message: str) -> None:
    if _OPTIONS.json_errors:
        _log.warning(message)
    else:
        click.echo(f"absence-sync: warning: {message}", err=True)


def _embedded_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--embedded` on a command: start embedded servers for what is not configured."""

    def remember(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            _OPTIONS.embedded = True

    return click.option(
        "--embedded", is_flag=True, expose_value=False, is_eager=True, callback=remember,
        help="Start a throwaway embedded broker/PostgreSQL for whatever is not configured "
        "(trials only; also ABSENCE_SYNC_EMBEDDED=true).",
    )(f)


def _settings(*, warn: bool = True) -> Settings:
    try:
        settings = load_settings()
    except SettingsError as exc:
        _fail(str(exc))
    if warn:
        for message in unknown_variables(os.environ):
            _warn(message)
    if _OPTIONS.embedded:
        settings = settings.model_copy(update={"embedded": True})
    if settings.embedded_data_dir is None and not settings.database_url:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
        settings = settings.model_copy(update={"embedded_data_dir": base / "absence-sync"})
    return settings


@contextmanager
def _endpoints(settings: Settings) -> Iterator[Endpoints]:
    try:
        with embedded_endpoints(settings) as endpoints:
            yield endpoints
    except NotConfigured as exc:
        _fail(str(exc))
    except EmbeddedError as exc:
        _fail(str(exc), 1)


def _run(coro: Awaitable[T]) -> T:
    """Run `coro`; infrastructure failures become one readable line (exit 1)."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except Unreachable as exc:
        _fail(str(exc), 1)
    except SecretsError as exc:
        _fail(str(exc), 1)
    except store.ConflictError as exc:
        _fail(str(exc))
    except _DB_ERRORS as exc:
        _fail(f"PostgreSQL: {' '.join(str(exc).split())}", 1)
    except OSError as exc:
        _fail(str(exc), 1)


def _with_pool(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run `fn(pool)` against the configured (or, with --embedded, embedded) database."""
    async def main(dsn: str) -> T:
        pool = await store.connect(dsn)
        try:
            await store.migrate(pool)
            return await fn(pool)
        finally:
            await pool.close()

    with _endpoints(settings.model_copy(update={"kafka_bootstrap_servers": "unused"})) as ep:
        return _run(main(ep.dsn))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="absence-sync")
@click.option("--debug", is_flag=True, help="Show Python tracebacks with errors.")
def main(debug: bool) -> None:
    """Put employees' absences from an HR system's Kafka topic into their work calendars.

    Every command reads its settings from ABSENCE_SYNC_* environment variables
    (README, 'Settings'). Without ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS or
    ABSENCE_SYNC_DATABASE_URL a command fails, unless --embedded asks for
    throwaway embedded servers (trials only); `demo` and `dev` always use them.
    """
    _OPTIONS.debug = debug
    try:
        logs.configure(os.environ.get("ABSENCE_SYNC_LOG_LEVEL", "WARNING"), "console")
    except ValueError:  # an unknown level: commands that read settings report it
        logs.configure("WARNING", "console")


@main.command()
@_embedded_option
def migrate() -> None:
    """Create or upgrade the database schema (idempotent; safe with several replicas).

    Reads ABSENCE_SYNC_DATABASE_URL.
    """
    settings = _settings()

    async def run_migrate(dsn: str) -> list[str]:
        pool = await store.connect(dsn)
        try:
            return await store.migrate(pool)
        finally:
            await pool.close()

    with _endpoints(settings.model_copy(update={"kafka_bootstrap_servers": "unused"})) as ep:
        applied = _run(run_migrate(ep.dsn))
    if applied:
        click.echo("applied migrations: " + ", ".join(applied))
    else:
        click.echo("database schema is up to date")


@main.group()
def config() -> None:
    """Manage sync configurations (stored in PostgreSQL). File format: docs/configuration.md."""


@config.command("apply")
@click.option("-f", "--file", "path", required=True, type=click.Path(path_type=Path),
              help="YAML file with a top-level 'syncs:' list.")
@_embedded_option
def config_apply(path: Path) -> None:
    """Create or update every configuration in FILE (all or nothing).

    Secrets are given as *_env / *_file and stored encrypted with
    ABSENCE_SYNC_SECRET_KEYS. Reads ABSENCE_SYNC_DATABASE_URL. File format:
    docs/configuration.md.
    """
    settings = _settings()
    try:
        configs = load_file(path)
    except ConfigError as exc:
        _fail(str(exc))
    box = SecretBox(settings.secret_keys)
    for cfg in configs:
        if cfg.secrets and not box.enabled:
            _fail(
                f"{path}: sync {cfg.id!r}: holds secrets but ABSENCE_SYNC_SECRET_KEYS is not set "
                "(generate a key with: absence-sync generate-key)"
            )
    warnings = {cfg.id: config_warnings(cfg) for cfg in configs}

    async def apply(pool: Any) -> dict[str, str]:
        outcome = await store.apply_configs(pool, configs, box)
        for config_id, what in outcome.items():
            if what != "unchanged":  # the worker's provider adds what it learns later
                await store.set_config_warnings(pool, config_id, warnings[config_id])
        return outcome

    outcome = _with_pool(settings, apply)
    for config_id, what in outcome.items():
        click.echo(f"{config_id}: {what}")
        for warning in warnings[config_id]:
            click.echo(f"absence-sync: warning: {config_id}: {warning}", err=True)


@config.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_embedded_option
def config_list(as_json: bool) -> None:
    """List configurations (never secrets). Reads ABSENCE_SYNC_DATABASE_URL."""
    settings = _settings()
    stored = _with_pool(settings, lambda pool: store.list_configs(pool))
    if as_json:
        docs = [{**s.config.public_dict(), "secrets": list(s.secret_names)} for s in stored]
        click.echo(json.dumps(docs, indent=2, default=str))
        return
    if not stored:
        click.echo("no configurations")
        return
    click.echo(f"{'ID':<24} {'TENANT':<16} {'PROVIDER':<13} REVISION")
    for s in stored:
        click.echo(f"{s.config.id:<24} {s.config.tenant:<16} {s.config.provider:<13} {s.revision}")


@config.command("show")
@click.argument("config_id")
@_embedded_option
def config_show(config_id: str) -> None:
    """Show one configuration as JSON (secret names only, never values), with its
    item counts and provider warnings. Reads ABSENCE_SYNC_DATABASE_URL."""
    settings = _settings()

    async def go(pool: Any) -> tuple[
        store.StoredConfig | None, dict[str, int], dict[str, dict[str, int]]
    ]:
        return (
            await store.get_config(pool, config_id),
            await store.status_counts(pool, config_id),
            await store.status_counts_by_target(pool, config_id),
        )

    stored, counts, by_target = _with_pool(settings, go)
    if stored is None:
        _fail(f"no configuration with id {config_id!r}", 1)
    data = stored.config.public_dict()
    data["secrets"] = list(stored.secret_names)
    data["revision"] = stored.revision
    data["granted_tenant_id"] = stored.granted_tenant_id
    data["warnings"] = list(stored.warnings)
    data["items"] = counts
    data["items_by_target"] = by_target
    click.echo(json.dumps(data, indent=2, default=str))


@config.command("reencrypt")
@_embedded_option
def config_reencrypt() -> None:
    """Re-encrypt stored secrets with the first key of ABSENCE_SYNC_SECRET_KEYS
    (key rotation: prepend a new key, run this, then drop the old key)."""
    settings = _settings()
    box = SecretBox(settings.secret_keys)
    if not box.enabled:
        _fail("ABSENCE_SYNC_SECRET_KEYS is not set")
    count = _with_pool(settings, lambda pool: store.reencrypt(pool, box))
    click.echo(f"re-encrypted the secrets of {count} configuration(s)")


@config.command("test")
@click.argument("config_id")
@click.option("--mailbox", help="The calendar address to try (default: one the "
              "configuration already writes to, or a recent employee of its tenant).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_embedded_option
def config_test(config_id: str, mailbox: str | None, as_json: bool) -> None:
    """Reach the configuration's calendar service for one mailbox, writing nothing.

    Gets a token or logs in, then reads the mailbox's calendar, exactly as a
    write would start. Prints 'ok' or the error code, message and hint; exits
    1 on failure. Reads ABSENCE_SYNC_DATABASE_URL, ABSENCE_SYNC_SECRET_KEYS,
    ABSENCE_SYNC_CA_BUNDLE and the provider settings (ABSENCE_SYNC_MS_*).
    """
    from consumer.probe import probe
    from consumer.providers.base import ProviderContext, make_ssl_context

    settings = _settings()
    box = SecretBox(settings.secret_keys)

    async def go(pool: Any) -> Any:
        stored = await store.get_config(pool, config_id, box)
        if stored is None:
            _fail(f"no configuration with id {config_id!r}", 1)
        address = mailbox or await store.sample_mailbox(pool, config_id)
        if not address:
            _fail(f"configuration {config_id!r} has no mailbox to try yet: give --mailbox ADDRESS")
        context = ProviderContext(settings, make_ssl_context(settings))
        return await probe(stored, context, address.strip().lower())

    result = _with_pool(settings, go)
    error = result.error
    if as_json:
        click.echo(json.dumps({
            "config": result.config_id, "provider": result.provider, "mailbox": result.mailbox,
            "ok": result.ok, "code": error.code if error else None,
            "message": error.message if error else None, "hint": error.hint if error else None,
        }))
    elif error is None:
        click.echo(f"ok: {result.provider} reached the calendar of {result.mailbox}"
                   " (nothing was written)")
    else:
        click.echo(f"failed: {error.code}: {error.message}")
        if error.hint:
            click.echo(f"hint: {error.hint}")
    if error is not None:
        sys.exit(1)


@main.command("generate-key")
def generate_key() -> None:
    """Print a new Fernet key for ABSENCE_SYNC_SECRET_KEYS."""
    from cryptography.fernet import Fernet

    click.echo(Fernet.generate_key().decode())


@main.command()
@click.option("--config", "config_id", help="Only this configuration.")
@_embedded_option
def retry(config_id: str | None) -> None:
    """Retry the failed items now (of one configuration, or of all).

    Reads ABSENCE_SYNC_DATABASE_URL; running workers pick the items up.
    """
    settings = _settings()

    async def go(pool: Any) -> int | None:
        if config_id and await store.get_config(pool, config_id) is None:
            return None
        ids = [config_id] if config_id else [s.config.id for s in await store.list_configs(pool)]
        return sum([await store.requeue(pool, i, only_failed=True) for i in ids])

    count = _with_pool(settings, go)
    if count is None:
        _fail(f"no configuration with id {config_id!r}", 1)
    click.echo(f"re-queued {count} failed item(s)")


@main.group()
def dlq() -> None:
    """The dead-letter topic (ABSENCE_SYNC_DLQ_TOPIC): events intake refused."""


@dlq.command("show")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="How many of the latest dead letters.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_embedded_option
def dlq_show(limit: int, as_json: bool) -> None:
    """Print the latest dead letters with their reason headers, oldest first.

    Reads without a consumer group: nothing is committed or moved. Reads
    ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS, ABSENCE_SYNC_DLQ_TOPIC and the
    ABSENCE_SYNC_KAFKA_* security settings.
    """
    from consumer.kafka import read_dead_letters

    settings = _settings()
    with _endpoints(settings.model_copy(update={"database_url": "unused"})) as endpoints:
        letters = _run(read_dead_letters(settings, endpoints.bootstrap, limit))
    if as_json:
        for letter in letters:
            click.echo(json.dumps(letter.as_dict(), ensure_ascii=False))
        return
    if not letters:
        click.echo(f"no dead letters in {settings.dlq_topic}")
        return
    for letter in letters:
        doc = letter.as_dict(value_chars=200)
        when = doc["timestamp"] or "(no time)"
        origin = (f"{doc['original_topic']}[{doc['original_partition']}]"
                  f"@{doc['original_offset']}")
        click.echo(f"{when}  {origin}  key={doc['key']!s}  reason={doc['reason']}")
        if doc["error"]:
            click.echo(f"    error: {doc['error']}")
        if doc["value"] is not None:
            preview = " ".join(str(doc["value"]).split())
            click.echo(f"    value ({doc['value_bytes']} bytes): {preview}")


class _ResyncView:
    """Resync progress on stderr: a bar on a terminal (records read of the
    total, then writes done of those marked), plain lines otherwise."""

    def __init__(self, *, every: float = 2.0) -> None:
        self.tty = sys.stderr.isatty()
        self.every = every
        self.phase = ""
        self.bar: Any = None
        self.last = 0.0

    def __call__(self, progress: Any) -> None:
        changed = progress.phase != self.phase
        if changed:
            self._end_bar()
            self.phase = progress.phase
        if self.tty:
            self._draw(progress, changed)
            return
        now = time.monotonic()
        if changed or now - self.last >= self.every:
            self.last = now
            line = self._line(progress)
            if line:
                click.echo(f"resync: {line}", err=True)

    def _draw(self, progress: Any, changed: bool) -> None:
        if progress.phase == "reading":
            length, position, label = progress.total, progress.read, "reading records"
        elif progress.phase == "writing":
            done = progress.written + progress.unchanged + progress.failed
            length, position, label = progress.marked, done, "writing events "
        else:
            if changed and progress.phase == "selecting":
                click.echo("selecting absences...", err=True)
            return
        if self.bar is None:
            self.bar = click.progressbar(
                length=max(length, 1), label=label, file=sys.stderr, show_pos=True
            )
            self.bar.__enter__()
        self.bar.length = max(length, 1)
        self.bar.update(max(0, position - self.bar.pos))

    @staticmethod
    def _line(progress: Any) -> str:
        if progress.phase == "reading":
            return f"read {progress.read} of {progress.total} records"
        if progress.phase == "selecting":
            return f"selecting absences: {progress.in_scope} in scope so far"
        if progress.phase == "writing":
            done = progress.written + progress.unchanged + progress.failed
            return (
                f"writes done {done} of {progress.marked} (written {progress.written}, "
                f"unchanged {progress.unchanged}, failed {progress.failed})"
            )
        return ""

    def _end_bar(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def close(self) -> None:
        self._end_bar()


def _parse_since(value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        _fail(f"--since: {value!r} is not a date like 2026-01-31")


def _parse_from_time(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        stamp = dt.datetime.fromisoformat(value.strip().replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        _fail(f"--from-time: {value!r} is not an RFC 3339 timestamp like 2026-01-31T08:00:00Z")
    if stamp.utcoffset() is None:
        _fail(f"--from-time: {value!r} has no UTC offset (add Z or e.g. +01:00)")
    return stamp


@main.command("resync")
@click.option("--since", metavar="DATE", help="only absences ending on or after DATE (YYYY-MM-DD)")
@click.option("--tenant", help="the configurations of this tenant")
@click.option("--config", "config_ids", multiple=True, metavar="ID",
              help="this configuration (repeatable)")
@click.option("--establishment", "establishments", multiple=True, metavar="ID",
              help="only absences of this establishment (repeatable)")
@click.option("--from-time", metavar="TIMESTAMP",
              help="read from the offsets for this RFC 3339 time, not the beginning")
@click.option("--dry-run", is_flag=True, help="count what is in scope; change nothing")
@click.option("--force", is_flag=True, help="rewrite events even when unchanged")
@click.option("--wait", is_flag=True,
              help="stay until the marked writes are done (and write them from here too)")
@click.option("--json", "as_json", is_flag=True, help="end with one JSON line of counts")
@_embedded_option
def resync_cmd(
    since: str | None,
    tenant: str | None,
    config_ids: tuple[str, ...],
    establishments: tuple[str, ...],
    from_time: str | None,
    dry_run: bool,
    force: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Re-read the topic and synchronize the selected absences again.

    Reads the topic in a temporary consumer group (the live one is untouched),
    records what is newer, and marks the selected (configuration, absence)
    pairs for a write; the workers write them, or this command with --wait.
    Exit status: 0 done, 1 error, 2 bad usage, 3 some writes failed (--wait).
    """
    if not tenant and not config_ids:
        _fail("--tenant or --config is required (so that nobody resyncs every tenant by accident)")
    if any(not e.strip() for e in establishments):
        _fail("--establishment: an establishment id cannot be empty")
    request = ResyncRequest(
        tenant=tenant or None, config_ids=config_ids, establishments=establishments,
        since=_parse_since(since), from_time=_parse_from_time(from_time),
        dry_run=dry_run, force=force, wait=wait,
    )
    settings = _settings()
    view = _ResyncView()
    try:
        with _endpoints(settings) as endpoints:
            found = settings.model_copy(update={
                "kafka_bootstrap_servers": endpoints.bootstrap, "database_url": endpoints.dsn,
            })
            summary = _with_pool(
                found,
                lambda pool: resync(pool, found, endpoints.bootstrap, request, on_progress=view),
            )
    except ResyncConflict as exc:
        view.close()
        _fail(str(exc), 1)
    except ResyncError as exc:
        view.close()
        _fail(str(exc))
    except KafkaError as exc:
        view.close()
        _fail(f"Kafka: {exc}", 1)
    except KeyboardInterrupt:
        view.close()
        _fail("interrupted; the pairs already marked are still written by the workers", 130)
    view.close()
    lines = [
        f"read {summary.read} records ({summary.invalid} invalid, {summary.applied} newer than "
        f"recorded, {summary.stale} stale)",
        f"in scope: {summary.in_scope} (configuration, absence) pairs",
    ]
    if summary.dry_run:
        lines.append(f"dry run: nothing changed; {summary.in_scope} events to initialize")
    else:
        lines.append(f"marked for a write: {summary.marked}")
        if wait:
            lines.append(
                f"written {summary.written}, unchanged {summary.unchanged}, "
                f"failed {summary.failed}"
            )
        else:
            lines.append("the running workers write them (use --wait to stay until done)")
    for line in lines:
        click.echo(line, err=as_json)
    if as_json:
        click.echo(json.dumps(summary.counts()))
    if wait and summary.failed:
        sys.exit(3)


@main.command("consent-url")
@click.argument("config_id")
@click.option("--redirect-uri",
              help="Overrides ABSENCE_SYNC_PUBLIC_URL + /consent/microsoft365/callback (https).")
@_embedded_option
def consent_url_cmd(config_id: str, redirect_uri: str | None) -> None:
    """Print the Microsoft 365 admin-consent link for a configuration.

    A customer's administrator opens it; Microsoft then redirects their browser
    to ABSENCE_SYNC_PUBLIC_URL/consent/microsoft365/callback, which must reach a
    running worker over https. The link works once and expires after a day.
    Reads ABSENCE_SYNC_MS_CLIENT_ID, ABSENCE_SYNC_PUBLIC_URL and
    ABSENCE_SYNC_DATABASE_URL; see docs/microsoft365.md.
    """
    from consumer.providers.microsoft365 import consent_url

    settings = _settings()
    if not settings.ms_client_id:
        _fail("ABSENCE_SYNC_MS_CLIENT_ID is not set: the vendor application's client id")
    if redirect_uri is None:
        if not settings.public_url:
            _fail(
                "ABSENCE_SYNC_PUBLIC_URL is not set: the consent redirect must reach this "
                "service at a public https address (e.g. https://sync.vendor.example); "
                "without it the administrator's browser would be sent to their own machine"
            )
        redirect_uri = settings.public_url.rstrip("/") + "/consent/microsoft365/callback"
    if not redirect_uri.startswith("https://"):
        _fail(f"the consent redirect must be an https:// address, got {redirect_uri!r}")
    state = pysecrets.token_urlsafe(24)

    permissions = ["Calendars.ReadWrite"]

    async def go(pool: Any) -> bool:
        stored = await store.get_config(pool, config_id)
        if stored is None:
            return False
        if stored.config.provider != "microsoft365":
            _fail(f"configuration {config_id!r} uses {stored.config.provider}, not microsoft365")
        if stored.config.auto_reply is not None:
            permissions.append("MailboxSettings.ReadWrite")
        await store.new_consent_state(pool, config_id, state)
        return True

    if not _with_pool(settings, go):
        _fail(f"no configuration with id {config_id!r}", 1)
    expires = dt.datetime.now(dt.UTC) + store.CONSENT_LIFETIME
    click.echo(consent_url(settings, config_id, state, redirect_uri))
    click.echo(
        f"The link works once and expires at {expires:%Y-%m-%d %H:%M} UTC "
        f"(in {store.CONSENT_LIFETIME.days * 24} hours). It grants the application "
        f"permissions registered on it; this configuration needs {' and '.join(permissions)}.",
        err=True,
    )


@main.group()
def token() -> None:
    """API tokens per tenant, with a role: read, manage or configure."""


@token.command("create")
@click.option("--tenant", required=True, help="the tenant the token may see")
@click.option("--role", required=True, type=click.Choice(tokens.ROLES),
              help="read: monitoring; manage: also retry and resync; "
              "configure: also edit configurations")
@click.option("--name", help="a note to recognise it in `token list`")
@_embedded_option
def token_create(tenant: str, role: str, name: str | None) -> None:
    """Create a token; it is printed once, alone on the last line."""
    from consumer.store import admin as admin_store

    tenant = tenant.strip()
    if not tenant:
        _fail("--tenant must not be empty")
    settings = _settings()
    token_id, text = tokens.new_token()
    _with_pool(settings, lambda pool: admin_store.create_token(
        pool, token_id=token_id, tenant=tenant, role=role, name=name,
        digest=tokens.token_hash(text),
    ))
    click.echo(f"created token {token_id} for tenant {tenant} with role {role}")
    click.echo("it is shown only this once: store it now (e.g. in a password manager)")
    click.echo(text)


@token.command("list")
@click.option("--tenant", help="only this tenant's tokens")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_embedded_option
def token_list(tenant: str | None, as_json: bool) -> None:
    """List tokens: ids, names, roles, creation and last use (never the token)."""
    from consumer.store import admin as admin_store

    settings = _settings()
    rows = _with_pool(settings, lambda pool: admin_store.list_tokens(pool, tenant))
    if as_json:
        click.echo(json.dumps([
            {"id": r.id, "tenant": r.tenant, "role": r.role, "name": r.name,
             "created_at": r.created_at.isoformat(),
             "last_used_at": r.last_used_at.isoformat() if r.last_used_at else None,
             "revoked": r.revoked}
            for r in rows
        ], indent=2))
        return
    if not rows:
        click.echo("no tokens")
        return
    click.echo(f"{'ID':<13} {'TENANT':<16} {'ROLE':<10} {'CREATED':<17} {'LAST USED':<17} NAME")
    for r in rows:
        used = r.last_used_at.strftime("%Y-%m-%d %H:%M") if r.last_used_at else "never"
        state = " (revoked)" if r.revoked else ""
        click.echo(
            f"{r.id:<13} {r.tenant:<16} {r.role:<10} {r.created_at:%Y-%m-%d %H:%M} "
            f"{used:<17} {r.name or ''}{state}"
        )


@token.command("revoke")
@click.argument("token_id")
@_embedded_option
def token_revoke(token_id: str) -> None:
    """Revoke a token by its id (as `token list` shows it); it stops working at once."""
    from consumer.store import admin as admin_store

    settings = _settings()
    if not _with_pool(settings, lambda pool: admin_store.revoke_token(pool, token_id)):
        _fail(f"no token with id {token_id!r}", 1)
    click.echo(f"revoked token {token_id}")


@main.group()
def feed() -> None:
    """iCalendar feed links of `provider: ics` configurations (docs/rendering.md, 'Feeds')."""


@feed.command("create")
@click.option("--config", "config_id", required=True, help="an ics configuration's id")
@click.option("--employee", help="the employee's e-mail: a personal feed of their events "
              "(left out: the configuration's team feed)")
@click.option("--name", help="the calendar name clients show (default: 'Absences of EMAIL' "
              "or 'Team absences (ID)')")
@_embedded_option
def feed_create(config_id: str, employee: str | None, name: str | None) -> None:
    """Create a feed link; its URL is printed once, alone on the last line.

    The URL is ABSENCE_SYNC_PUBLIC_URL + /feeds/TOKEN.ics; the token is stored
    only as a hash, so it cannot be shown again (create another link instead).
    """
    from consumer import feeds
    from consumer.store import feeds as feed_store

    settings = _settings()
    if employee is not None:
        try:
            employee = feeds.normalise_employee(employee)
        except ValueError as exc:
            _fail(f"--employee: {exc}")
    if name is not None and len(name) > feeds.MAX_NAME:
        _fail(f"--name: at most {feeds.MAX_NAME} characters")
    feed_id, token = feeds.new_feed_token()

    async def go(pool: Any) -> Any:
        stored = await store.get_config(pool, config_id)
        if stored is None:
            _fail(f"no configuration with id {config_id!r}", 1)
        if stored.config.provider != "ics":
            _fail(f"configuration {config_id!r} writes to {stored.config.provider}: feeds are "
                  "served for configurations with provider: ics")
        return await feed_store.create_feed(
            pool, feed_id=feed_id, config_id=config_id, tenant=stored.config.tenant,
            employee=employee, name=feeds.clean_name(name), digest=feeds.feed_token_hash(token),
        )

    row = _with_pool(settings, go)
    if row is None:
        _fail(f"no configuration with id {config_id!r}", 1)
    base = settings.public_url
    if not base:
        base = f"http://localhost:{settings.http_port}"
        _warn(f"ABSENCE_SYNC_PUBLIC_URL is not set: the link uses {base}; set it to the "
              "address where calendar clients reach the worker")
    what = f"employee {row.employee}" if row.employee else "the whole team"
    click.echo(f"created feed {row.id} of configuration {config_id} for {what}")
    click.echo("the link is shown only this once: it is the only key to the feed")
    click.echo(feeds.feed_url(base, token))


@feed.command("list")
@click.option("--config", "config_id", required=True, help="the configuration's id")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_embedded_option
def feed_list(config_id: str, as_json: bool) -> None:
    """List a configuration's feed links: ids, employees, creation, last use (never a URL)."""
    from consumer.store import feeds as feed_store

    settings = _settings()

    async def go(pool: Any) -> Any:
        if await store.get_config(pool, config_id) is None:
            _fail(f"no configuration with id {config_id!r}", 1)
        return await feed_store.list_feeds(pool, config_id)

    rows = _with_pool(settings, go)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    if not rows:
        click.echo("no feeds")
        return
    click.echo(f"{'ID':<13} {'FOR':<32} {'CREATED':<17} {'LAST USED':<17} NAME")
    for r in rows:
        used = r.last_used_at.strftime("%Y-%m-%d %H:%M") if r.last_used_at else "never"
        state = " (revoked)" if r.revoked else ""
        who = r.employee or "team"
        click.echo(f"{r.id:<13} {who:<32} {r.created_at:%Y-%m-%d %H:%M} {used:<17} "
                   f"{r.name or ''}{state}")


@feed.command("revoke")
@click.argument("feed")
@_embedded_option
def feed_revoke(feed: str) -> None:
    """Revoke a feed link by its id (as `feed list` shows it), or by its URL; it
    answers 404 at once."""
    from consumer import feeds
    from consumer.store import feeds as feed_store

    settings = _settings()
    token = feeds.token_of(feed)
    row = _with_pool(settings, lambda pool: feed_store.revoke_feed(
        pool, None if token else feed.strip(),
        digest=feeds.feed_token_hash(token) if token else None,
    ))
    if row is None:
        _fail("no such feed" + ("" if token else f" with id {feed.strip()!r}"), 1)
    click.echo(f"revoked feed {row.id} of configuration {row.config_id}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@main.command()
@click.option("--http-port", type=int, help="Overrides ABSENCE_SYNC_HTTP_PORT.")
@_embedded_option
def run(http_port: int | None) -> None:
    """The worker: consume, record, dispatch, serve HTTP (/metrics, /healthz, /readyz, API).

    Reads every ABSENCE_SYNC_* setting (README, 'Settings'); needs
    ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS and ABSENCE_SYNC_DATABASE_URL unless
    --embedded. Stops gracefully on SIGTERM.
    """
    # until the worker's own graceful handler is installed, SIGTERM stops start-up
    # cleanly (nothing is in flight yet) like Ctrl-C does
    signal.signal(signal.SIGTERM, _interrupt)
    settings = _settings(warn=False)
    if http_port is not None:
        settings = settings.model_copy(update={"http_port": http_port})
    logs.configure(settings.log_level, settings.log_format)
    _OPTIONS.json_errors = settings.log_format == "json"
    for message in unknown_variables(os.environ):
        _warn(message)
    with _endpoints(settings) as endpoints, contextlib.suppress(KeyboardInterrupt):
        _run(run_worker(settings, endpoints))


@main.command()
def demo() -> None:
    """Embedded broker, database and CalDAV server; sample absences; print the calendars."""
    sys.exit(_demo(keep_running=False))


@main.command()
def dev() -> None:
    """Like demo, then keep the whole stack running for exploration (Ctrl-C stops)."""
    sys.exit(_demo(keep_running=True))


def _demo(*, keep_running: bool) -> int:
    from consumer.demo import run_demo
    from consumer.radicale_server import RadicaleError

    try:
        return run_demo(keep_running=keep_running)
    except (EmbeddedError, RadicaleError) as exc:
        _fail(str(exc), 1)
