"""The README's first command: the demo ends by printing the expected calendars."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path


def test_demo_prints_the_calendars_read_back_from_caldav(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "absence-sync"
    result = subprocess.run(
        [str(script), "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Consumed: 6 applied, 2 stale, 1 invalid" in out
    jane, john, ana = (
        out.split("Jane Doe <")[1].split("\n\n")[0],
        out.split("John Smith <")[1].split("\n\n")[0],
        out.split("Ana Garcia <")[1].split("\n\n")[0],
    )
    # approved three days: one all-day event, label hidden, busy
    assert "(all day)" in jane and "Absent" in jane and "OPAQUE/CONFIRMED" in jane
    # half-day training with a public reason: timed afternoon, label shown
    assert "13:30 - 18:00 Europe/Paris" in jane and "Training" in jane
    # remote work: not counted, shown free
    assert "Remote work" in john and "TRANSPARENT/CONFIRMED" in john
    # pending request: tentative, in the employee's own zone
    assert "09:00" in john and "Europe/London" in john and "OPAQUE/TENTATIVE" in john
    # Ana's cancelled day left nothing; her week of leave is there
    assert ana.count("(all day)") == 1 and "Fri" in ana
    assert "Traceback" not in result.stderr
    # the suggestion to keep the stack running can be run as printed (the virtual
    # environment's script is not on this PATH)
    suggestion = re.search(r"run '([^']+)'", out)
    assert suggestion is not None, out[-500:]
    program, *rest = shlex.split(suggestion.group(1))
    assert rest == ["dev"] and Path(program).is_absolute() and os.access(program, os.X_OK)


def test_dev_keeps_the_stack_running_and_prints_its_addresses(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "absence-sync"
    process = subprocess.Popen(
        [str(script), "dev"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 300
        while not any(line.startswith("  Worker:") for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            lines.append(process.stdout.readline())
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    caldav = next(line for line in lines if "CalDAV (Radicale):" in line)
    url = caldav.split("CalDAV (Radicale):", 1)[1].strip()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url), url  # one slash, no double
    assert any("password" in line for line in lines)
    assert "Traceback" not in err
