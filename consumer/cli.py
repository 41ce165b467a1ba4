"""The `absence-sync` command: thin wrappers that parse, call and print."""

from __future__ import annotations

import asyncio
import json
import os
import secrets as pysecrets
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import asyncpg
import click

from consumer import logs, store, tokens
from consumer.config import ConfigError, load_file
from consumer.embedded import EmbeddedError
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


@main.group()
def token() -> None:
    """API tokens per tenant, with a role: read, manage or configure."""


@token.command("create")
@click.option("--tenant", required=True, help="the tenant the token may see")
@click.option("--role", required=True, type=click.Choice(tokens.ROLES),
              help="read: monitoring; manage: also retry and resync; "
              "configure: also edit configurations")
@click.option("--name", help="a note to recognise it in `token list`")
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
def token_revoke(token_id: str) -> None:
    """Revoke a token by its id (as `token list` shows it); it stops working at once."""
    from consumer.store import admin as admin_store

    settings = _settings()
    if not _with_pool(settings, lambda pool: admin_store.revoke_token(pool, token_id)):
        _fail(f"no token with id {token_id!r}", 1)
    click.echo(f"revoked token {token_id}")


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
