# Settings shared by the deploy scripts. `source deploy/env.sh` to point a shell (prefect, mlflow,
# the flows) at the local services that deploy/up.sh starts. Every value can be set beforehand.
# shellcheck shell=bash
DMTP_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DMTP_REPO
export DMTP_VENV="${DMTP_VENV:-$DMTP_REPO/.venv}"
# Stores, heads, the stages' cached manifests and the MLflow database; shared by every worker.
export DMTP_DATA_ROOT="${DMTP_DATA_ROOT:-$DMTP_REPO/runs}"
# pids and logs of the services started here
export DMTP_SERVICES_DIR="${DMTP_SERVICES_DIR:-$DMTP_DATA_ROOT/services}"
export PREFECT_HOME="${PREFECT_HOME:-$DMTP_REPO/.prefect}"  # project-local: profiles and server db
export PREFECT_PORT="${PREFECT_PORT:-4200}"
export MLFLOW_PORT="${MLFLOW_PORT:-5000}"
# Where deploy/up.sh binds both servers. Beyond 127.0.0.1 it needs credentials (deploy/up.sh).
export DMTP_BIND_HOST="${DMTP_BIND_HOST:-127.0.0.1}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:$PREFECT_PORT/api}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://127.0.0.1:$MLFLOW_PORT}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_DISABLE_TELEMETRY=true
export DMTP_WORK_POOL="${DMTP_WORK_POOL:-gpu-pool}"
export PATH="$DMTP_VENV/bin:$PATH"
