#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: three test files at a time (most of a
# slow test's time is waiting on processes it starts); `-n 0` runs them one by one, and
# later options win, so `bash scripts/test.sh -n 2 tests/test_x.py` works as typed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 3 --dist loadfile "$@"
