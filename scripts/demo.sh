#!/usr/bin/env bash
# The demo: embedded broker, database and CalDAV server, sample absences,
# then the employees' calendars as read back from the CalDAV server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh embedded   # only what the demo runs: no test tools
exec .venv/bin/absence-sync "${1:-demo}"
