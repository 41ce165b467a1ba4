"""Failures of the infrastructure a command needs, worded for the operator.

Each names the component, the address (never credentials) and the setting to
check, so the CLI prints one readable line instead of a driver's traceback.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit


class Unreachable(Exception):
    """A server the command needs could not be used."""

    def __init__(self, component: str, address: str, setting: str, detail: str) -> None:
        self.component = component
        self.address = address
        self.setting = setting
        self.detail = detail
        super().__init__(
            f"cannot use {component} at {address} (check {setting}): {detail}"
        )


def dsn_address(dsn: str) -> str:
    """host:port/database of a PostgreSQL URL, without user or password."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(unreadable URL)"
    if not host:  # a Unix socket: postgresql://user@/db?host=/run/postgresql
        host = (parse_qs(parts.query).get("host") or ["localhost"])[0]
    where = f"{host}:{port}" if port else host
    database = parts.path.lstrip("/")
    return f"{where}/{database}" if database else where
