#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv and install loopdiff into it, with the optional
# dependency groups named in $1 (comma-separated, e.g. "test"; none by default).
# torch is installed first as ${TORCH_VERSION:-2.13.0}: on this project's CPU machines that is the local CPU
# build; a plain "torch" requirement would pull a multi-GB CUDA build from PyPI (README: a CUDA machine).
# Overrides: PYTHON (the interpreter creating .venv), TORCH_VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
extras="${1:-}"
marker=".venv/.loopdiff-installed"
# the stamp covers the overrides too: another PYTHON or TORCH_VERSION sets up again
stamp="$( (cat pyproject.toml scripts/setup.sh; echo "$extras ${TORCH_VERSION:-} $PYTHON") | sha256sum | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$stamp" ]; then
  exit 0
fi
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
echo "$stamp" > "$marker"
echo "loopdiff installed in .venv"
