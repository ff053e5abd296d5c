#!/usr/bin/env bash
# The native reference for the python-data fidelity tests: a venv in target/py-data-venv with
# the same numpy/pandas/matplotlib/openpyxl versions as the runtime's MANIFEST (wheels from PyPI).
# Prints the venv's python. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/target/py-data-venv"
want="numpy==2.5.2 pandas==3.0.6 matplotlib==3.11.2 openpyxl==3.1.5"
if ! "$venv/bin/python" -c "import numpy, pandas, matplotlib, openpyxl; assert (numpy.__version__, pandas.__version__, matplotlib.__version__) == ('2.5.2', '3.0.6', '3.11.2')" >/dev/null 2>&1; then
  # numpy 2.5 has wheels for Python >= 3.12 only: take the newest interpreter that runs (a pyenv
  # shim on PATH may exist without running).
  py=python3
  for c in python3.14 python3.13 python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1{4,3,2}*/bin/python3; do
    if "$c" -c "import venv" >/dev/null 2>&1; then py="$c"; break; fi
  done
  "$py" -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: $want >&2
fi
echo "$venv/bin/python"
