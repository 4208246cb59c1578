#!/usr/bin/env bash
# Set up a fresh machine: a project venv with the CPU torch wheel first (a bare `torch`
# requirement could pull a multi-GB CUDA build), then actstore and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import actstore, torch, diffusers, zarr, prefect; print('actstore', actstore.__version__, '| torch', torch.__version__, '| zarr', zarr.__version__, '| prefect', prefect.__version__)"
