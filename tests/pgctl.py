"""A PostgreSQL server of a test's own, which it may stop, freeze and restart.

The session's shared server (tests/conftest.py) must never stop: other
tests use it. This one runs the pgserver wheel's binaries (initdb, pg_ctl)
on a fixed TCP port of the loopback interface, so a restart brings it back
at the same address. As root, PostgreSQL runs as the `pgserver` user, as
consumer/embedded.py does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pgserver
import psutil

from consumer.embedded import free_port

BIN = Path(pgserver.__file__).parent / "pginstall" / "bin"
USER = "pgserver"


class StoppablePostgres:
    def __init__(self, root: Path, port: int, user: str | None) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = port
        self.user = user

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def create(cls) -> StoppablePostgres:
        root = Path(tempfile.mkdtemp(prefix="absence-sync-outage-"))
        user = None
        if os.geteuid() == 0:
            from pgserver.utils import ensure_user_exists

            entry = ensure_user_exists(USER)
            assert entry is not None
            os.chown(root, entry.pw_uid, entry.pw_gid)
            user = USER
        server = cls(root, free_port(), user)
        server._run("initdb", "-D", str(server.data), "-U", "postgres", "--auth=trust",
                    "--encoding=UTF8", "--no-sync")
        with (server.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {server.port}\n"
                "unix_socket_directories = ''\nfsync = off\nmax_connections = 60\n"
            )
        server.start()
        return server

    def _run(self, program: str, *args: str, timeout: float = 120) -> None:
        kwargs: dict[str, Any] = {"user": self.user} if self.user else {}
        subprocess.run(
            [str(BIN / program), *args], cwd=self.root, check=True, timeout=timeout,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs,
        )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """`fast`: sessions are terminated (clients see the connection end)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def _pids(self) -> list[int]:
        """The postmaster and its children (backends and background processes)."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [pid, *(child.pid for child in children)]

    def freeze(self) -> None:
        """Every server process stops answering, connections stay open (a hung host)."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        for pid in self._pids():
            # a backend whose client left exits as soon as it runs again
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def destroy(self) -> None:
        if self.running():
            try:
                self.thaw()
                self.stop("immediate")
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()
