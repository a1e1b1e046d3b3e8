#!/usr/bin/env bash
# The quality gates (run by .ci/run after the tests): ruff lint and format check on src/,
# examples/ and scripts/, and mypy on src/meanflow (settings in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MEANFLOW_VENV:-.venv}"
if ! "$venv/bin/python" -c "import ruff, mypy" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet -e ".[dev]"
fi
"$venv/bin/ruff" check src examples scripts
"$venv/bin/ruff" format --check src examples scripts
"$venv/bin/mypy"
