#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the locked dependency set and this package.
# Re-runs pip only when setup.py or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
  || { echo "Python 3.11 is required (found $("$PY" --version))" >&2; exit 1; }
stamp=$(cat setup.py requirements.txt constraints.txt | sha256sum | cut -c1-16)
if [ ! -f .venv/.stamp ] || [ "$(cat .venv/.stamp)" != "$stamp" ]; then
  echo "setting up .venv (first time: several minutes, TensorFlow/Beam/tfx-bsl are large)" >&2
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -c constraints.txt -e ".[tf,test,launch]"
  echo "$stamp" > .venv/.stamp
fi
