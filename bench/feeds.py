"""iCalendar feeds at scale, and what their indexes cost the intake.

    python -m bench.feeds [--employees 4000] [--per-employee 10] [--skip-intake]

Starts the embedded PostgreSQL, fills one tenant with EMPLOYEES x
PER_EMPLOYEE absences inside the feed window, and fetches over HTTP (the
worker's own app): a personal feed (first, again, and with If-None-Match),
then the team feed of the whole tenant (first render, memoised render, 304).
Then it records the same number of absences through `store.record_absences`
(batches of 500, new then updated versions) into a database with and without
the feed index of migration 0010, to show what it costs the intake.
Prints one JSON object. A benchmark, not a test: figures vary with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import time
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from aiohttp.test_utils import TestClient, TestServer

from consumer import feeds, logs, store
from consumer.admin import Admin
from consumer.config import SyncConfig
from consumer.embedded import EmbeddedPostgres
from consumer.events import absence_from_data
from consumer.metrics import Metrics
from consumer.secrets import SecretBox
from consumer.web import WebState, create_app

_FILL = """
INSERT INTO absences (tenant, id, version, deleted, data, end_date, establishment_id)
SELECT 'acme', 'a-' || e || '-' || n, 1, false, jsonb_build_object(
    'id', 'a-' || e || '-' || n, 'version', 1, 'status', 'approved',
    'employee', jsonb_build_object('id', 'e' || e, 'email', 'user' || e || '@acme.test',
        'establishment_id', 'est-' || e % 40, 'time_zone', 'Europe/Paris',
        'display_name', 'User ' || e),
    'account', jsonb_build_object('id', 'paid', 'name', 'Paid leave',
        'counted_as_absence', true, 'public_reason', false),
    'start', jsonb_build_object('date', ($1::date + n * 30)::text,
                                'half', CASE WHEN n % 3 = 0 THEN 'pm' ELSE 'am' END),
    'end', jsonb_build_object('date', ($1::date + n * 30 + 2)::text, 'half', 'pm')),
    $1::date + n * 30 + 2, 'est-' || e % 40
FROM generate_series(1, $2) AS e, generate_series(0, $3 - 1) AS n
"""


async def _database(admin_dsn: str, name: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    head, _, query = admin_dsn.partition("?")
    root = head.rsplit("/", 1)[0]
    return f"{root}/{name}?{query}" if query else f"{root}/{name}"


async def _timed(client: TestClient[Any, Any], path: str,
                 etag: str | None = None) -> tuple[float, int, str, int]:
    started = time.perf_counter()
    response = await client.get(path, headers={"If-None-Match": etag} if etag else {})
    body = await response.read()
    return time.perf_counter() - started, response.status, response.headers.get("ETag", ""), \
        len(body)


async def feeds_at_scale(dsn: str, employees: int, per_employee: int) -> dict[str, Any]:
    pool = await store.connect(dsn, max_size=10)
    try:
        await store.migrate(pool)
        await store.apply_configs(pool, [SyncConfig(id="acme-feed", tenant="acme",
                                                    provider="ics")], SecretBox(None))
        today = dt.datetime.now(dt.UTC).date()
        started = time.perf_counter()
        await pool.execute(_FILL, today - dt.timedelta(days=60), employees, per_employee)
        await pool.execute("ANALYZE absences")
        filled = time.perf_counter() - started
        admin = Admin(pool)
        personal = await admin.create_feed("acme", "acme-feed",
                                           {"employee": "user1234@acme.test"}, "http://x")
        team = await admin.create_feed("acme", "acme-feed", None, "http://x")
        out: dict[str, Any] = {"absences": employees * per_employee,
                               "fill_seconds": round(filled, 2)}
        async with TestClient(TestServer(create_app(WebState(Metrics(), pool)))) as client:
            for label, created in (("personal", personal), ("team", team)):
                path = urlsplit(created.url).path
                first = await _timed(client, path)
                again = await _timed(client, path)
                not_modified = await _timed(client, path, first[2])
                assert (first[1], again[1], not_modified[1]) == (200, 200, 304)
                out[label] = {
                    "bytes": first[3], "first_s": round(first[0], 3),
                    "memoised_s": round(again[0], 3), "not_modified_s": round(not_modified[0], 3),
                }
        out["memo_entries"] = len(feeds.EVENTS)
        return out
    finally:
        await pool.close()


async def intake_cost(admin_dsn: str, count: int) -> dict[str, Any]:
    """record_absences of `count` new absences then `count` newer versions, with and
    without the feed index, in batches of 500; median of 3 runs each."""
    today = dt.datetime.now(dt.UTC).date()

    def batch(version: int, start: int) -> list[store.Incoming]:
        rows = []
        for n in range(start, min(start + 500, count)):
            data = {
                "id": f"i-{n}", "version": version, "status": "approved",
                "employee": {"id": f"e{n % 997}", "email": f"user{n % 997}@acme.test",
                             "establishment_id": "paris", "time_zone": "Europe/Paris"},
                "account": {"id": "paid", "name": "Paid leave", "counted_as_absence": True,
                            "public_reason": False},
                "start": {"date": (today + dt.timedelta(days=n % 300)).isoformat(), "half": "am"},
                "end": {"date": (today + dt.timedelta(days=n % 300 + version)).isoformat(),
                        "half": "pm"},
            }
            rows.append(store.Incoming(absence_from_data("acme", False, data), data, None))
        return rows

    results: dict[str, list[float]] = {"with_feed_index": [], "without_feed_index": []}
    for run in range(3):
        for variant in results:
            dsn = await _database(admin_dsn, f"feeds_intake_{run}_{variant[:4]}")
            pool = await store.connect(dsn, max_size=2)
            try:
                await store.migrate(pool)
                if variant == "without_feed_index":
                    await pool.execute("DROP INDEX absences_employee_email")
                await store.apply_configs(pool, [SyncConfig(id="c", tenant="acme",
                                                            provider="ics")], SecretBox(None))
                batches = [batch(v, s) for v in (1, 2) for s in range(0, count, 500)]
                started = time.perf_counter()
                for rows in batches:
                    async with pool.acquire() as conn, conn.transaction():
                        await store.record_absences(conn, rows)
                results[variant].append(time.perf_counter() - started)
            finally:
                await pool.close()
    medians = {k: statistics.median(v) for k, v in results.items()}
    return {
        "records": 2 * count,
        **{f"{k}_s": round(v, 3) for k, v in medians.items()},
        "slowdown": round(medians["with_feed_index"] / medians["without_feed_index"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--employees", type=int, default=4000)
    parser.add_argument("--per-employee", type=int, default=10)
    parser.add_argument("--skip-intake", action="store_true")
    args = parser.parse_args()
    logs.configure("WARNING", "console")
    with EmbeddedPostgres.start() as pg:
        async def go() -> dict[str, Any]:
            dsn = await _database(pg.dsn, "feeds_bench")
            out = {"feeds": await feeds_at_scale(dsn, args.employees, args.per_employee)}
            if not args.skip_intake:
                out["intake"] = await intake_cost(pg.dsn, args.employees * args.per_employee // 2)
            out["load_average"] = os.getloadavg()
            return out

        print(json.dumps(asyncio.run(go()), indent=2))


if __name__ == "__main__":
    main()
