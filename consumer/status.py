"""`absence-sync status`: is everything reachable, how far behind, what fails.

One look for an operator: the broker and the database (each reachable or
not, with the reason), the live consumer group's lag per partition (read
without joining the group), the backlog of calendar writes, and every
configuration with its health as the administration page judges it
(`consumer.admin`, `consumer.health`). Each part is gathered on its own, so
an unreachable broker still shows the database's side, and the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from consumer import store
from consumer.admin import Admin
from consumer.errors import Unreachable, dsn_address
from consumer.kafka import PartitionLag, group_lag
from consumer.settings import Settings

#: bounds every statement and the connection, so a dead server is reported, not waited for
DATABASE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Reach:
    """One server: where it is (never credentials), and why it cannot be used."""

    component: str
    address: str
    setting: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "address": self.address, "setting": self.setting,
                "error": self.error}


@dataclass(frozen=True, slots=True)
class ConfigStatus:
    id: str
    tenant: str
    provider: str
    health: str
    cause: str | None
    paused: bool
    deleting: bool
    pending: int
    oldest_pending_seconds: float | None
    counts: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "tenant": self.tenant, "provider": self.provider,
            "health": self.health, "cause": self.cause, "paused": self.paused,
            "deleting": self.deleting, "pending": self.pending,
            "oldest_pending_seconds": self.oldest_pending_seconds, "counts": self.counts,
        }


@dataclass
class Status:
    kafka: Reach
    database: Reach
    topic: str
    group: str
    #: None: not known (broker unreachable) or the topic does not exist (`topic_exists`)
    partitions: list[PartitionLag] | None = None
    topic_exists: bool | None = None
    backlog: store.Backlog | None = None
    configs: list[ConfigStatus] = field(default_factory=list)
    #: migrations the database lacks (then configurations are not read)
    schema_behind: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Both servers reachable and the schema current (the exit status)."""
        return self.kafka.ok and self.database.ok and not self.schema_behind

    @property
    def lag(self) -> int | None:
        return sum(p.lag for p in self.partitions) if self.partitions is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "kafka": self.kafka.as_dict(),
            "database": {**self.database.as_dict(), "schema_behind": self.schema_behind},
            "topic": self.topic,
            "topic_exists": self.topic_exists,
            "group": self.group,
            "lag": self.lag,
            "partitions": [p.as_dict() for p in self.partitions or []],
            "backlog": None if self.backlog is None else {
                "pending": self.backlog.pending,
                "oldest_seconds": round(self.backlog.oldest_seconds, 3),
            },
            "configs": [c.as_dict() for c in self.configs],
        }


async def gather(settings: Settings, bootstrap: str, dsn: str) -> Status:
    """Everything `status` shows; never raises for an unreachable server."""
    status = Status(
        kafka=Reach("Kafka", bootstrap, "ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS"),
        database=Reach("PostgreSQL", dsn_address(dsn), "ABSENCE_SYNC_DATABASE_URL"),
        topic=settings.topic, group=settings.group_id,
    )
    try:
        status.partitions = await group_lag(settings, bootstrap)
        status.topic_exists = status.partitions is not None
    except Unreachable as exc:
        status.kafka = Reach("Kafka", bootstrap, exc.setting, exc.detail)
    try:
        await _database(status, dsn)
    except Unreachable as exc:
        status.database = Reach("PostgreSQL", exc.address, exc.setting, exc.detail)
    return status


async def _database(status: Status, dsn: str) -> None:
    pool = await store.connect(dsn, min_size=1, max_size=2,
                               command_timeout=DATABASE_TIMEOUT_SECONDS)
    try:
        status.schema_behind = await store.pending_migrations(pool)
        if status.schema_behind:
            return
        status.backlog = await store.backlog(pool)
        pending = await store.pending_by_config(pool)
        stored = await store.list_configs(pool)
        admin = Admin(pool)  # no settings: no consent link is made (nothing is written)
        for tenant in sorted({s.config.tenant for s in stored}):
            for view in await admin.syncs(tenant, base_url=""):
                waiting = pending.get(view.id)
                status.configs.append(ConfigStatus(
                    id=view.id, tenant=tenant, provider=view.config.provider,
                    health=view.health.status, cause=view.cause,
                    paused=view.stored.paused_at is not None, deleting=view.summary.deleting,
                    pending=waiting.pending if waiting else 0,
                    oldest_pending_seconds=round(waiting.oldest_seconds, 3) if waiting else None,
                    counts={k: view.summary.counts.get(k, 0)
                            for k in ("pending", "synced", "failed", "deleted")},
                ))
    finally:
        await pool.close()
