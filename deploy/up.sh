#!/usr/bin/env bash
# Start everything a local run needs, all bound to 127.0.0.1:
#   a Prefect server (SQLite in $PREFECT_HOME), an MLflow tracking server (SQLite + artifacts in
#   $DMTP_DATA_ROOT), the process work pool `gpu-pool`, the deployments of prefect.yaml, and one
#   worker on this host. Idempotent: what already runs is left alone. Stop it all with deploy/down.sh.
#
#   deploy/up.sh                 # or: make up
#   deploy/up.sh --no-worker     # servers, pool and deployments only (workers run on GPU hosts)
set -euo pipefail
source "$(dirname "$0")/env.sh"
source "$DMTP_REPO/deploy/lib.sh"
cd "$DMTP_REPO"
mkdir -p "$DMTP_SERVICES_DIR" "$DMTP_DATA_ROOT" "$PREFECT_HOME"

start_service prefect-server prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
# --workers 1: one gunicorn worker is plenty for one team and starts in seconds, not tens.
start_service mlflow-server mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$DMTP_DATA_ROOT/mlflow.db" \
  --artifacts-destination "$DMTP_DATA_ROOT/mlartifacts"
wait_http "$PREFECT_API_URL/health" prefect-server 120
wait_http "http://127.0.0.1:$MLFLOW_PORT/health" mlflow-server 120

if ! prefect work-pool inspect "$DMTP_WORK_POOL" >/dev/null 2>&1; then
  prefect work-pool create "$DMTP_WORK_POOL" --type process >/dev/null
  echo "up: created process work pool $DMTP_WORK_POOL"
fi
# Registers every deployment in prefect.yaml; job variables take DMTP_DATA_ROOT and
# MLFLOW_TRACKING_URI from this environment.
prefect --no-prompt deploy --all >"$DMTP_SERVICES_DIR/deploy.log" 2>&1 \
  || { tail -n 30 "$DMTP_SERVICES_DIR/deploy.log" >&2; exit 1; }
echo "up: deployments registered (log: $DMTP_SERVICES_DIR/deploy.log)"

if [ "${1:-}" != "--no-worker" ]; then
  start_service worker prefect worker start --pool "$DMTP_WORK_POOL" --type process \
    --name "$(hostname)-worker"
fi

cat <<MSG
up: ready
  Prefect UI   http://127.0.0.1:$PREFECT_PORT        (flow runs, task states, logs)
  MLflow UI    http://127.0.0.1:$MLFLOW_PORT        (training runs, metrics, heads)
  run the job  source deploy/env.sh && prefect deployment run collect-and-train/gpu
  stop         deploy/down.sh
MSG
