"""An embedded Radicale CalDAV server, run as a child process.

The demo and development stack write to it (README, 'Quick start') and the CalDAV
provider's tests run against it. It runs as a subprocess, not in-process:
Radicale's built-in server is blocking, installs signal handlers and owns
its logging, none of which belong inside the engine's event loop.

Rights are Radicale's `authenticated` type: every authenticated user (or
anybody, when no users are given) may read and write every principal and
calendar collection. That is what one service account writing all the
employees' calendars needs; per-user restrictions are a production server's
business, not the embedded one's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

_START_TIMEOUT_SECONDS = 30.0
_STOP_TIMEOUT_SECONDS = 10.0
_LOG_TAIL_CHARS = 4000


class RadicaleError(RuntimeError):
    """The embedded Radicale could not be started; the message holds its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now. Another process may take it before it is bound,
    which on a loopback address in a test or demo is an accepted risk."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _check_port_free(port: int) -> None:
    # Something else listening there would answer the readiness probe
    # in Radicale's stead; say so instead of talking to the wrong server.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise RadicaleError(f"port 127.0.0.1:{port} is in use: {exc.strerror}") from exc


def _config_text(
    *,
    storage: Path,
    port: int,
    htpasswd: Path | None,
    cert: Path | None,
    key: Path | None,
    log_level: str,
) -> str:
    lines = [
        "[server]",
        f"hosts = 127.0.0.1:{port}",
        "max_connections = 32",
    ]
    if cert is not None and key is not None:
        lines += ["ssl = True", f"certificate = {cert}", f"key = {key}"]
    lines += ["", "[auth]"]
    if htpasswd is None:
        lines.append("type = none")
    else:
        lines += [
            "type = htpasswd",
            f"htpasswd_filename = {htpasswd}",
            "htpasswd_encryption = plain",
        ]
    lines += [
        "",
        "[rights]",
        "type = authenticated",
        "",
        "[storage]",
        f"filesystem_folder = {storage}",
        "",
        "[logging]",
        f"level = {log_level}",
        "",
    ]
    return "\n".join(lines)


def _check_config_value(name: str, value: str) -> None:
    # Radicale's config is an INI file: a line break in a path or password
    # would inject settings.
    if "\n" in value or "\r" in value:
        raise ValueError(f"{name} must not contain a line break")


class RadicaleServer:
    """A running Radicale. Build it with `RadicaleServer.start`; `stop` (or
    leaving the `with` block) ends the process. Data in `data_dir` survives
    a restart, so a demo can be stopped and resumed."""

    def __init__(
        self, process: subprocess.Popen[bytes], url: str, log_path: Path, log_file: IO[bytes]
    ) -> None:
        self._process = process
        self._log_path = log_path
        self._log_file = log_file
        self.url = url

    @classmethod
    def start(
        cls,
        data_dir: Path,
        *,
        port: int | None = None,
        users: dict[str, str] | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        log_level: str = "warning",
    ) -> RadicaleServer:
        """Start Radicale on 127.0.0.1 and return once its port accepts
        connections. `users` maps user names to passwords (none: no
        authentication). `cert` and `key` (PEM files) switch on HTTPS.
        Raises `RadicaleError` if the port is taken, or the process exits or
        never listens. Blocks for about a second: async callers run it in a
        thread."""
        if (cert is None) != (key is None):
            raise ValueError("give both cert and key, or neither")
        try:
            import radicale  # noqa: F401 - run as `python -m radicale`; here only to check
        except ImportError as exc:
            from consumer.embedded import missing_extra

            raise RadicaleError(missing_extra("radicale (the CalDAV server)")) from exc
        data_dir = data_dir.resolve()
        storage = data_dir / "collections"
        storage.mkdir(parents=True, exist_ok=True)
        htpasswd: Path | None = None
        if users:
            htpasswd = data_dir / "users"
            entries = []
            for name, password in users.items():
                _check_config_value("a user name", name)
                _check_config_value("a password", password)
                if ":" in name:
                    raise ValueError(f"user name {name!r} must not contain ':'")
                entries.append(f"{name}:{password}\n")
            htpasswd.write_text("".join(entries), encoding="utf-8")
            htpasswd.chmod(0o600)
        for label, path in (("data_dir", data_dir), ("cert", cert), ("key", key)):
            if path is not None:
                _check_config_value(label, str(path))
        if port is None:
            port = free_port()
        else:
            _check_port_free(port)
        config = data_dir / "radicale.conf"
        config.write_text(
            _config_text(
                storage=storage,
                port=port,
                htpasswd=htpasswd,
                cert=cert.resolve() if cert is not None else None,
                key=key.resolve() if key is not None else None,
                log_level=log_level,
            ),
            encoding="utf-8",
        )
        log_path = data_dir / "radicale.log"
        log_file = log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if k != "RADICALE_CONFIG"}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "radicale", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        except OSError:
            log_file.close()
            raise
        scheme = "https" if cert is not None else "http"
        server = cls(process, f"{scheme}://127.0.0.1:{port}/", log_path, log_file)
        try:
            server._wait_listening(port)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_listening(self, port: int) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while True:
            code = self._process.poll()
            if code is not None:
                raise RadicaleError(
                    f"Radicale exited with status {code} while starting; its log "
                    f"({self._log_path}) ends with:\n{self.log_tail()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.5),
            ):
                return
            if time.monotonic() > deadline:
                raise RadicaleError(
                    f"Radicale did not listen on 127.0.0.1:{port} within "
                    f"{_START_TIMEOUT_SECONDS:.0f} s; its log ({self._log_path}) ends with:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def log_tail(self) -> str:
        """The end of Radicale's log, for error messages."""
        self._log_file.flush()
        try:
            text = self._log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-_LOG_TAIL_CHARS:]

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after a grace period).
        Safe to call more than once."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if not self._log_file.closed:
            self._log_file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
