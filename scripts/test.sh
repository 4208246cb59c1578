#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: 3 processes, each taking whole files
# (a file's module fixtures are built once); tests marked `alone` run while no other test
# runs (tests/alone.py). Arguments go to pytest after these: `-n 0` runs one by one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 3 --dist loadfile "$@"
