"""The worker process: intake + dispatcher + maintenance + HTTP, with a bounded graceful stop.

On SIGTERM (docs/guarantees.md, 'Stopping: SIGTERM'): stop taking work, finish
the Kafka batch in flight and commit it, give calendar writes in flight
`shutdown_timeout_seconds` to finish (the rest is cancelled and its leases
handed back), leave the group, close pools.

Once started, the worker outlives PostgreSQL and Kafka outages: intake and
dispatch wait them out (see `consumer.outages`) and /readyz says what they
are waiting for. Only start-up (schema, topics, group join) fails fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from aiohttp import web

from consumer import logs, resync, store
from consumer.dispatch import Dispatcher, ProviderFactory
from consumer.dispatch.replies import RecheckLoop
from consumer.embedded import EmbeddedError, EmbeddedKafka, EmbeddedPostgres
from consumer.intake import Intake, TopicWatch, ensure_topics
from consumer.maintenance import Maintenance
from consumer.metrics import Metrics
from consumer.outages import Outages
from consumer.providers.base import ProviderContext, make_ssl_context
from consumer.secrets import SecretBox
from consumer.settings import Settings, database_tls_warning
from consumer.web import WebState, create_app

log = logs.get("worker")
LEAVE_GROUP_RESERVE_SECONDS = 5.0  # of the shutdown budget, kept to leave the group


@dataclass
class Endpoints:
    bootstrap: str
    dsn: str
    #: the worker started these itself (so it may create the topics on the broker)
    embedded_kafka: bool = False
    embedded_database: bool = False


class NotConfigured(Exception):
    """A server address is missing and embedded servers were not asked for."""


_MISSING = {
    "kafka": (
        "ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS is not set: point it at your Kafka brokers "
        "(host:9092,...), or pass --embedded (ABSENCE_SYNC_EMBEDDED=true) to start a throwaway "
        "in-memory broker for a trial"
    ),
    "postgresql": (
        "ABSENCE_SYNC_DATABASE_URL is not set: point it at your PostgreSQL "
        "(postgresql://user@host:5432/db), or pass --embedded (ABSENCE_SYNC_EMBEDDED=true) to "
        "start an embedded PostgreSQL for a trial"
    ),
}


@contextlib.contextmanager
def embedded_endpoints(settings: Settings) -> Iterator[Endpoints]:
    """The configured Kafka and PostgreSQL; embedded ones for what is missing, but
    only when `settings.embedded` asks for them (a missing address in production
    must be an error, not a throwaway server that looks healthy)."""
    with contextlib.ExitStack() as stack:
        bootstrap = settings.kafka_bootstrap_servers
        embedded_kafka = False
        if not bootstrap:
            if not settings.embedded:
                raise NotConfigured(_MISSING["kafka"])
            if settings.kafka_security_protocol != "PLAINTEXT":
                raise EmbeddedError(
                    "ABSENCE_SYNC_KAFKA_SECURITY_PROTOCOL="
                    f"{settings.kafka_security_protocol} needs a broker: set "
                    "ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS (the embedded broker speaks PLAINTEXT)"
                )
            kafka = stack.enter_context(EmbeddedKafka.start())
            bootstrap, embedded_kafka = kafka.bootstrap_servers, True
            log.info("started embedded Kafka broker (tansu)", bootstrap=bootstrap)
        dsn = settings.database_url
        embedded_database = not dsn
        if not dsn:
            if not settings.embedded:
                raise NotConfigured(_MISSING["postgresql"])
            data_dir = settings.embedded_data_dir / "pg" if settings.embedded_data_dir else None
            pg = stack.enter_context(EmbeddedPostgres.start(data_dir))
            dsn = pg.dsn
            log.info("started embedded PostgreSQL", data_dir=str(pg.data_dir))
        yield Endpoints(bootstrap, dsn, embedded_kafka, embedded_database)


async def run_worker(
    settings: Settings,
    endpoints: Endpoints,
    *,
    stop: asyncio.Event | None = None,
    provider_factory: ProviderFactory | None = None,
    metrics: Metrics | None = None,
    on_started: Callable[[int], None] | None = None,
) -> None:
    stop = stop or asyncio.Event()
    metrics = metrics or Metrics()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if not endpoints.embedded_database and (warning := database_tls_warning(endpoints.dsn)):
        log.warning(warning)
    pool = await store.connect(
        endpoints.dsn,
        # a batch of work takes a few statements, not one connection per item
        max_size=max(10, min(32, settings.dispatch_concurrency // 16)),
        command_timeout=settings.database_command_timeout_seconds,
    )
    watching: asyncio.Task[None] | None = None
    try:
        await store.migrate(pool)
        create = settings.create_topics
        if create if create is not None else endpoints.embedded_kafka:
            await ensure_topics(settings, endpoints.bootstrap, create=True)
        else:
            watching = asyncio.create_task(
                TopicWatch(settings, endpoints.bootstrap).run(stop), name="topics"
            )
        context = ProviderContext(settings, make_ssl_context(settings))
        outages = Outages(metrics)
        dispatcher = Dispatcher(
            settings, pool, metrics, box=SecretBox(settings.secret_keys),
            provider_factory=provider_factory, context=context, outages=outages,
        )
        intake = Intake(
            settings, endpoints.bootstrap, pool, metrics, dispatcher.notify, outages=outages,
            recorded=dispatcher.recent.add_all,
        )
        state = WebState(
            metrics, pool, kafka_ready=lambda: bool(intake.assigned), on_change=dispatcher.notify,
            confirm_consent=_consent_confirmation(settings, context),
            settings=settings, box=dispatcher.box, bootstrap=endpoints.bootstrap,
            kafka_check=intake.kafka_problem, outages=outages,
        )
        async with _serve(create_app(state), settings) as port:
            # pending work is in PostgreSQL: write it while the group join is under way
            tasks = [
                asyncio.create_task(dispatcher.run(stop), name="dispatch"),
                asyncio.create_task(
                    Maintenance(settings, pool, metrics).run(stop), name="maintenance"
                ),
                asyncio.create_task(
                    RecheckLoop(pool, dispatcher.notify).run(stop), name="reply-recheck"
                ),
            ]
            joining = asyncio.create_task(intake.start(), name="intake-start")
            await asyncio.wait([joining, asyncio.create_task(stop.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if not joining.done() or joining.exception() is not None:
                # SIGTERM during the group join, or Kafka unreachable
                joining.cancel()
                stop.set()
                await asyncio.gather(joining, return_exceptions=True)
                await _shutdown(settings, intake, dispatcher, tasks)
                if not joining.cancelled() and joining.exception() is not None:
                    raise joining.exception()  # type: ignore[misc]
                return
            log.info("worker started", http_port=port, topic=settings.topic,
                     group=settings.group_id)
            if on_started is not None:
                on_started(port)
            tasks.append(asyncio.create_task(intake.run(stop), name="intake"))
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
            stop.set()
            log.info("stopping")
            await _shutdown(settings, intake, dispatcher, tasks)
            for task in done:
                if task is not stopped and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
    finally:
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        # resyncs started from the API run here; their marked pairs stay marked
        await resync.cancel_jobs()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), timeout=5)
        log.info("stopped")


def _consent_confirmation(
    settings: Settings, context: ProviderContext
) -> Callable[[str, str], Awaitable[None]] | None:
    if not settings.ms_client_id:
        return None
    from consumer.providers.microsoft365 import confirm_consent

    return functools.partial(confirm_consent, settings, context.ssl_context)


async def _shutdown(
    settings: Settings, intake: Intake, dispatcher: Dispatcher, tasks: list[asyncio.Task[None]]
) -> None:
    """Everything within `shutdown_timeout_seconds`: the Kafka batch and calendar
    calls in flight first, keeping a reserve to commit and leave the group."""
    loop = asyncio.get_running_loop()
    budget = settings.shutdown_timeout_seconds
    deadline = loop.time() + budget
    work_deadline = deadline - min(LEAVE_GROUP_RESERVE_SECONDS, budget / 4)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(work_deadline):
            await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await dispatcher.drain(max(0.0, work_deadline - loop.time()))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(max(deadline, loop.time() + 0.5)):
            await intake.stop()


@contextlib.asynccontextmanager
async def _serve(app: web.Application, settings: Settings) -> AsyncIterator[int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    port = int(sockets[0].getsockname()[1]) if sockets else settings.http_port
    try:
        yield port
    finally:
        await runner.cleanup()
