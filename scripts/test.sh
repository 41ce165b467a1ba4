#!/usr/bin/env bash
# The whole test suite: lint, types, then pytest against a real Kafka-protocol
# broker (tansu) and PostgreSQL (pgserver) that the suite starts itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check consumer tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
