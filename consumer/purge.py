"""`absence-sync config delete ID --purge`: delete a configuration's events from
the calendars, then the configuration, through the administration API's own
mechanism (`Admin.delete`, `store.admin.start_purge` / `finish_purges`).

The running workers' dispatchers delete the events and their web process
removes the configuration once nothing of it is left. With `wait`, this
process runs a dispatcher too and removes the configuration itself, so a
purge finishes with no worker running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from consumer import logs
from consumer.admin import Admin
from consumer.dispatch import Dispatcher
from consumer.metrics import Metrics
from consumer.providers.base import ProviderContext, make_ssl_context
from consumer.secrets import SecretBox
from consumer.settings import Settings
from consumer.store import admin as admin_store

log = logs.get("purge")
POLL_SECONDS = 0.5


class UnknownConfiguration(Exception):
    pass


@dataclass(frozen=True, slots=True)
class PurgeResult:
    #: events that were still to delete when the purge started (0: removed at once)
    events: int
    #: the configuration is gone
    removed: bool
    #: events whose deletion failed for good (`wait` stopped: see the failed items)
    stuck: int = 0


async def purge(
    pool: asyncpg.Pool,
    settings: Settings,
    config_id: str,
    *,
    wait: bool,
    on_progress: Callable[[int], None] | None = None,
) -> PurgeResult:
    """Start (or continue) the purge of `config_id`; with `wait`, stay until the
    configuration is removed, or until every event left failed for good."""
    tenant = await admin_store.config_tenant(pool, config_id)
    if tenant is None:
        raise UnknownConfiguration(config_id)
    deleted = await Admin(pool).delete(tenant, config_id, purge=True)
    if not deleted.events:
        return PurgeResult(0, removed=True)
    if not wait:
        return PurgeResult(deleted.events, removed=False)
    stop = asyncio.Event()
    dispatcher = Dispatcher(
        settings, pool, Metrics(), box=SecretBox(settings.secret_keys),
        context=ProviderContext(settings, make_ssl_context(settings)),
    )
    task = asyncio.create_task(dispatcher.run(stop), name="purge-dispatch")
    try:
        while True:
            if config_id in await admin_store.finish_purges(pool):
                log.info("configuration purged and removed", config=config_id)
                return PurgeResult(deleted.events, removed=True)
            left = await admin_store.purge_left(pool, config_id)
            if left is None:  # removed meanwhile by a running worker
                return PurgeResult(deleted.events, removed=True)
            if on_progress is not None:
                on_progress(left.left)
            if left.stuck and left.stuck == left.left:
                return PurgeResult(deleted.events, removed=False, stuck=left.stuck)
            if task.done():
                task.result()  # the dispatcher crashed: say why
            await asyncio.sleep(POLL_SECONDS)
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await dispatcher.drain(settings.shutdown_timeout_seconds)
