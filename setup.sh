#!/usr/bin/env bash
# One command to get a working checkout: install kfer and its pinned dependencies, restore the demo data.
#   ./setup.sh            uses the active virtualenv if there is one, else creates ./.venv
# Offline-safe after install: the demo data comes from the DVC remote stored in this repository (dvc-storage/).
set -euo pipefail
cd "$(dirname "$0")"
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true

if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi

python -m pip install --quiet --upgrade pip
# requirements.lock pins the versions that resolved together (tensorflow-cpu 2.21, keras 3.15, mlflow 3.17.2, ...)
python -m pip install --quiet -c requirements.lock -e ".[dev]"

# Restore the versioned raw data (data.dvc) from the in-repo remote; no network needed.
dvc pull --quiet data.dvc
echo "kfer is installed in ${VIRTUAL_ENV}; demo data restored to data/raw ($(find data/raw -type f | wc -l) files)."
echo "Next: . ${VIRTUAL_ENV}/bin/activate && dvc repro"
