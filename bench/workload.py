"""The benchmark's workload: tenants, mailboxes, absences and sync configurations.

Deterministic for a given seed, so two runs publish the same mix. Every
absence is distinct (version 1) unless a caller asks for more versions.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from dataclasses import dataclass
from typing import Any

from consumer.config import SyncConfig

TENANTS = 12
ESTABLISHMENTS = ("paris", "lyon", "berlin", "remote")
ZONES = ("Europe/Paris", "Europe/Berlin", "Europe/London", "America/New_York", None)
ACCOUNTS = (
    # id, name, counted, public, weight
    ("paid-leave", "Paid leave", True, False, 70),
    ("sick-leave", "Sick leave", True, False, 10),
    ("rtt", "RTT", True, True, 10),
    ("remote", "Remote work", False, False, 10),
)
STATUSES = (("approved", 80), ("pending", 12), ("denied", 4), ("cancelled", 4))
WANTED = frozenset({"approved", "pending"})  # every bench configuration syncs pending


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def tenant_ids(count: int = TENANTS) -> list[str]:
    return [f"tenant-{i:02d}" for i in range(count)]


def configs(tenants: list[str]) -> list[SyncConfig]:
    """One sync configuration per tenant, with a spread of rendering options."""
    out = []
    for i, tenant in enumerate(tenants):
        out.append(
            SyncConfig(
                id=f"{tenant}-cal",
                tenant=tenant,
                provider="caldav",  # the provider factory hands out bench doubles instead
                hide_labels=i % 3 != 0,
                whole_days_as_timed=i % 4 == 1,
                time_zone="Europe/Paris" if i % 2 else "UTC",
                busy_as="oof" if i % 5 == 2 else "busy",
                category="Absence" if i % 3 == 1 else None,
                provider_settings={"url": "https://dav.example.com/{email}/calendar/"},
            )
        )
    return out


@dataclass(frozen=True)
class Mailbox:
    tenant: str
    email: str
    calendar_address: str | None
    establishment: str
    time_zone: str | None


def mailboxes(tenants: list[str], count: int, rng: random.Random) -> list[Mailbox]:
    """`count` employees spread over tenants with a long tail (a few big customers)."""
    weights = [1 / (i + 1) for i in range(len(tenants))]
    out = []
    for j in range(count):
        tenant = tenants[j % len(tenants)] if j < len(tenants) else rng.choices(
            tenants, weights
        )[0]
        email = f"emp{j:06d}@{tenant}.example.com"
        out.append(
            Mailbox(
                tenant=tenant,
                email=email,
                calendar_address=f"emp{j:06d}@{tenant}.onmicrosoft.com"
                if rng.random() < 0.1
                else None,
                establishment=rng.choice(ESTABLISHMENTS),
                time_zone=rng.choice(ZONES),
            )
        )
    return out


def _span(rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
    start = dt.date(2026, 1, 1) + dt.timedelta(days=rng.randrange(730))
    kind = rng.random()
    if kind < 0.6:  # whole days over several dates
        end = start + dt.timedelta(days=rng.randint(1, 10))
        return (start.isoformat(), "am"), (end.isoformat(), "pm")
    if kind < 0.8:  # a single whole day
        return (start.isoformat(), "am"), (start.isoformat(), "pm")
    half = rng.choice(("am", "pm"))  # a half day, or from an afternoon to a morning
    if rng.random() < 0.5:
        return (start.isoformat(), half), (start.isoformat(), half)
    end = start + dt.timedelta(days=rng.randint(1, 4))
    return (start.isoformat(), "pm"), (end.isoformat(), "am")


def event(
    absence_id: str,
    mailbox: Mailbox,
    rng: random.Random,
    *,
    version: int = 1,
    time: str | None = None,
    status: str | None = None,
) -> dict[str, Any]:
    account = rng.choices(ACCOUNTS, [a[4] for a in ACCOUNTS])[0]
    start, end = _span(rng)
    employee: dict[str, Any] = {
        "id": "emp-" + mailbox.email.split("@")[0],
        "email": mailbox.email,
        "establishment_id": mailbox.establishment,
        "display_name": mailbox.email.split("@")[0].title(),
    }
    if mailbox.calendar_address:
        employee["calendar_address"] = mailbox.calendar_address
    if mailbox.time_zone:
        employee["time_zone"] = mailbox.time_zone
    return {
        "specversion": "1.0",
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "source": "https://hr.example.com",
        "type": "absence.upserted",
        "time": time or now_rfc3339(),
        "tenant": mailbox.tenant,
        "datacontenttype": "application/json",
        "data": {
            "id": absence_id,
            "version": version,
            "status": status or rng.choices([s for s, _ in STATUSES], [w for _, w in STATUSES])[0],
            "employee": employee,
            "account": {
                "id": account[0], "name": account[1],
                "counted_as_absence": account[2], "public_reason": account[3],
            },
            "start": {"date": start[0], "half": start[1]},
            "end": {"date": end[0], "half": end[1]},
        },
    }


@dataclass
class Workload:
    """Encoded Kafka records (key, value) and what the calendar should end up with."""

    records: list[tuple[bytes, bytes]]
    tenants: list[str]
    wanted: int  # absences that must end up in a calendar (approved or pending)

    @property
    def size(self) -> int:
        return len(self.records)


def build(
    events: int,
    *,
    seed: int = 7,
    employees: int | None = None,
    tenants: int = TENANTS,
    prefix: str = "abs",
) -> Workload:
    """`events` distinct absences (version 1) over a realistic mix of tenants and mailboxes."""
    rng = random.Random(seed)
    tids = tenant_ids(tenants)
    boxes = mailboxes(tids, employees or max(tenants * 2, events // 4), rng)
    records = []
    wanted = 0
    stamp = now_rfc3339()
    for i in range(events):
        box = rng.choice(boxes)
        doc = event(f"{prefix}-{i:07d}", box, rng, time=stamp)
        wanted += doc["data"]["status"] in WANTED
        records.append((doc["data"]["id"].encode(), json.dumps(doc).encode()))
    return Workload(records, tids, wanted)


def build_for_mailboxes(events: int, mailbox_count: int, *, seed: int = 11) -> Workload:
    """`events` approved absences spread evenly (round robin) over `mailbox_count`
    mailboxes of one tenant: every one of them is a calendar write."""
    rng = random.Random(seed)
    tids = tenant_ids(1)
    boxes = [
        Mailbox(tids[0], f"box{j:03d}@{tids[0]}.example.com", None, "paris", "Europe/Paris")
        for j in range(mailbox_count)
    ]
    stamp = now_rfc3339()
    records = []
    for i in range(events):
        doc = event(f"lim-{i:07d}", boxes[i % mailbox_count], rng, time=stamp, status="approved")
        records.append((doc["data"]["id"].encode(), json.dumps(doc).encode()))
    return Workload(records, tids, events)
