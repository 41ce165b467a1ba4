"""absence-sync benchmark: every figure a ratio against a bare baseline.

    python -m bench.run [--events N] [--quick] [--only NAME ...] [--profile FILE]

Starts the embedded Kafka broker (tansu) and PostgreSQL (pgserver) once, then
measures, in this order and against the same servers:

1. bare baseline: aiokafka consumer group + one batched asyncpg upsert per batch;
2. full pipeline (`run_worker`) to a zero-latency `MemoryProvider`;
3. replay of the same, already-synced events with a fresh consumer group;
4. end-to-end latency at a steady publishing rate (producer in a child process);
5. a calendar double answering in 100 ms with 4 requests in flight per mailbox;
6. peak RSS of a worker (child process) for two backlog sizes.

Prints a table and writes `bench/results.json`. See `bench/README.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime as dt
import json
import logging
import os
import platform
import resource
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench import workload
from bench.calendars import (
    DeclaredLimitProvider,
    LimitedProvider,
    NullProvider,
    StampingProvider,
    Stamps,
    mailbox_gates,
)
from consumer import logs, store
from consumer.dispatch import ProviderFactory
from consumer.embedded import EmbeddedKafka, EmbeddedPostgres
from consumer.intake import ensure_topics
from consumer.metrics import Metrics
from consumer.providers.base import Provider
from consumer.providers.memory import MemoryCalendar
from consumer.secrets import SecretBox
from consumer.settings import Settings
from consumer.worker import Endpoints, run_worker

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results.json"
SCENARIOS = ("baseline", "pipeline", "replay", "latency", "limited", "memory")


# --- plumbing ---------------------------------------------------------------


def dsn_for(base: str, database: str) -> str:
    head, _, query = base.partition("?")
    root = head.rsplit("/", 1)[0]
    return f"{root}/{database}?{query}" if query else f"{root}/{database}"


async def new_database(base_dsn: str, name: str) -> str:
    conn = await asyncpg.connect(base_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return dsn_for(base_dsn, name)


def bench_settings(bootstrap: str, dsn: str, topic: str, group: str, **extra: Any) -> Settings:
    """Product defaults, except what a benchmark must pin (addresses, names, port)."""
    return Settings(
        kafka_bootstrap_servers=bootstrap,
        database_url=dsn,
        topic=topic,
        dlq_topic=f"{topic}.dlq",
        group_id=group,
        http_host="127.0.0.1",
        http_port=0,
        **extra,
    )


async def publish(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    started = time.perf_counter()
    try:
        for key, value in records:
            await producer.send(topic, value=value, key=key)
        await producer.flush()
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def prepare_database(dsn: str, tenants: list[str]) -> asyncpg.Pool:
    """Migrated, with one sync configuration per tenant."""
    pool = await store.connect(dsn, max_size=4)
    await store.migrate(pool)
    await store.apply_configs(pool, workload.configs(tenants), SecretBox(None))
    return pool


async def settled(pool: asyncpg.Pool, items: int) -> bool:
    """At least `items` sync items exist, none pending, nothing leased."""
    row = await pool.fetchrow(
        "SELECT count(*) AS n, count(*) FILTER (WHERE change_seq > done_seq"
        " OR lease_until IS NOT NULL) AS busy FROM sync_items"
    )
    assert row is not None
    return bool(row["n"] >= items and row["busy"] == 0)


async def wait_for(predicate: Callable[[], Any], limit: float, what: str, every: float) -> float:
    """Poll `predicate` (sync or async) every `every` s; returns the time.time() it held."""
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {limit:.0f} s")
        await asyncio.sleep(every)


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def consumed(metrics: Metrics) -> int:
    """Events consumed so far, every outcome (reads the one counter, not the registry)."""
    return int(
        sum(
            s.value
            for family in metrics.events.collect()
            for s in family.samples
            if s.name.endswith("_total")
        )
    )


def calendar_requests(metrics: Metrics) -> int:
    total = 0.0
    for family in metrics.registry.collect():
        if family.name == "absence_sync_calendar_requests":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return int(total)


@dataclass
class Progress:
    """Samples the worker's consumed-events counter every few milliseconds.

    `first_at` is when the first batch was recorded and committed (so the
    consumer-group join is left out of every rate, the baseline's included),
    `first_count` how many events that batch held.
    """

    metrics: Metrics
    target: int = 0
    first_at: float | None = None
    first_count: int = 0
    all_at: float | None = None
    all_consumed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while True:
            seen = consumed(self.metrics)
            now = time.time()
            if seen and self.first_at is None:
                self.first_at, self.first_count = now, seen
            if self.target and seen >= self.target and self.all_at is None:
                self.all_at = now
                self.all_consumed.set()
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def worker(
    settings: Settings, factory: ProviderFactory, metrics: Metrics, progress: Progress
) -> AsyncIterator[int]:
    """The real worker in this process; yields its HTTP port."""
    assert settings.kafka_bootstrap_servers and settings.database_url
    loop = asyncio.get_running_loop()
    port: asyncio.Future[int] = loop.create_future()
    stop = asyncio.Event()
    sampler = asyncio.create_task(progress.run())
    task = asyncio.create_task(
        run_worker(
            settings,
            Endpoints(settings.kafka_bootstrap_servers, settings.database_url),
            stop=stop,
            provider_factory=factory,
            metrics=metrics,
            on_started=port.set_result,
        )
    )
    try:
        await asyncio.wait({port, task}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        yield port.result()
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 120)
        finally:
            sampler.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):  # run_worker installed its own
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            exit_on_sigterm()


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the embedded broker and database are stopped."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


async def wait_ready(port: int, limit: float = 60) -> None:
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    return resp.status == 200
            return False

        await wait_for(ready, limit, "worker ready", 0.05)


def stamping_factory(calendar: MemoryCalendar, stamps: Stamps) -> ProviderFactory:
    def factory(_: store.StoredConfig) -> Provider:
        return StampingProvider(calendar, stamps)

    return factory


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


def histogram_quantile(metrics: Metrics, name: str, q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile of a Prometheus histogram."""
    buckets: list[tuple[float, float]] = []
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == f"{name}_bucket":
                buckets.append((float(s.labels["le"]), s.value))
    if not buckets:
        return None
    buckets.sort()
    total = buckets[-1][1]
    if not total:
        return None
    for bound, cumulative in buckets:
        if cumulative >= q * total:
            return bound
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB.

    `getrusage` is the portable source, but on Linux a child's `ru_maxrss`
    starts at its parent's RSS (the forked address space is counted before
    `exec`), so where /proc exists the high-water mark of the current address
    space (`VmHWM`) is used instead.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def current_rss_mb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --- measurements -------------------------------------------------------------


