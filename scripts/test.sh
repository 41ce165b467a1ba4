#!/usr/bin/env bash
# The whole test suite: lint, types, then pytest against a real Kafka-protocol
# broker (tansu) and PostgreSQL (pgserver) that the suite starts itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# the page's browser tests drive Debian's Chromium (Playwright's own download is not used)
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
    || echo "warning: could not install chromium; the browser tests will fail" >&2
fi
.venv/bin/ruff check consumer tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
