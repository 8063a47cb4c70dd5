#!/usr/bin/env bash
# The team's shared MLflow tracking server: runs, metrics, the model registry and its
# @champion alias in PostgreSQL; artifacts (models, plots) stored in one place and served
# through the server, so clients need no access to the storage itself.
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://user:pass@host:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/mlflow \
#     scripts/tracking-server.sh --host 0.0.0.0 --port 5000 [other `mlflow server` options]
#
# MLFLOW_ARTIFACTS_DESTINATION defaults to ./mlartifacts (a folder on the server's machine).
# Add `--app-name basic-auth` for user accounts (README, "Team setup").
set -euo pipefail

if [ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]; then
  echo "error: set MLFLOW_BACKEND_STORE_URI to the team's database," \
       "e.g. postgresql://user:pass@host:5432/mlflow" >&2
  exit 2
fi
destination=${MLFLOW_ARTIFACTS_DESTINATION:-$PWD/mlartifacts}

# This project's virtual environment if there is one (it has the PostgreSQL drivers), else PATH.
root=$(cd "$(dirname "$0")/.." && pwd)
mlflow=$root/.venv/bin/mlflow
[ -x "$mlflow" ] || mlflow=mlflow

# Later options win, so "$@" can override the host and port.
exec "$mlflow" server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --serve-artifacts --artifacts-destination "$destination" \
  --host 127.0.0.1 --port 5000 \
  "$@"