@dataclass
class Bench:
    bootstrap: str
    base_dsn: str
    args: argparse.Namespace
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    results: dict[str, Any] = field(default_factory=dict)

    def name(self, what: str) -> str:
        return f"bench-{self.tag}-{what}"

    async def topic(self, what: str) -> str:
        topic = self.name(what)
        settings = bench_settings(self.bootstrap, self.base_dsn, topic, "unused")
        await ensure_topics(settings, self.bootstrap)
        return topic

    # 1 ------------------------------------------------------------------------

    async def baseline(self, topic: str, events: int, passes: int) -> dict[str, Any]:
        """Plain aiokafka group consumption + one batched asyncpg upsert per batch.

        One consumer-group join, then `passes` reads of the whole topic (seeking
        back to the beginning), each into a fresh table; the median pass counts.
        """
        dsn = await new_database(self.base_dsn, f"bench_{self.tag}_bare")
        conn = await asyncpg.connect(dsn)
        batch_size = Settings.model_fields["batch_size"].default
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.bootstrap,
            group_id=self.name("bare"),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=batch_size,
        )
        started = time.time()
        await consumer.start()
        runs: list[dict[str, float]] = []
        try:
            for number in range(passes):
                table = f"bare_absences_{number}"
                await conn.execute(
                    f"CREATE TABLE {table} (tenant text NOT NULL, id text NOT NULL,"
                    " version bigint NOT NULL, data jsonb NOT NULL, event_time timestamptz,"
                    " PRIMARY KEY (tenant, id))"
                )
                if number:
                    await consumer.seek_to_beginning()
                runs.append(await self._bare_pass(consumer, conn, table, events, batch_size))
        finally:
            await consumer.stop()
            await conn.close()
        rates = sorted(r["events_per_second"] for r in runs)
        return {
            "events": events,
            "events_per_second": rates[len(rates) // 2],
            "passes": runs,
            "first_pass_wall_seconds_with_group_join": runs[0]["ended"] - started,
            "batch_size": batch_size,
        }

    @staticmethod
    async def _bare_pass(
        consumer: AIOKafkaConsumer, conn: asyncpg.Connection, table: str, events: int,
        batch_size: int,
    ) -> dict[str, float]:
        upsert = (
            f"INSERT INTO {table} AS b (tenant, id, version, data, event_time)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::jsonb[],"
            " $5::timestamptz[])"
            " ON CONFLICT (tenant, id) DO UPDATE SET version = EXCLUDED.version,"
            " data = EXCLUDED.data, event_time = EXCLUDED.event_time"
            " WHERE b.version < EXCLUDED.version"
        )
        seen = 0
        first_at: float | None = None
        first_count = 0
        while seen < events:
            batches = await consumer.getmany(timeout_ms=500, max_records=batch_size)
            if not batches:
                continue
            cols: tuple[list[Any], ...] = ([], [], [], [], [])
            for records in batches.values():
                for record in records:
                    doc = json.loads(record.value)
                    data = doc["data"]
                    cols[0].append(doc["tenant"])
                    cols[1].append(data["id"])
                    cols[2].append(data["version"])
                    cols[3].append(json.dumps(data))
                    cols[4].append(
                        dt.datetime.fromisoformat(doc["time"]) if doc.get("time") else None
                    )
            async with conn.transaction():
                await conn.execute(upsert, *cols)
            await consumer.commit(
                {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
            )
            seen += len(cols[0])
            if first_at is None:
                first_at, first_count = time.time(), seen
        ended = time.time()
        assert first_at is not None
        return {
            "events_per_second": (seen - first_count) / max(1e-9, ended - first_at),
            "seconds": ended - first_at,
            "ended": ended,
        }

    # 2 ------------------------------------------------------------------------

    async def pipeline(
        self, topic: str, load: workload.Workload, dsn: str, profile: str | None
    ) -> dict[str, Any]:
        """The real worker, from an empty database to every absence in the calendar."""
        pool = await prepare_database(dsn, load.tenants)
        settings = bench_settings(
            self.bootstrap, dsn, topic, self.name("pipeline"), **self.args.settings
        )
        calendar = MemoryCalendar()
        stamps = Stamps(expected=load.wanted)
        metrics = Metrics()
        progress = Progress(metrics, target=load.size)
        profiler = cProfile.Profile() if profile else None
        started = time.time()
        try:
            async with worker(settings, stamping_factory(calendar, stamps), metrics, progress):
                if profiler is not None:
                    profiler.enable()
                timeout = self.args.timeout
                await asyncio.wait_for(stamps.done.wait(), timeout)
                ended = await wait_for(lambda: settled(pool, load.size), timeout, "settled", 0.02)
                if profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(profile)  # type: ignore[arg-type]
            statuses = await store.status_counts(pool)
        finally:
            await pool.close()
        assert progress.first_at is not None and progress.all_at is not None
        counted = load.size - progress.first_count
        written = sum(len(box) for box in calendar.events.values())
        return {
            "events": load.size,
            "writes": stamps.writes,
            "calendar_events": written,
            "wanted": load.wanted,
            "statuses": statuses,
            "events_per_second": counted / (ended - progress.first_at),
            "seconds": ended - progress.first_at,
            "intake_events_per_second": counted / max(1e-9, progress.all_at - progress.first_at),
            "wall_seconds_with_startup": ended - started,
            "settings": _concurrency(settings),
        }

    # 3 ------------------------------------------------------------------------

    async def replay(self, topic: str, load: workload.Workload, dsn: str) -> dict[str, Any]:
        """Same events, same versions, a fresh consumer group: nothing to write."""
        publish_seconds = await publish(self.bootstrap, topic, load.records)
        total = 2 * load.size  # the topic now holds every event twice; all are already synced
        pool = await store.connect(dsn, max_size=2)
        settings = bench_settings(
            self.bootstrap, dsn, topic, self.name("replay"), **self.args.settings
        )
        calendar = MemoryCalendar()
        stamps = Stamps()
        metrics = Metrics()
        progress = Progress(metrics, target=total)
        try:
            async with worker(settings, stamping_factory(calendar, stamps), metrics, progress):
                await asyncio.wait_for(progress.all_consumed.wait(), self.args.timeout)
                # give a stray dispatch a chance to show up before counting requests
                await wait_for(lambda: settled(pool, load.size), 30, "settled", 0.05)
                await asyncio.sleep(0.5)
            applied = counter(metrics, "absence_sync_events_consumed_total", outcome="applied")
        finally:
            await pool.close()
        assert progress.first_at is not None and progress.all_at is not None
        counted = total - progress.first_count
        return {
            "events": total,
            "applied": int(applied),
            "calendar_requests": stamps.requests + len(calendar.calls),
            "calendar_requests_metric": calendar_requests(metrics),
            "events_per_second": counted / (progress.all_at - progress.first_at),
            "seconds": progress.all_at - progress.first_at,
            "republish_seconds": publish_seconds,
        }

    # 4 ------------------------------------------------------------------------

    async def latency(self, rate: float, seconds: float) -> dict[str, Any]:
        """A producer (child process) paced at `rate` with event time = now."""
        topic = await self.topic("latency")
        dsn = await new_database(self.base_dsn, f"bench_{self.tag}_latency")
        tenants = workload.tenant_ids()
        pool = await prepare_database(dsn, tenants)
        settings = bench_settings(
            self.bootstrap, dsn, topic, self.name("latency"), **self.args.settings
        )
        calendar = MemoryCalendar()
        stamps = Stamps()
        metrics = Metrics()
        progress = Progress(metrics)
        try:
            async with worker(
                settings, stamping_factory(calendar, stamps), metrics, progress
            ) as port:
                await wait_ready(port)
                report = await child(
                    "produce", "--bootstrap", self.bootstrap, "--topic", topic,
                    "--rate", str(rate), "--seconds", str(seconds),
                )
                stamps.expected = int(report["wanted"])
                if stamps.writes < stamps.expected:
                    stamps.done.clear()
                    await asyncio.wait_for(stamps.done.wait(), self.args.timeout)
                await wait_for(lambda: settled(pool, report["sent"]), 60, "settled", 0.05)
            rows = await pool.fetch("SELECT id, event_time, received_at FROM absences")
        finally:
            await pool.close()
        pairs = sorted(
            (r["event_time"].timestamp(), stamps.written_at[r["id"]] - r["event_time"].timestamp())
            for r in rows
            if r["id"] in stamps.written_at
        )
        latencies = [latency for _, latency in pairs]
        # split: event time -> recorded by intake (the transaction's now()) -> written
        recorded = [
            (r["received_at"] - r["event_time"]).total_seconds()
            for r in rows
            if r["id"] in stamps.written_at
        ]
        dispatched = [
            stamps.written_at[r["id"]] - r["received_at"].timestamp()
            for r in rows
            if r["id"] in stamps.written_at
        ]
        # the worst latency of the events sent in each second of the run
        worst: dict[int, float] = {}
        if pairs:
            first = pairs[0][0]
            for sent, latency in pairs:
                second = int(sent - first)
                worst[second] = max(worst.get(second, 0.0), latency)
        name = "absence_sync_end_to_end_latency_seconds"
        return {
            "rate_asked": rate,
            "rate_achieved": report["rate"],
            "seconds": report["seconds"],
            "events": report["sent"],
            "writes": len(latencies),
            "p50": percentile(latencies, 0.50),
            "p90": percentile(latencies, 0.90),
            "p99": percentile(latencies, 0.99),
            "max": max(latencies) if latencies else float("nan"),
            "histogram_p99_bucket": histogram_quantile(metrics, name, 0.99),
            "p99_event_to_recorded": percentile(recorded, 0.99),
            "p99_recorded_to_written": percentile(dispatched, 0.99),
            "worst_latency_by_second_sent": [round(worst[k], 3) for k in sorted(worst)],
            "settings": _concurrency(settings),
        }

    # 5 ------------------------------------------------------------------------

    async def limited(
        self, events: int, mailboxes: int, latency: float, per_mailbox: int, *, declared: bool
    ) -> dict[str, Any]:
        """Writes/s against a calendar allowing `per_mailbox` requests in flight, each
        `latency` s: at most mailboxes * per_mailbox / latency writes/s.

        `declared`: the provider declares the limit (`mailbox_concurrency`, as the
        Microsoft 365 provider does) and the dispatcher gates mailboxes itself;
        otherwise only the double holds requests back.
        """
        what = "limited-declared" if declared else "limited"
        topic = await self.topic(what)
        dsn = await new_database(self.base_dsn, f"bench_{self.tag}_{what.replace('-', '_')}")
        load = workload.build_for_mailboxes(events, mailboxes)
        pool = await prepare_database(dsn, load.tenants)
        await publish(self.bootstrap, topic, load.records)
        # Enough items in flight that every mailbox always has a request waiting:
        # 4 x the limit per mailbox, all for the one tenant (its mailboxes share it).
        depth = 4 * per_mailbox * mailboxes
        settings = bench_settings(
            self.bootstrap, dsn, topic, self.name(what),
            tenant_concurrency=depth, dispatch_concurrency=depth,
        )
        calendar = MemoryCalendar(latency=latency)
        stamps = Stamps(expected=load.wanted)
        gates = mailbox_gates(per_mailbox)

        kind = DeclaredLimitProvider if declared else LimitedProvider
        assert not declared or per_mailbox == DeclaredLimitProvider.mailbox_concurrency

        def factory(_: store.StoredConfig) -> Provider:
            return kind(calendar, stamps, gates)

        metrics = Metrics()
        progress = Progress(metrics, target=load.size)
        started = time.time()
        try:
            async with worker(settings, factory, metrics, progress):
                await asyncio.wait_for(stamps.done.wait(), self.args.timeout)
                ended = await wait_for(lambda: settled(pool, load.size), 60, "settled", 0.05)
        finally:
            await pool.close()
        stopped = time.time()
        assert stamps.first_start is not None
        window = stamps.last_end - stamps.first_start
        allowed = mailboxes * per_mailbox / latency
        achieved = stamps.writes / window
        return {
            "events": events,
            "limit_declared_to_dispatcher": declared,
            "mailboxes": mailboxes,
            "latency_seconds": latency,
            "per_mailbox_limit": per_mailbox,
            "writes": stamps.writes,
            "seconds": window,
            "allowed_writes_per_second": allowed,
            "achieved_writes_per_second": achieved,
            "max_in_flight_seen": max(calendar.max_in_flight.values()),
            "intake_done_after_seconds": (progress.all_at or 0) - stamps.first_start,
            "wall": {
                "first_write": stamps.first_start - started,
                "last_write": stamps.last_end - started,
                "settled": ended - started,
                "stopped": stopped - started,
            },
            "writes_per_second_timeline": [
                stamps.per_second.get(second, 0)
                for second in range(int(stamps.first_start), int(stamps.last_end) + 1)
            ],
            "settings": _concurrency(settings),
        }

    # 6 ------------------------------------------------------------------------

    async def memory(self, backlog: int, number: int) -> dict[str, Any]:
        """Peak RSS of a fresh worker process draining a backlog of `backlog` events."""
        what = f"memory{number}-{backlog}"
        topic = await self.topic(what)
        dsn = await new_database(self.base_dsn, f"bench_{self.tag}_{what.replace('-', '_')}")
        load = workload.build(backlog, seed=backlog, prefix="mem")
        pool = await prepare_database(dsn, load.tenants)
        await pool.close()
        await publish(self.bootstrap, topic, load.records)
        report = await child(
            "memory", "--bootstrap", self.bootstrap, "--topic", topic, "--dsn", dsn,
            "--group", self.name(what), "--wanted", str(load.wanted),
            "--events", str(load.size), "--timeout", str(self.args.timeout),
            *(arg for item in self.args.overrides for arg in ("--set", item)),
        )
        return {"backlog": backlog, **report}


def _concurrency(settings: Settings) -> dict[str, Any]:
    return {
        k: getattr(settings, k)
        for k in ("batch_size", "tenant_concurrency", "dispatch_concurrency",
                  "topic_partitions", "dispatch_poll_seconds")
    }


# --- child processes -----------------------------------------------------------


async def child(mode: str, *argv: str) -> dict[str, Any]:
    """Run `python -m bench.run --child MODE ...`; its last stdout line is a JSON report."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.run", "--child", mode, *argv,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {mode!r} exited with status {proc.returncode}")
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


async def child_produce(args: argparse.Namespace) -> dict[str, Any]:
    """Publish distinct absences at a steady rate, each stamped with the time it is sent."""
    import random

    rng = random.Random(99)
    tenants = workload.tenant_ids()
    boxes = workload.mailboxes(tenants, 2000, rng)
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap)
    await producer.start()
    total = int(args.rate * args.seconds)
    sent = wanted = 0
    started = time.monotonic()
    try:
        while sent < total:
            due = min(total, int((time.monotonic() - started) * args.rate) + 1)
            while sent < due:
                doc = workload.event(f"lat-{sent:07d}", rng.choice(boxes), rng)
                wanted += doc["data"]["status"] in workload.WANTED
                await producer.send(
                    args.topic, value=json.dumps(doc).encode(), key=doc["data"]["id"].encode()
                )
                sent += 1
            await asyncio.sleep(0.002)
        await producer.flush()
    finally:
        await producer.stop()
    elapsed = time.monotonic() - started
    return {"sent": sent, "wanted": wanted, "seconds": elapsed, "rate": sent / elapsed}


async def child_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Drain the backlog with a worker whose calendar keeps nothing; report peak RSS."""
    start_rss = peak_rss_mb()
    stamps = Stamps(expected=args.wanted)
    settings = bench_settings(args.bootstrap, args.dsn, args.topic, args.group, **args.settings)
    metrics = Metrics()
    pool = await store.connect(args.dsn, max_size=2)
    started = time.time()
    timeline: list[tuple[float, float, int, int]] = []  # (s, RSS MiB, consumed, written)

    async def sample() -> None:
        while True:
            timeline.append(
                (round(time.time() - started, 1), round(current_rss_mb(), 1),
                 consumed(metrics), stamps.writes)
            )
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    try:
        async with worker(settings, lambda _: NullProvider(stamps), metrics, Progress(metrics)):
            await asyncio.wait_for(stamps.done.wait(), args.timeout)
            await wait_for(lambda: settled(pool, args.events), 60, "settled", 0.1)
    finally:
        sampler.cancel()
        await pool.close()
    return {
        "peak_rss_mb": peak_rss_mb(),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_at_end_mb": current_rss_mb(),
        "rss_before_worker_mb": start_rss,
        "writes": stamps.writes,
        "seconds": time.time() - started,
        "settings": _concurrency(settings),
        "timeline_seconds_rss_consumed_written": timeline,
    }


# --- report -------------------------------------------------------------------


@dataclass
class Row:
    measure: str
    value: str
    ratio: str
    target: str
    passed: bool | None
    note: str = ""


def rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    base = results.get("baseline")
    base_rate = base["events_per_second"] if base else None
    if base:
        out.append(Row("bare baseline (aiokafka + batched upsert)",
                       f"{base_rate:,.0f} ev/s", "1.00", "reference", None))

    def ratio(rate: float) -> float | None:
        return rate / base_rate if base_rate else None

    if "pipeline" in results:
        p = results["pipeline"]
        r = ratio(p["events_per_second"])
        out.append(Row("full pipeline to zero-latency calendar",
                       f"{p['events_per_second']:,.0f} ev/s", _fmt(r), ">= 0.50",
                       None if r is None else r >= 0.5,
                       f"intake alone {p['intake_events_per_second']:,.0f} ev/s"))
    if "replay" in results:
        p = results["replay"]
        out.append(Row("replay: calendar requests", str(p["calendar_requests"]), "-", "0",
                       p["calendar_requests"] == 0 and p["calendar_requests_metric"] == 0))
        r = ratio(p["events_per_second"])
        out.append(Row("replay of synced absences", f"{p['events_per_second']:,.0f} ev/s",
                       _fmt(r), ">= 0.70", None if r is None else r >= 0.7))
    if "latency" in results:
        p = results["latency"]
        out.append(Row(f"end-to-end p99 at {p['rate_asked']:.0f} ev/s",
                       f"{p['p99']:.3f} s", "-", "< 1 s", p["p99"] < 1.0,
                       f"p50 {p['p50']:.3f} s, max {p['max']:.3f} s; p99 to recorded "
                       f"{p['p99_event_to_recorded']:.3f} s, recorded to written "
                       f"{p['p99_recorded_to_written']:.3f} s; achieved "
                       f"{p['rate_achieved']:.0f} ev/s, histogram <= "
                       f"{p['histogram_p99_bucket']} s"))
    for key, how in (("limited", "limit declared"), ("limited_double_only", "double only")):
        if key not in results:
            continue
        p = results[key]
        r = p["achieved_writes_per_second"] / p["allowed_writes_per_second"]
        out.append(Row(f"100 ms calendar, 4/mailbox, {p['mailboxes']} mailboxes ({how})",
                       f"{p['achieved_writes_per_second']:,.0f} writes/s", f"{r:.2f}",
                       ">= 0.90", r >= 0.9,
                       f"allowed {p['allowed_writes_per_second']:,.0f}/s, max in flight "
                       f"{p['max_in_flight_seen']}, tenant/dispatch concurrency "
                       f"{p['settings']['tenant_concurrency']}"))
    if "memory" in results:
        small, large = results["memory"]
        r = large["peak_rss_mb"] / small["peak_rss_mb"]
        out.append(Row(f"peak RSS, backlog {small['backlog']:,} -> {large['backlog']:,}",
                       f"{small['peak_rss_mb']:.0f} -> {large['peak_rss_mb']:.0f} MB",
                       f"{r:.2f}", "<= 1.10", r <= 1.10,
                       f"before the worker started: {small['rss_before_worker_mb']:.0f} and "
                       f"{large['rss_before_worker_mb']:.0f} MB"))
    return out


def summary(results: dict[str, Any], passed: bool, seconds: float) -> dict[str, Any]:
    """Every figure and ratio of the run, flat: the benchmark's last line."""
    out: dict[str, Any] = {}
    base = results.get("baseline")
    base_rate = base["events_per_second"] if base else None

    def ratio(rate: float) -> float | None:
        return round(rate / base_rate, 3) if base_rate else None

    if base:
        out["baseline_events_per_second"] = round(base_rate or 0.0, 1)
    if "pipeline" in results:
        p = results["pipeline"]
        out["pipeline_events_per_second"] = round(p["events_per_second"], 1)
        out["pipeline_ratio"] = ratio(p["events_per_second"])
        out["intake_events_per_second"] = round(p["intake_events_per_second"], 1)
        out["intake_ratio"] = ratio(p["intake_events_per_second"])
    if "replay" in results:
        p = results["replay"]
        out["replay_events_per_second"] = round(p["events_per_second"], 1)
        out["replay_ratio"] = ratio(p["events_per_second"])
        out["replay_calendar_requests"] = p["calendar_requests"]
        out["replay_calendar_requests_metric"] = p["calendar_requests_metric"]
    if "latency" in results:
        p = results["latency"]
        out["latency_rate_asked"] = p["rate_asked"]
        out["latency_rate_achieved"] = round(p["rate_achieved"], 1)
        for key in ("p50", "p99", "max"):
            out[f"latency_{key}_seconds"] = round(p[key], 4)
    for key in ("limited", "limited_double_only"):
        if key in results:
            p = results[key]
            out[f"{key}_writes_per_second"] = round(p["achieved_writes_per_second"], 1)
            out[f"{key}_allowed_writes_per_second"] = p["allowed_writes_per_second"]
            out[f"{key}_ratio"] = round(
                p["achieved_writes_per_second"] / p["allowed_writes_per_second"], 3
            )
            out[f"{key}_max_in_flight"] = p["max_in_flight_seen"]
    if "memory" in results:
        small, large = results["memory"]
        out["memory_backlogs"] = [small["backlog"], large["backlog"]]
        out["memory_peak_rss_mb"] = [round(small["peak_rss_mb"], 1),
                                     round(large["peak_rss_mb"], 1)]
        out["memory_ratio"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
    out["passed"] = passed
    out["seconds"] = round(seconds, 1)
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(table: list[Row]) -> None:
    headers = ("measure", "value", "ratio", "target", "result")
    cells = [
        (r.measure, r.value, r.ratio, r.target,
         "-" if r.passed is None else ("PASS" if r.passed else "FAIL"))
        for r in table
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for c, r in zip(cells, table, strict=True):
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
        if r.note:
            print(" " * (widths[0] + 2) + "  " + r.note)


# --- main ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=None,
                    help="events for the baseline, pipeline and replay (default 20000)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run (< 60 s)")
    ap.add_argument("--only", nargs="+", choices=SCENARIOS, default=None,
                    help="run only these (the baseline runs whenever a ratio needs it)")
    ap.add_argument("--baseline-passes", type=int, default=None,
                    help="reads of the topic by the bare baseline; the median counts (3)")
    ap.add_argument("--rate", type=float, default=500.0, help="latency run: events/s")
    ap.add_argument("--seconds", type=float, default=None, help="latency run: duration (20)")
    ap.add_argument("--mailboxes", type=int, default=None, help="limited run: mailboxes (8)")
    ap.add_argument("--limited-events", type=int, default=None,
                    help="limited run: events (400 per mailbox)")
    ap.add_argument("--memory-backlogs", type=int, nargs=2, default=None,
                    help="memory run: two backlog sizes (5000 40000)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                    help="a worker setting for the pipeline, replay, latency and memory runs,"
                    " e.g. --set tenant_concurrency=32 (default: the product's defaults)")
    ap.add_argument("--log-level", default="INFO",
                    help="worker log level; lines are rendered (JSON) and discarded (INFO)")
    ap.add_argument("--profile", default=None,
                    help="write a cProfile of the pipeline run to this file")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-measurement timeout (s)")
    ap.add_argument("--output", type=Path, default=RESULTS, help="results file")
    # child processes
    ap.add_argument("--child", choices=("produce", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    ap.add_argument("--dsn", help=argparse.SUPPRESS)
    ap.add_argument("--group", help=argparse.SUPPRESS)
    ap.add_argument("--wanted", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.settings = dict(item.split("=", 1) for item in args.overrides)
    quick = args.quick
    args.events = args.events or (2_000 if quick else 20_000)
    args.baseline_passes = args.baseline_passes or (1 if quick else 3)
    args.seconds = args.seconds or (4.0 if quick else 20.0)
    args.mailboxes = args.mailboxes or (4 if quick else 8)
    args.limited_events = args.limited_events or args.mailboxes * (100 if quick else 400)
    args.memory_backlogs = args.memory_backlogs or ([500, 4_000] if quick else [5_000, 40_000])
    return args


def quiet_logs(level: str) -> None:
    """The product's logging setup, rendered as in production but written nowhere."""
    import structlog

    logs.configure(level, "json")
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sink))


async def run(args: argparse.Namespace, bootstrap: str, base_dsn: str) -> dict[str, Any]:
    bench = Bench(bootstrap, base_dsn, args)
    wanted = set(args.only or SCENARIOS)
    results = bench.results
    t = time.time()

    def done(what: str) -> None:
        nonlocal t
        print(f"  {what}: {time.time() - t:.1f} s", file=sys.stderr, flush=True)
        t = time.time()

    needs_stream = wanted & {"baseline", "pipeline", "replay"}
    if needs_stream:
        load = workload.build(args.events)
        topic = await bench.topic("stream")
        seconds = await publish(bootstrap, topic, load.records)
        done(f"published {load.size:,} events ({load.size / seconds:,.0f}/s)")
        results["baseline"] = await bench.baseline(topic, load.size, args.baseline_passes)
        done("baseline")
        if wanted & {"pipeline", "replay"}:
            dsn = await new_database(base_dsn, f"bench_{bench.tag}_pipeline")
            results["pipeline"] = await bench.pipeline(topic, load, dsn, args.profile)
            done("pipeline")
            if "replay" in wanted:
                results["replay"] = await bench.replay(topic, load, dsn)
                done("replay")
    if "latency" in wanted:
        results["latency"] = await bench.latency(args.rate, args.seconds)
        done("latency")
    if "limited" in wanted:
        for declared, key in ((True, "limited"), (False, "limited_double_only")):
            results[key] = await bench.limited(
                args.limited_events, args.mailboxes, 0.1, 4, declared=declared
            )
            done(key)
    if "memory" in wanted:
        if args.quick:  # RSS does not depend on CPU contention: save the time
            results["memory"] = list(
                await asyncio.gather(
                    *(bench.memory(n, i) for i, n in enumerate(args.memory_backlogs))
                )
            )
        else:
            results["memory"] = [
                await bench.memory(n, i) for i, n in enumerate(args.memory_backlogs)
            ]
        done("memory")
    return results


def product_revision() -> dict[str, Any]:
    """The commit measured, and product files changed in the work tree (if any)."""
    import subprocess

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(
                ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--", "consumer", "schemas", "pyproject.toml")
    return {"commit": git("rev-parse", "HEAD"), "changed": changed.splitlines()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs(args.log_level)
    if args.child:
        report = asyncio.run(child_produce(args) if args.child == "produce"
                             else child_memory(args))
        print(json.dumps(report))
        return 0
    exit_on_sigterm()
    started = time.time()
    load_before = os.getloadavg()
    print("starting the embedded Kafka broker and PostgreSQL...", file=sys.stderr, flush=True)
    with EmbeddedKafka.start() as kafka, EmbeddedPostgres.start() as pg:
        results = asyncio.run(run(args, kafka.bootstrap_servers, pg.dsn))
    table = rows(results)
    doc = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "product": product_revision(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if not k.startswith(("bootstrap", "dsn", "group", "child", "wanted", "topic"))},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "seconds": time.time() - started,
        "results": results,
        "table": [asdict(r) for r in table],
        "passed": all(r.passed for r in table if r.passed is not None),
    }
    args.output.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    print()
    print_table(table)
    print(f"\n{time.time() - started:.0f} s; results in {args.output}")
    # the last line: one JSON object with every figure and ratio
    print(json.dumps(summary(results, doc["passed"], time.time() - started)), flush=True)
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
