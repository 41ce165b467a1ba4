"""Coalescing of small database writes made by many concurrent tasks.

Each caller awaits its own row; rows submitted while a flush is running go
out together in the next one, so under load one statement records many
items, and when idle a row is written at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

R = TypeVar("R")


class Coalescer(Generic[R]):
    def __init__(self, flush: Callable[[Sequence[R]], Awaitable[None]], max_rows: int = 500):
        self._flush = flush
        self._max_rows = max_rows
        self._pending: list[tuple[R, asyncio.Future[None]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, row: R) -> None:
        """Returns once `row` is written; raises what the flush raised."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        # the write goes on even if this caller is cancelled: it reflects real work
        await asyncio.shield(future)

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = (
                self._pending[: self._max_rows], self._pending[self._max_rows :]
            )
            try:
                await self._flush([row for row, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
