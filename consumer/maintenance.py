"""Bounded storage (docs/runbook.md, 'Bounded history'): periodic trimming and table sizes.

Every worker runs `Maintenance`; the replicas take turns through an
advisory lock and a record of the last run (`store.trim`), so the fleet
trims about once per `ABSENCE_SYNC_TRIM_INTERVAL_SECONDS` whatever its size.
Every worker reports the table sizes it reads as metrics.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from consumer import logs, store
from consumer.metrics import Metrics
from consumer.outages import traceback_of
from consumer.settings import Settings

log = logs.get("maintenance")


class Maintenance:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, metrics: Metrics) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics

    async def run(self, stop: asyncio.Event) -> None:
        """`once` every trim interval until `stop`; a failed run waits for the next one."""
        while not stop.is_set():
            try:
                await self.once()
            except Exception as exc:  # noqa: BLE001 - housekeeping never stops the worker
                if store.is_unavailable(exc):
                    log.warning("trim skipped: PostgreSQL unavailable",
                                error_type=type(exc).__name__)
                else:
                    self.metrics.internal_errors.labels("maintenance").inc()
                    log.error("trim failed", error_type=type(exc).__name__,
                              traceback=traceback_of(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.trim_interval_seconds):
                    await stop.wait()

    async def once(self) -> store.Trimmed | None:
        """Trim if it is this worker's turn, then refresh the table-size metrics."""
        trimmed = await store.trim(
            self.pool,
            keep_days=self.settings.history_keep_days,
            keep_per_item=self.settings.history_keep_per_item,
            min_interval_seconds=self.settings.trim_interval_seconds * 0.9,
        )
        if trimmed is not None:
            for table, rows in trimmed.rows.items():
                self.metrics.trimmed.labels(table).inc(rows)
            if any(trimmed.rows.values()):
                log.info("history trimmed", **{f"{t}_rows": n for t, n in trimmed.rows.items()})
        for table, stats in (await store.table_stats(self.pool)).items():
            self.metrics.table_rows.labels(table).set(stats.rows)
            self.metrics.table_bytes.labels(table).set(stats.bytes)
        return trimmed
