"""`absence-sync demo` / `dev`: the whole product on one machine.

Starts the embedded broker, PostgreSQL and a Radicale CalDAV server, applies
a demo configuration, publishes sample absences (pending then approved, half
days, several days, remote work, a cancellation, an invalid event), runs the
real worker until everything is synced, then prints each employee's
calendar as read back from Radicale, not from our database.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import click
from aiokafka import AIOKafkaProducer
from cryptography.fernet import Fernet

from consumer import caldav_tools, logs, store
from consumer.config import SyncConfig
from consumer.embedded import EmbeddedKafka, EmbeddedPostgres, free_port
from consumer.intake import ensure_topics
from consumer.kafka import client_args
from consumer.metrics import Metrics
from consumer.providers.base import ProviderContext, make_ssl_context
from consumer.providers.caldav import CalDAVProvider
from consumer.radicale_server import RadicaleServer
from consumer.secrets import SecretBox
from consumer.settings import Settings
from consumer.worker import Endpoints, run_worker

TENANT = "acme"
CONFIG_ID = "acme-caldav"
USER = "absence-sync"
EMPLOYEES = {
    "jane.doe@acme.example": ("emp-1", "Jane Doe", "Europe/Paris"),
    "john.smith@acme.example": ("emp-2", "John Smith", "Europe/London"),
    "ana.garcia@acme.example": ("emp-3", "Ana Garcia", None),
}


def _event(absence_id: str, version: int, email: str, status: str, account: dict[str, Any],
           start: tuple[dt.date, str], end: tuple[dt.date, str]) -> dict[str, Any]:
    emp_id, name, zone = EMPLOYEES[email]
    employee: dict[str, Any] = {
        "id": emp_id, "email": email, "establishment_id": "paris", "display_name": name,
    }
    if zone:
        employee["time_zone"] = zone
    return {
        "specversion": "1.0", "id": str(uuid.uuid4()), "source": "https://hr.acme.example",
        "type": "absence.upserted", "time": dt.datetime.now(dt.UTC).isoformat(),
        "tenant": TENANT, "datacontenttype": "application/json",
        "data": {
            "id": absence_id, "version": version, "status": status, "employee": employee,
            "account": account,
            "start": {"date": start[0].isoformat(), "half": start[1]},
            "end": {"date": end[0].isoformat(), "half": end[1]},
        },
    }


PAID = {"id": "paid-leave", "name": "Paid leave", "counted_as_absence": True,
        "public_reason": False}
REMOTE = {"id": "remote", "name": "Remote work", "counted_as_absence": False,
          "public_reason": True}
TRAINING = {"id": "training", "name": "Training", "counted_as_absence": True,
            "public_reason": True}


def sample_events(today: dt.date) -> list[bytes]:
    """The story the demo tells, in publishing order."""
    monday = today + dt.timedelta(days=7 - today.weekday())
    d = [monday + dt.timedelta(days=i) for i in range(14)]
    jane, john, ana = list(EMPLOYEES)
    docs: list[dict[str, Any] | bytes] = [
        # Jane asks for three days off, her manager approves
        _event("abs-100", 1, jane, "pending", PAID, (d[0], "am"), (d[2], "pm")),
        _event("abs-100", 2, jane, "approved", PAID, (d[0], "am"), (d[2], "pm")),
        # Jane: a half day (afternoon) of training, label public
        _event("abs-101", 1, jane, "approved", TRAINING, (d[4], "pm"), (d[4], "pm")),
        # John: remote work on one day (shown free / working elsewhere)
        _event("abs-200", 1, john, "approved", REMOTE, (d[1], "am"), (d[1], "pm")),
        # John: a pending request, still waiting
        _event("abs-201", 1, john, "pending", PAID, (d[7], "am"), (d[8], "am")),
        # Ana: a day off, then cancelled: nothing must remain
        _event("abs-300", 1, ana, "approved", PAID, (d[3], "am"), (d[3], "pm")),
        _event("abs-300", 2, ana, "cancelled", PAID, (d[3], "am"), (d[3], "pm")),
        # Ana: a week of leave
        _event("abs-301", 1, ana, "approved", PAID, (d[7], "am"), (d[11], "pm")),
        # an invalid event: it ends before it starts (goes to the dead-letter topic)
        _event("abs-999", 1, ana, "approved", PAID, (d[5], "pm"), (d[5], "am")),
    ]
    return [doc if isinstance(doc, bytes) else json.dumps(doc).encode() for doc in docs]


def run_demo(*, keep_running: bool) -> int:
    logs.configure("ERROR", "console")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="absence-sync-demo-")))
        click.echo("Starting the embedded Kafka broker (tansu), PostgreSQL and Radicale...")
        kafka = stack.enter_context(EmbeddedKafka.start())
        pg = stack.enter_context(EmbeddedPostgres.start(tmp / "pg"))
        password = secrets.token_urlsafe(12)
        radicale = stack.enter_context(
            RadicaleServer.start(tmp / "radicale", port=free_port(), users={USER: password})
        )
        settings = Settings(
            kafka_bootstrap_servers=kafka.bootstrap_servers,
            kafka_security_protocol="PLAINTEXT",  # the embedded broker, whatever the environment
            database_url=pg.dsn,
            secret_keys=Fernet.generate_key().decode(),
            http_port=0,
            http_host="127.0.0.1",
            dispatch_poll_seconds=0.1,
            group_id="absence-sync-demo",
        )
        return asyncio.run(_demo(settings, radicale, password, keep_running))
    return 0  # pragma: no cover - the with block returns


def _config(radicale_url: str) -> SyncConfig:
    return SyncConfig(
        id=CONFIG_ID, tenant=TENANT, provider="caldav", time_zone="Europe/Paris",
        provider_settings={"url": radicale_url.rstrip("/") + "/{email}/calendar/",
                           "username": USER},
        secrets={"password": ""},
    )


async def _demo(settings: Settings, radicale: RadicaleServer, password: str, keep: bool) -> int:
    config = _config(radicale.url)
    config = config.model_copy(update={"secrets": {"password": password}})
    assert settings.database_url and settings.kafka_bootstrap_servers
    pool = await store.connect(settings.database_url)
    try:
        await store.migrate(pool)
        await store.apply_configs(pool, [config], SecretBox(settings.secret_keys))
    finally:
        await pool.close()
    context = ProviderContext(settings, make_ssl_context(settings))
    caldav = CalDAVProvider.from_config(config, context)
    assert isinstance(caldav, CalDAVProvider)
    try:
        for email in EMPLOYEES:
            await caldav_tools.ensure_calendar(caldav, email)
        await ensure_topics(settings, settings.kafka_bootstrap_servers)
        events = sample_events(dt.datetime.now(dt.UTC).date())
        producer = AIOKafkaProducer(**client_args(settings, settings.kafka_bootstrap_servers))
        await producer.start()
        try:
            for value in events:
                key = json.loads(value)["data"]["id"].encode()
                await producer.send_and_wait(settings.topic, value=value, key=key)
        finally:
            await producer.stop()
        click.echo(f"Published {len(events)} events to topic '{settings.topic}'"
                   " (one of them invalid). Running the worker...")
        stop = asyncio.Event()
        metrics = Metrics()
        ports: list[int] = []
        worker = asyncio.create_task(run_worker(
            settings, Endpoints(settings.kafka_bootstrap_servers, settings.database_url,
                                embedded_kafka=True, embedded_database=True),
            stop=stop, metrics=metrics, on_started=ports.append,
        ))
        try:
            await _wait_synced(settings.database_url, expected=len(events) - 1, metrics=metrics,
                               worker=worker)
            click.echo("")
            click.echo(f"Consumed: {_count(metrics, 'applied')} applied,"
                       f" {_count(metrics, 'stale')} stale,"
                       f" {_count(metrics, 'invalid')} invalid (dead-lettered to"
                       f" '{settings.dlq_topic}').")
            click.echo("Calendars as read back from the CalDAV server:\n")
            for email in EMPLOYEES:
                _print_calendar(email, await caldav_tools.list_events(caldav, email))
            if keep:
                port = ports[0] if ports else settings.http_port
                click.echo("The stack keeps running (Ctrl-C stops it):")
                click.echo(f"  CalDAV (Radicale): {radicale.url}")
                click.echo(f"                     user {USER}, password {password}")
                click.echo(f"  Kafka bootstrap:   {settings.kafka_bootstrap_servers}"
                           f"  topic {settings.topic}")
                click.echo(f"  PostgreSQL:        {settings.database_url}")
                click.echo(f"  Worker:            http://127.0.0.1:{port}/metrics, /readyz")
                await _forever(worker)
            else:
                click.echo(f"Browse them yourself: run '{dev_command()}', which keeps this"
                           " stack running and prints the Radicale address and login.")
        finally:
            stop.set()
            await asyncio.wait_for(worker, 60)
    finally:
        await caldav.close()
    return 0


def dev_command() -> str:
    """`absence-sync dev` as it can be run from any directory: the bare name when
    it is this very program on the PATH, else the full path of this program (a
    virtual environment's script is usually not on the PATH)."""
    me = Path(sys.argv[0]).resolve()
    found = shutil.which("absence-sync")
    if found is not None and Path(found).resolve() == me:
        return "absence-sync dev"
    if me.name == "absence-sync" and os.access(me, os.X_OK):
        return f"{shlex.quote(str(me))} dev"
    return f"{shlex.quote(sys.executable)} -m consumer dev"


async def _forever(worker: asyncio.Task[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await worker


def _count(metrics: Metrics, outcome: str) -> int:
    return int(metrics.events.labels(outcome)._value.get())


async def _wait_synced(dsn: str, *, expected: int, metrics: Metrics,
                       worker: asyncio.Task[None]) -> None:
    pool = await store.connect(dsn)
    try:
        async with asyncio.timeout(120):
            while True:
                if worker.done():
                    worker.result()
                    raise RuntimeError("the worker stopped early")
                consumed = sum(_count(metrics, o) for o in ("applied", "stale", "invalid"))
                if consumed >= expected + 1:
                    row = await pool.fetchrow(
                        "SELECT count(*) FILTER (WHERE change_seq > done_seq) AS pending,"
                        " count(*) FILTER (WHERE status = 'failed') AS failed FROM sync_items"
                    )
                    assert row is not None
                    if row["pending"] == 0:
                        if row["failed"]:
                            click.echo(f"warning: {row['failed']} item(s) failed", err=True)
                        return
                await asyncio.sleep(0.1)
    finally:
        await pool.close()


def _print_calendar(email: str, events: list[Any]) -> None:
    name = EMPLOYEES[email][1]
    click.echo(f"{name} <{email}>")
    if not events:
        click.echo("    (no events)")
    for ev in sorted(events, key=lambda e: str(e["dtstart"])):
        start, end = ev["dtstart"], ev["dtend"]
        if ev["all_day"]:
            last = end - dt.timedelta(days=1)
            when = f"{start:%a %d %b}" + (f" - {last:%a %d %b}" if last != start else "")
            when += " (all day)"
        else:
            when = f"{start:%a %d %b %H:%M} - {end:%H:%M}" if start.date() == end.date() else (
                f"{start:%a %d %b %H:%M} - {end:%a %d %b %H:%M}")
            if ev.get("time_zone"):
                when += f" {ev['time_zone']}"
        click.echo(f"    {when:<46} {ev['summary']!s:<14} {ev['transp']}/{ev['status']}")
    click.echo("")
