#!/usr/bin/env bash
# The whole test suite: lint, types, then pytest against a real Kafka-protocol
# broker (tansu) and PostgreSQL (pgserver) that the suite starts itself.
# promtool (Debian package 'prometheus') checks and unit-tests the alert rules;
# it is installed here when missing and we may (root with apt-get). In CI
# (CI=true) the rule tests fail rather than skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing promtool (Debian package prometheus)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 \
      || { apt-get update >/dev/null 2>&1 \
           && apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1; } \
      || echo "could not install promtool: the alert rule tests will not run" >&2
  else
    echo "promtool is missing (Debian package 'prometheus'): the alert rule tests will not run" >&2
  fi
fi
# the page's browser tests drive Debian's Chromium (Playwright's own download is not used)
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
    || echo "warning: could not install chromium; the browser tests will fail" >&2
fi
.venv/bin/ruff check consumer tests bench
.venv/bin/mypy
# two test processes (pytest-xdist; each starts its own broker and PostgreSQL):
# most tests wait on subprocesses and servers, so two share 2 cores well and take
# about half the time of one; PYTEST_WORKERS=0 runs everything in one process
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
