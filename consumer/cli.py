"""The `absence-sync` command: thin wrappers that parse, call and print."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import secrets as pysecrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import asyncpg
import click
from aiokafka.errors import KafkaError

from consumer import logs, store
from consumer.config import ConfigError, load_file
from consumer.embedded import EmbeddedError
from consumer.resync import ResyncConflict, ResyncError, ResyncRequest, resync
from consumer.secrets import SecretBox, SecretsError
from consumer.settings import Settings, SettingsError, load_settings
from consumer.worker import Endpoints, embedded_endpoints, run_worker

T = TypeVar("T")
# a bad DSN, a missing database, refused credentials: reported, not a traceback
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError)


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"absence-sync: error: {message}", err=True)
    sys.exit(code)


def _settings() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as exc:
        _fail(str(exc))
    if settings.embedded_data_dir is None and not settings.database_url:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
        settings = settings.model_copy(update={"embedded_data_dir": base / "absence-sync"})
    return settings


@contextmanager
def _endpoints(settings: Settings) -> Iterator[Endpoints]:
    try:
        with embedded_endpoints(settings) as endpoints:
            yield endpoints
    except EmbeddedError as exc:
        _fail(str(exc), 1)


def _with_pool(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run `fn(pool)` against the configured (or embedded) database."""
    async def main(dsn: str) -> T:
        pool = await store.connect(dsn)
        try:
            await store.migrate(pool)
            return await fn(pool)
        finally:
            await pool.close()

    with _endpoints(settings.model_copy(update={"kafka_bootstrap_servers": "unused"})) as ep:
        try:
            return asyncio.run(main(ep.dsn))
        except (OSError, SecretsError) as exc:
            _fail(str(exc), 1)
        except _DB_ERRORS as exc:
            _fail(f"PostgreSQL: {exc}", 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="absence-sync")
def main() -> None:
    """Put employees' absences from an HR system's Kafka topic into their work calendars."""
    try:
        logs.configure(os.environ.get("ABSENCE_SYNC_LOG_LEVEL", "WARNING"), "console")
    except ValueError:  # an unknown level: commands that read settings report it
        logs.configure("WARNING", "console")


@main.command()
def migrate() -> None:
    """Create or upgrade the database schema (idempotent)."""
    settings = _settings()

    async def run_migrate(dsn: str) -> list[str]:
        pool = await store.connect(dsn)
        try:
            return await store.migrate(pool)
        finally:
            await pool.close()

    with _endpoints(settings.model_copy(update={"kafka_bootstrap_servers": "unused"})) as ep:
        try:
            applied = asyncio.run(run_migrate(ep.dsn))
        except OSError as exc:
            _fail(f"cannot reach PostgreSQL: {exc}", 1)
        except _DB_ERRORS as exc:
            _fail(f"PostgreSQL: {exc}", 1)
    if applied:
        click.echo("applied migrations: " + ", ".join(applied))
    else:
        click.echo("database schema is up to date")


@main.group()
def config() -> None:
    """Manage sync configurations."""


@config.command("apply")
@click.option("-f", "--file", "path", required=True, type=click.Path(path_type=Path))
def config_apply(path: Path) -> None:
    """Create or update every configuration in FILE (all or nothing)."""
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
    outcome = _with_pool(settings, lambda pool: store.apply_configs(pool, configs, box))
    for config_id, what in outcome.items():
        click.echo(f"{config_id}: {what}")


@config.command("list")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def config_list(as_json: bool) -> None:
    """List configurations (never secrets)."""
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
def config_show(config_id: str) -> None:
    """Show one configuration (secret names only, never values)."""
    settings = _settings()

    async def go(pool: Any) -> tuple[store.StoredConfig | None, dict[str, int]]:
        return await store.get_config(pool, config_id), await store.status_counts(pool, config_id)

    stored, counts = _with_pool(settings, go)
    if stored is None:
        _fail(f"no configuration with id {config_id!r}", 1)
    data = stored.config.public_dict()
    data["secrets"] = list(stored.secret_names)
    data["revision"] = stored.revision
    data["granted_tenant_id"] = stored.granted_tenant_id
    data["warnings"] = list(stored.warnings)
    data["items"] = counts
    click.echo(json.dumps(data, indent=2, default=str))


@config.command("reencrypt")
def config_reencrypt() -> None:
    """Re-encrypt stored secrets with the first key of ABSENCE_SYNC_SECRET_KEYS."""
    settings = _settings()
    box = SecretBox(settings.secret_keys)
    if not box.enabled:
        _fail("ABSENCE_SYNC_SECRET_KEYS is not set")
    count = _with_pool(settings, lambda pool: store.reencrypt(pool, box))
    click.echo(f"re-encrypted the secrets of {count} configuration(s)")


@main.command("generate-key")
def generate_key() -> None:
    """Print a new Fernet key for ABSENCE_SYNC_SECRET_KEYS."""
    from cryptography.fernet import Fernet

    click.echo(Fernet.generate_key().decode())


@main.command()
@click.option("--config", "config_id", help="only this configuration")
def retry(config_id: str | None) -> None:
    """Retry the failed items (of one configuration, or of all)."""
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
@click.option("--redirect-uri", help="overrides ABSENCE_SYNC_PUBLIC_URL + the callback path")
def consent_url_cmd(config_id: str, redirect_uri: str | None) -> None:
    """Print the Microsoft 365 admin-consent URL for a configuration."""
    from consumer.providers.microsoft365 import consent_url

    settings = _settings()
    if not settings.ms_client_id:
        _fail("ABSENCE_SYNC_MS_CLIENT_ID is not set")
    base = settings.public_url or f"http://localhost:{settings.http_port}"
    redirect = redirect_uri or base.rstrip("/") + "/consent/microsoft365/callback"
    state = pysecrets.token_urlsafe(24)

    async def go(pool: Any) -> bool:
        stored = await store.get_config(pool, config_id)
        if stored is None:
            return False
        if stored.config.provider != "microsoft365":
            _fail(f"configuration {config_id!r} uses {stored.config.provider}, not microsoft365")
        await store.new_consent_state(pool, config_id, state)
        return True

    if not _with_pool(settings, go):
        _fail(f"no configuration with id {config_id!r}", 1)
    click.echo(consent_url(settings, config_id, state, redirect))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@main.command()
@click.option("--http-port", type=int, help="overrides ABSENCE_SYNC_HTTP_PORT")
def run(http_port: int | None) -> None:
    """The worker: consume, record, dispatch, serve HTTP."""
    # until the worker's own graceful handler is installed, SIGTERM stops start-up
    # cleanly (nothing is in flight yet) like Ctrl-C does
    signal.signal(signal.SIGTERM, _interrupt)
    settings = _settings()
    if http_port is not None:
        settings = settings.model_copy(update={"http_port": http_port})
    logs.configure(settings.log_level, settings.log_format)
    with _endpoints(settings) as endpoints:
        try:
            asyncio.run(run_worker(settings, endpoints))
        except KeyboardInterrupt:
            pass
        except (OSError, SecretsError) as exc:
            _fail(str(exc), 1)


@main.command()
def demo() -> None:
    """Embedded broker, database and CalDAV server; sample absences; print the calendars."""
    from consumer.demo import run_demo

    sys.exit(run_demo(keep_running=False))


@main.command()
def dev() -> None:
    """Like demo, then keep the whole stack running for exploration (Ctrl-C stops)."""
    from consumer.demo import run_demo

    sys.exit(run_demo(keep_running=True))
