"""`config test`: reach a configuration's calendar service without writing.

The probe builds the configuration's provider exactly as the dispatcher does
and looks for an event carrying a mark no absence can have, in one mailbox.
That exercises everything a real write needs first (credentials or token,
consent, TLS, the server URL, the mailbox and the right to read it) and
changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from consumer.providers import build_provider
from consumer.providers.base import ProviderContext, ProviderError
from consumer.render import Mark
from consumer.store import StoredConfig

PROBE_MARK = Mark("absence-sync-probe", "no-such-absence")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    config_id: str
    provider: str
    mailbox: str
    error: ProviderError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def probe(stored: StoredConfig, context: ProviderContext, mailbox: str) -> ProbeResult:
    """Try `stored`'s calendar service for `mailbox`; never raises a ProviderError."""
    config = stored.config
    try:
        provider = build_provider(config, context)
    except ProviderError as exc:
        return ProbeResult(config.id, config.provider, mailbox, exc)
    try:
        await provider.find(mailbox, PROBE_MARK)
    except ProviderError as exc:
        return ProbeResult(config.id, config.provider, mailbox, exc)
    finally:
        await provider.close()
    return ProbeResult(config.id, config.provider, mailbox)
