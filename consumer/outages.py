"""Outages the worker is waiting out, for /readyz and the metrics.

A component (intake, dispatch) that meets a PostgreSQL or Kafka error it
cannot get past reports it here, backs off (`Backoff`) and tries again; once
an attempt succeeds it reports the recovery. Readiness then names what is
being waited for, in fixed words: never an exception's text, which may hold
a DSN, a host name or a value from an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import traceback
from dataclasses import dataclass, field

from consumer.metrics import DEPENDENCIES, Metrics

INTERNAL = "internal"  # not a dependency: a bug in our own code, retried all the same
KAFKA_UNREACHABLE = "kafka: brokers unreachable"  # a readiness problem


@dataclass
class Outages:
    metrics: Metrics
    _since: dict[tuple[str, str], float] = field(default_factory=dict)
    _probed_down: set[str] = field(default_factory=set)

    def failing(self, component: str, dependency: str) -> None:
        """`component` could not get past an error of `dependency` (or INTERNAL) and
        will retry. Each call counts one error."""
        self._since.setdefault((component, dependency), time.monotonic())
        if dependency in DEPENDENCIES:
            self.metrics.dependency_errors.labels(dependency).inc()
        self._publish()

    def recovered(self, component: str, dependency: str | None = None) -> None:
        """What `component` waited for (one dependency, or all) works again."""
        for key in [k for k in self._since if k[0] == component]:
            if dependency is None or key[1] == dependency:
                del self._since[key]
        self._publish()

    def probed(self, dependency: str, reachable: bool) -> None:
        """What a readiness check found: the gauge also drops while nothing is
        being retried (an idle consumer does not notice a broker outage)."""
        if reachable:
            self._probed_down.discard(dependency)
        else:
            self._probed_down.add(dependency)
        self._publish()

    def problems(self) -> list[str]:
        """One fixed sentence per outage being waited out, oldest first."""
        now = time.monotonic()
        return [
            f"{component}: "
            + ("internal error" if dependency == INTERNAL else f"{dependency} unavailable")
            + f", retrying for {now - since:.0f} s"
            for (component, dependency), since in sorted(self._since.items(), key=lambda i: i[1])
        ]

    def _publish(self) -> None:
        down = {dependency for _, dependency in self._since} | self._probed_down
        for dependency in DEPENDENCIES:
            self.metrics.dependency_up.labels(dependency).set(0 if dependency in down else 1)


@dataclass
class Backoff:
    """Capped exponential back-off with jitter for waiting out outages."""

    cap: float
    base: float = 0.2
    attempts: int = 0

    def next_delay(self) -> float:
        delay: float = min(self.cap, self.base * 2.0 ** min(self.attempts, 30))
        self.attempts += 1
        jittered: float = delay * random.uniform(0.5, 1.0)
        return jittered

    def reset(self) -> None:
        self.attempts = 0

    async def wait(self, stop: asyncio.Event | None = None) -> None:
        """Sleep the next delay; returns early when `stop` is set."""
        delay = self.next_delay()
        if stop is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()


def traceback_of(exc: BaseException) -> str:
    """Where an unexpected exception came from: its frames and class, without its
    message (which may quote an event's or a calendar server's data)."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        name += f" (from {type(cause).__module__}.{type(cause).__qualname__})"
    return frames + name
