"""End to end: automatic replies through the installed worker (`absence-sync
run`) against the HTTPS Graph double, driven only through the public
contract: a configuration file with `auto_reply:`, CloudEvents on the
broker, the mailbox settings the double holds."""

from __future__ import annotations

from typing import Any

import asyncpg

from tests.conftest import wait_until
from tests.graph_server import GraphServer
from tests.test_microsoft365_e2e import (  # noqa: F401 - fixtures
    CONFIG_ID,
    E2E,
    TENANT_ID,
    absence,
    e2e,
    graph,
)

SYNCS = f"""
syncs:
  - id: {CONFIG_ID}
    tenant: acme
    provider: microsoft365
    microsoft365:
      tenant_id: {TENANT_ID}
    auto_reply:
      internal: >-
        {{first_name}} is away until {{return_date}}.
        For urgent matters, write to hr@acme.example.
      external: "I am out of the office until {{return_date}}."
      audience: known
      date_format: "%d/%m/%Y"
"""


def reply(graph: GraphServer, box: str) -> dict[str, Any]:  # noqa: F811
    return graph.reply_of(box)


def window(graph: GraphServer, box: str) -> tuple[str, str, str]:  # noqa: F811
    held = graph.reply_of(box)
    return (held["status"], held["scheduledStartDateTime"]["dateTime"][:16],
            held["scheduledEndDateTime"]["dateTime"][:16])


async def test_replies_follow_approvals_moves_and_cancellations(e2e: E2E) -> None:  # noqa: F811
    await e2e.apply(SYNCS)
    jane, john = e2e.mailbox("jane"), e2e.mailbox("john")
    jane_doc = absence("r-jane", 1, jane, start=("2027-03-01", "am"), end=("2027-03-05", "pm"))
    jane_doc["data"]["employee"]["display_name"] = "Jane Doe"
    pending = absence("r-pending", 1, john, status="pending", start=("2027-03-01", "am"),
                      end=("2027-03-01", "pm"))
    john_doc = absence("r-john", 1, john, start=("2027-04-06", "am"), end=("2027-04-06", "am"))
    await e2e.publish([jane_doc, pending, john_doc])
    worker = e2e.start()
    await settled(e2e, 6)  # three absences, two targets each (calendar, reply)
    graph = e2e.graph  # noqa: F811
    assert window(graph, jane) == ("scheduled", "2027-02-28T23:00", "2027-03-05T23:00")
    held = reply(graph, jane)
    assert "Jane is away until 08/03/2027." in held["internalReplyMessage"]
    assert "out of the office until 08/03/2027." in held["externalReplyMessage"]
    assert held["externalAudience"] == "contactsOnly"
    # John's approved half day (a Tuesday morning): back the same afternoon
    assert window(graph, john) == ("scheduled", "2027-04-06T07:00", "2027-04-06T10:30")
    assert "until 06/04/2027." in reply(graph, john)["internalReplyMessage"]

    # Jane's absence moves twice: her reply follows
    for version, start, end, expected in (
        (2, ("2027-03-08", "am"), ("2027-03-09", "pm"), "2027-03-07T23:00"),
        (3, ("2027-03-15", "pm"), ("2027-03-16", "pm"), "2027-03-15T12:30"),
    ):
        doc = absence("r-jane", version, jane, start=start, end=end)
        doc["data"]["employee"]["display_name"] = "Jane Doe"
        await e2e.publish([doc])
        await wait_until(lambda expected=expected: _starts(graph, jane, expected), timeout=20)
    await settled(e2e, 6)

    # John writes his own reply; then his absence moves and is cancelled: untouched
    graph.set_user_reply(john, {"status": "alwaysEnabled",
                                "internalReplyMessage": "Parental leave, ask Ann."})
    own = reply(graph, john)
    await e2e.publish([absence("r-john", 2, john, start=("2027-04-13", "am"),
                               end=("2027-04-13", "pm"))])
    await wait_until(lambda: _state(e2e, "r-john", "skipped_user_reply"), timeout=20)
    assert reply(graph, john) == own
    await e2e.publish([absence("r-john", 3, john, status="cancelled",
                               start=("2027-04-13", "am"), end=("2027-04-13", "pm"))])
    await settled(e2e, 6)
    assert reply(graph, john) == own

    # Jane's absence is cancelled: her reply, still ours, is switched off
    await e2e.publish([absence("r-jane", 4, jane, status="cancelled",
                               start=("2027-03-15", "pm"), end=("2027-03-16", "pm"))])
    await wait_until(lambda: _disabled(graph, jane), timeout=20)
    await settled(e2e, 6)
    await worker.terminate(e2e.shutdown_budget)


