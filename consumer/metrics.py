"""Prometheus metrics (docs/runbook.md, 'Reading the dashboard') as one bundle
built on a given registry.

Business code calls a few methods; tests build a fresh `CollectorRegistry`.
No label carries an employee or absence id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from consumer.config import PROVIDERS
from consumer.providers.base import ERROR_CODES

DEPENDENCIES = ("postgresql", "kafka")
COMPONENTS = ("intake", "dispatch", "maintenance")

TRIMMED_TABLES = ("sync_log", "consent_states")

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = "absence_sync_"
        self.events = Counter(
            p + "events_consumed", "Events consumed, by outcome", ["outcome"], registry=r
        )
        self.dead_letters = Counter(
            p + "dead_letters", "Events sent to the dead-letter topic, by reason", ["reason"],
            registry=r,
        )
        self.lag_records = Gauge(
            p + "consumer_lag_records", "Records behind the end of the partition",
            ["topic", "partition"], registry=r,
        )
        self.lag_seconds = Gauge(
            p + "consumer_lag_seconds",
            "Age of the last consumed record's timestamp; 0 once caught up",
            ["topic", "partition"], registry=r,
        )
        self.batch_seconds = Histogram(
            p + "intake_batch_duration_seconds", "Time to record one batch", registry=r
        )
        self.requests = Counter(
            p + "calendar_requests", "Calendar operations, by provider, operation and outcome",
            ["provider", "operation", "outcome"], registry=r,
        )
        self.request_seconds = Histogram(
            p + "calendar_request_duration_seconds", "Calendar operation duration",
            ["provider", "operation"], registry=r,
        )
        self.errors = Counter(
            p + "calendar_errors", "Calendar errors by stable code", ["provider", "code"],
            registry=r,
        )
        self.backlog = Gauge(p + "backlog_items", "Pending calendar writes", registry=r)
        self.backlog_age = Gauge(
            p + "backlog_oldest_age_seconds", "Age of the oldest pending write", registry=r
        )
        self.in_flight = Gauge(
            p + "dispatch_in_flight", "Calendar operations in flight", registry=r
        )
        self.end_to_end = Histogram(
            p + "end_to_end_latency_seconds", "From event time to calendar write",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.dependency_up = Gauge(
            p + "dependency_up",
            "1 when the worker reaches the dependency, 0 while it waits out an outage",
            ["dependency"], registry=r,
        )
        self.dependency_errors = Counter(
            p + "dependency_errors",
            "Errors of a dependency that the worker waited out (retried after a back-off)",
            ["dependency"], registry=r,
        )
        self.internal_errors = Counter(
            p + "internal_errors",
            "Unexpected exceptions (bugs) caught, by component; see the ERROR log lines",
            ["component"], registry=r,
        )
        self.table_rows = Gauge(
            p + "table_rows", "Rows of a database table (PostgreSQL's estimate)", ["table"],
            registry=r,
        )
        self.table_bytes = Gauge(
            p + "table_size_bytes", "Size of a database table with its indexes", ["table"],
            registry=r,
        )
        self.trimmed = Counter(
            p + "trimmed_rows", "Rows deleted by the history trim job", ["table"], registry=r
        )
        # every known label set exists from the start, so rate() sees the first error
        for outcome in ("applied", "stale", "invalid"):
            self.events.labels(outcome)
        for provider in PROVIDERS:
            for code in ERROR_CODES:
                self.errors.labels(provider, code)
        for dependency in DEPENDENCIES:
            self.dependency_up.labels(dependency).set(1)
            self.dependency_errors.labels(dependency)
        for component in COMPONENTS:
            self.internal_errors.labels(component)
        for table in TRIMMED_TABLES:
            self.trimmed.labels(table)
