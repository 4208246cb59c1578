#!/usr/bin/env bash
# Set up a fresh machine: a project venv with the CPU torch wheel first (a bare `torch`
# requirement could pull a multi-GB CUDA build), then actstore and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

pip_install() {   # quiet, but a failure stops the script with pip's own message
  local out
  out=$(.venv/bin/python -m pip install -q "$@" 2>&1) || { echo "$out" >&2; return 1; }
  echo "$out" | grep -v "^WARNING: Location" || true
}

# Installed once per pyproject.toml: reruns (every main-job or test command) skip pip.
if [ ! .venv/.installed -nt pyproject.toml ]; then
  pip_install --upgrade pip
  .venv/bin/python -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
  pip_install -e ".[test]"
  .venv/bin/python -c "import actstore, torch, diffusers, zarr, prefect"
  touch .venv/.installed
fi
.venv/bin/python -c "import actstore, torch, zarr, prefect; print('actstore', actstore.__version__, '| torch', torch.__version__, '| zarr', zarr.__version__, '| prefect', prefect.__version__)"
