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

A configuration whose stored secrets this worker cannot decrypt (its
ABSENCE_SYNC_SECRET_KEYS differ from the keys `config apply` used, or are
not set) resolves, for the process's life, to a permanent `auth_failed`
problem whose hint names the configuration and the way out: its items fail
visibly instead of being leased again and again. Keys are read at start, so
once the worker runs with the right keys (or the secrets are applied again),
`absence-sync retry` writes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from consumer import logs, store
from consumer.providers.base import AUTH_FAILED, Provider, ProviderError
from consumer.secrets import SecretBox, SecretsError

log = logs.get("dispatch")

ProviderFactory = Callable[[store.StoredConfig], Provider]


@dataclass(frozen=True, slots=True)
class Resolved:
    """A configuration as leased work sees it: its provider, or why there is none."""

    stored: store.StoredConfig
    provider: Provider | None
    problem: ProviderError | None = None


def unreadable_secrets(config_id: str, keys_set: bool) -> ProviderError:
    """The permanent failure of a configuration whose stored secrets this worker
    cannot decrypt (`keys_set`: it has keys, none of which fits)."""
    reason = ("none of the keys in ABSENCE_SYNC_SECRET_KEYS decrypts them" if keys_set
              else "ABSENCE_SYNC_SECRET_KEYS is not set")
    return ProviderError(
        AUTH_FAILED,
        f"configuration {config_id!r}: the worker cannot decrypt its stored secrets "
        f"({reason})",
        retriable=False,
        hint=(
            f"Configuration {config_id!r}: give the worker the same ABSENCE_SYNC_SECRET_KEYS "
            "as `absence-sync config apply` used, restart it and run "
            f"`absence-sync retry --config {config_id}`; or re-apply the configuration with "
            "`absence-sync config apply -f FILE --replace-secrets` (its failed items are "
            "then retried)."
        ),
    )


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
        try:
            stored = await store.get_config(self.pool, config_id, self.box)
        except SecretsError:
            stored = await store.get_config(self.pool, config_id)  # without its secrets
            if stored is None:
                return None
            resolved = Resolved(stored, None, unreadable_secrets(config_id, self.box.enabled))
        else:
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
