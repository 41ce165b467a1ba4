"""Calendar providers. `build_provider` picks the implementation for a configuration."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from consumer.config import SyncConfig
    from consumer.providers.base import Provider, ProviderContext

_IMPLEMENTATIONS = {
    "microsoft365": ("consumer.providers.microsoft365", "Microsoft365Provider"),
    "exchange": ("consumer.providers.exchange", "ExchangeProvider"),
    "google": ("consumer.providers.google", "GoogleProvider"),
    "caldav": ("consumer.providers.caldav", "CalDAVProvider"),
    # no remote calendar: feeds served by the worker (consumer.feeds)
    "ics": ("consumer.providers.ics", "IcsProvider"),
}


def build_provider(config: SyncConfig, context: ProviderContext) -> Provider:
    """The provider for `config`; raises `ProviderError` if it cannot be built."""
    from consumer.providers.base import PROVIDER_ERROR, ProviderError

    module_name, class_name = _IMPLEMENTATIONS[config.provider]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ProviderError(
            PROVIDER_ERROR,
            f"the {config.provider} provider is not available in this version",
            retriable=False,
            hint="Use a provider this version supports: microsoft365, exchange or caldav.",
        ) from exc
    cls: type[Provider] = getattr(module, class_name)
    return cls.from_config(config, context)