async def rows(e2e: E2E) -> list[asyncpg.Record]:  # noqa: F811
    conn = await asyncpg.connect(e2e.dsn)
    try:
        return list(await conn.fetch("SELECT * FROM sync_items"))
    finally:
        await conn.close()


async def settled(e2e: E2E, count: int) -> None:  # noqa: F811
    """`count` items (every target), none pending nor leased."""
    async def done() -> bool:
        found = await rows(e2e)
        return len(found) == count and all(
            r["change_seq"] <= r["done_seq"] and r["lease_until"] is None for r in found)

    try:
        await wait_until(done, timeout=30)
    except AssertionError:
        states = [(r["absence_id"], r["target"], r["status"]) for r in await rows(e2e)]
        logs = "\n".join(w.output()[-3000:] for w in e2e.workers)
        raise AssertionError(f"not settled: {states}\n{logs}") from None


async def _starts(graph: GraphServer, box: str, expected: str) -> bool:  # noqa: F811
    return window(graph, box)[1] == expected


async def _disabled(graph: GraphServer, box: str) -> bool:  # noqa: F811
    return bool(graph.reply_of(box)["status"] == "disabled")


async def _state(e2e: E2E, absence_id: str, state: str) -> bool:  # noqa: F811
    return any(
        r["absence_id"] == absence_id and r["target"] == "reply" and r["status"] == state
        for r in await rows(e2e)
    )


async def test_a_worker_killed_between_the_write_and_its_record(e2e: E2E) -> None:  # noqa: F811
    """SIGKILL after Graph took the reply, before the worker read it back and
    recorded it: the next worker recognises the reply as its own (it does not
    report the employee's reply), and a cancellation still switches it off."""
    await e2e.apply(SYNCS)
    graph = e2e.graph  # noqa: F811
    ann = e2e.mailbox("ann")
    graph.hold_readback.add(ann.lower())
    await e2e.publish([absence("k-ann", 1, ann, start=("2027-05-03", "am"),
                               end=("2027-05-04", "pm"))])
    env = {"ABSENCE_SYNC_REQUEST_TIMEOUT_SECONDS": "2", "ABSENCE_SYNC_LEASE_SECONDS": "5"}
    first = e2e.start(**env)

    async def written() -> bool:
        return any(r.method == "PATCH" and "mailboxSettings" in r.path
                   for r in graph.graph_requests(ann))

    try:
        await wait_until(written, timeout=30)
    except AssertionError:
        raise AssertionError(first.output()) from None
    await first.kill()
    graph.release_readback()
    assert graph.reply_of(ann)["status"] == "scheduled"

    second = e2e.start(**env)
    await settled(e2e, 2)
    states = {r["target"]: r["status"] for r in await rows(e2e)}
    assert states == {"calendar": "synced", "reply": "synced"}
    await e2e.publish([absence("k-ann", 2, ann, status="cancelled",
                               start=("2027-05-03", "am"), end=("2027-05-04", "pm"))])
    await wait_until(lambda: _disabled(graph, ann), timeout=20)
    await settled(e2e, 2)
    await second.terminate(e2e.shutdown_budget)
