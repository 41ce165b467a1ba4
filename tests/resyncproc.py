"""A resync in a child process, for the abandoned-job test: it marks one
configuration's pairs, then waits for writes nobody makes until it is killed.

Usage: python -m tests.resyncproc CONFIG_ID LEASE_SECONDS (settings from the
ABSENCE_SYNC_* environment).
"""

from __future__ import annotations

import asyncio
import sys

from consumer import resync, store
from consumer.settings import Settings


async def main(config_id: str, lease_seconds: float) -> None:
    settings = Settings()
    assert settings.database_url and settings.kafka_bootstrap_servers
    pool = await store.connect(settings.database_url)
    try:
        await resync.resync(
            pool, settings, settings.kafka_bootstrap_servers,
            resync.ResyncRequest(config_ids=(config_id,), wait=True, dispatch=False),
            lease_seconds=lease_seconds,
        )
    finally:
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
