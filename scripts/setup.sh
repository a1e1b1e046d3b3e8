#!/usr/bin/env bash
# Create .venv (or $MEANFLOW_VENV) and install meanflow with its test extras.
# --with-datasets also installs Debian's dataset-fashion-mnist (as root, via apt) for the tests.
# torch is pinned to the CPU build 2.13.0 first, so the package's "torch>=2.4" pulls nothing more;
# set MEANFLOW_TORCH to another requirement (e.g. "torch" for a CUDA build) to change that.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MEANFLOW_VENV:-.venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "${MEANFLOW_TORCH:-torch==2.13.0}"
"$venv/bin/python" -m pip install --quiet -e ".[test]"
# Offline image data: Fashion-MNIST as Debian's IDX files (read by meanflow.data.load_fashion_mnist).
if [ "${1:-}" = "--with-datasets" ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped" >&2
  else
    echo "note: 'apt-get install dataset-fashion-mnist' (as root) provides Fashion-MNIST" >&2
  fi
fi
echo "meanflow installed in $venv" >&2
