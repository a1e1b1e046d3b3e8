#!/usr/bin/env bash
# The README's test command: set up, then run the whole suite. pytest's "no tests ran" (exit 5)
# is turned into a failure, so an empty or mis-collected suite never passes.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --with-datasets || exit 1
.venv/bin/python -m pytest tests "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "no tests were collected: failing" >&2
  exit 1
fi
exit "$code"
