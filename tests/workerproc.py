"""The real `absence-sync run` as a subprocess, for kill and drain tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from consumer.settings import Settings
from tests.conftest import settings_env

SCRIPT = Path(sys.executable).parent / "absence-sync"


class WorkerProcess:
    def __init__(self, settings: Settings, log: Path, **extra_env: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ABSENCE_SYNC_")}
        env.update(settings_env(settings))
        env.update(extra_env)
        self.log = log
        self._file = log.open("ab")
        self.proc = subprocess.Popen(
            [str(SCRIPT), "run"], env=env, stdout=self._file, stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._file.close()

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._file.close()
        return code

    def started(self) -> bool:
        """The worker logged that it is consuming (its graceful SIGTERM is in place)."""
        return "worker started" in self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None
