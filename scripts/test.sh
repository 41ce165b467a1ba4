#!/usr/bin/env bash
# The whole test suite: lint, types, then pytest against a real Kafka-protocol
# broker (tansu) and PostgreSQL (pgserver) that the suite starts itself.
# promtool (Debian package 'prometheus') checks and unit-tests the alert rules;
# it is installed here when missing and we may (root with apt-get). In CI
# (CI=true) the rule tests fail rather than skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
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
.venv/bin/ruff check consumer tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
