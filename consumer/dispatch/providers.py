"""The providers the dispatcher writes through, one per configuration, cached by
configuration revision.

A configuration's provider is built on first use and rebuilt when the
revision an item was leased under differs from the cached one (a changed
configuration, new credentials). A configuration whose provider cannot be
built (say a provider this version does not have) caches that
`ProviderError` for its revision, so its items fail with it without a
rebuild per batch. What a provider reports about its configuration
(`Provider.warnings`, e.g. a server out of support) is stored on the
configuration when it changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from consumer import logs, store
from consumer.providers.base import Provider, ProviderError
from consumer.secrets import SecretBox

log = logs.get("dispatch")

ProviderFactory = Callable[[store.StoredConfig], Provider]


@dataclass(frozen=True, slots=True)
class Resolved:
    """A configuration as leased work sees it: its provider, or why there is none."""

    stored: store.StoredConfig
    provider: Provider | None
    problem: ProviderError | None = None


class ProviderCache:
    def __init__(self, pool: asyncpg.Pool, box: SecretBox, factory: ProviderFactory) -> None:
        self.pool = pool
        self.box = box
        self.factory = factory
        self._entries: dict[str, Resolved] = {}
        self._warnings: dict[str, tuple[str, ...]] = {}

    async def get(self, config_id: str, revision: int) -> Resolved | None:
        """The configuration at `revision` (or newer) and its provider; None when the
        configuration no longer exists (its items went with it)."""
        cached = self._entries.get(config_id)
        if cached is not None and cached.stored.revision >= revision:
            return cached
        stored = await store.get_config(self.pool, config_id, self.box)
        if stored is None:
            return None
        try:
            resolved = Resolved(stored, self.factory(stored))
        except ProviderError as exc:
            resolved = Resolved(stored, None, exc)
        if cached is not None and cached.provider is not None:
            with contextlib.suppress(Exception):
                await cached.provider.close()
        self._entries[config_id] = resolved
        self._warnings.setdefault(config_id, stored.warnings)
        return resolved

    async def report_warnings(self, config_id: str, provider: Provider) -> None:
        """Store what `provider` reports about its configuration, when it changed."""
        warnings = tuple(provider.warnings)
        if self._warnings.get(config_id) == warnings:
            return
        self._warnings[config_id] = warnings
        try:
            await store.set_config_warnings(self.pool, config_id, warnings)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._warnings.pop(config_id, None)  # tried again after the next batch
            log.warning("cannot store configuration warnings", config=config_id,
                        error_type=type(exc).__name__)

    async def close(self) -> None:
        for entry in self._entries.values():
            if entry.provider is not None:
                with contextlib.suppress(Exception):
                    await entry.provider.close()
        self._entries.clear()
