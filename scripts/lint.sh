#!/usr/bin/env bash
# The quality gates (run by .ci/run after the tests): ruff lint and format check on src/,
# examples/ and scripts/, mypy on src/meanflow, and import-linter's layer contract (settings in
# pyproject.toml; the layers are drawn in docs/architecture.md).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MEANFLOW_VENV:-.venv}"
if ! "$venv/bin/python" -c "import ruff, mypy, importlinter" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet -e ".[dev]"
fi
"$venv/bin/ruff" check src examples scripts
"$venv/bin/ruff" format --check src examples scripts
"$venv/bin/mypy"
"$venv/bin/lint-imports" --no-cache
