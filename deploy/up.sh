#!/usr/bin/env bash
# Start everything a run needs: a Prefect server (SQLite in $PREFECT_HOME), an MLflow tracking
# server (SQLite + artifacts in $DMTP_DATA_ROOT), the process work pool `gpu-pool`, the deployments
# of prefect.yaml, and one worker on this host. Idempotent: what already runs is left alone. Stop it
# all with deploy/down.sh.
#
#   deploy/up.sh                 # or: make up (bound to 127.0.0.1, no credentials needed)
#   deploy/up.sh --no-worker     # servers, pool and deployments only (workers run on GPU hosts)
#
# Servers for several hosts (deploy/README.md, "Several hosts"): DMTP_BIND_HOST=0.0.0.0 (or an
# interface's address) is refused unless these are set, and with them both servers ask for them:
#   PREFECT_API_AUTH_STRING    user:password; the server gets it as PREFECT_SERVER_API_AUTH_STRING
#   MLFLOW_TRACKING_USERNAME   MLflow's basic-auth app: the admin user, created on the first start
#   MLFLOW_TRACKING_PASSWORD   (12 characters at least, MLflow's rule)
# They are the clients' own variables: the prefect CLI, workers, flow runs, the stages' child
# processes and dmtp's MLflow client read them from the environment, so nothing else passes them.
set -euo pipefail
source "$(dirname "$0")/env.sh"
source "$DMTP_REPO/deploy/lib.sh"
cd "$DMTP_REPO"

# Decide on access control before anything starts or is written.
credential_names=(PREFECT_API_AUTH_STRING MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD)
missing=()
for name in "${credential_names[@]}"; do
  [ -n "${!name:-}" ] || missing+=("$name")
done
if [ ${#missing[@]} -eq ${#credential_names[@]} ]; then
  auth=false
  if ! is_loopback "$DMTP_BIND_HOST"; then
    echo "up: refusing to bind to $DMTP_BIND_HOST without credentials: set PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (deploy/README.md, \"Several hosts\"), or bind to 127.0.0.1" >&2
    exit 2
  fi
elif [ ${#missing[@]} -gt 0 ]; then
  echo "up: credentials are all or none: $(IFS=,; echo "${missing[*]}" | sed 's/,/, /g') not set" >&2
  exit 2
elif [ ${#MLFLOW_TRACKING_PASSWORD} -lt 12 ]; then
  echo "up: MLFLOW_TRACKING_PASSWORD has ${#MLFLOW_TRACKING_PASSWORD} characters; MLflow's basic-auth app needs 12 or more" >&2
  exit 2
else
  auth=true
fi

mkdir -p "$DMTP_SERVICES_DIR" "$DMTP_DATA_ROOT" "$PREFECT_HOME"

# Each server gets its secret settings through a subshell's environment, never on its command line
# (ps shows argv to every user of the host), and the worker does not inherit them.
(
  if $auth; then export PREFECT_SERVER_API_AUTH_STRING="$PREFECT_API_AUTH_STRING"; fi
  start_service prefect-server prefect server start --host "$DMTP_BIND_HOST" --port "$PREFECT_PORT"
)
(
  # --workers 1: one worker process is plenty for one team and starts in seconds, not tens.
  mlflow_args=(--host "$DMTP_BIND_HOST" --port "$MLFLOW_PORT" --workers 1
    --backend-store-uri "sqlite:///$DMTP_DATA_ROOT/mlflow.db"
    --artifacts-destination "$DMTP_DATA_ROOT/mlartifacts")
  if $auth; then
    # Users and permissions live in their own SQLite file beside the tracking store; the admin
    # user is created from these variables on the first start only (MLflow ignores them once it
    # exists: change its password through MLflow's API, or delete mlflow-auth.db to start over).
    cat >"$DMTP_DATA_ROOT/mlflow-auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$DMTP_DATA_ROOT/mlflow-auth.db
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    export MLFLOW_AUTH_CONFIG_PATH="$DMTP_DATA_ROOT/mlflow-auth.ini"
    export MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_TRACKING_USERNAME"
    export MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"
    # The basic-auth app signs its CSRF tokens with this key; kept in a file only this user reads,
    # so a restart does not invalidate the UI's open sessions.
    key_file="$DMTP_SERVICES_DIR/mlflow-flask-secret-key"
    if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
      [ -s "$key_file" ] || (umask 077 && "$DMTP_VENV/bin/python" -c \
        "import secrets; print(secrets.token_urlsafe(32))" >"$key_file")
      MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$key_file")"
    fi
    export MLFLOW_FLASK_SERVER_SECRET_KEY
    mlflow_args+=(--app-name basic-auth)
  fi
  start_service mlflow-server mlflow server "${mlflow_args[@]}"
)
mlflow_url="http://127.0.0.1:$MLFLOW_PORT"
wait_http "$PREFECT_API_URL/health" prefect-server 120
wait_http "$mlflow_url/health" mlflow-server 120

# Servers left running by an earlier up.sh keep the access control they started with: check that
# both refuse a caller without credentials and accept ours.
if $auth; then
  prefect_probe="$PREFECT_API_URL/admin/version"
  mlflow_probe="$mlflow_url/api/2.0/mlflow/experiments/search?max_results=1"
  mlflow_credentials="$MLFLOW_TRACKING_USERNAME:$MLFLOW_TRACKING_PASSWORD"
  if [ "$(http_status "$prefect_probe")" != 401 ] || [ "$(http_status "$mlflow_probe")" != 401 ]; then
    echo "up: a server already running here was started without credentials; stop it (deploy/down.sh) and run deploy/up.sh again" >&2
    exit 1
  fi
  if [ "$(http_status "$prefect_probe" "$PREFECT_API_AUTH_STRING")" != 200 ]; then
    echo "up: the Prefect server refuses PREFECT_API_AUTH_STRING (started with another one: deploy/down.sh, then deploy/up.sh)" >&2
    exit 1
  fi
  if [ "$(http_status "$mlflow_probe" "$mlflow_credentials")" != 200 ]; then
    echo "up: the MLflow server refuses MLFLOW_TRACKING_USERNAME/PASSWORD (its admin user was created with another password: change it through MLflow's API, or delete $DMTP_DATA_ROOT/mlflow-auth.db)" >&2
    exit 1
  fi
fi

if ! prefect work-pool inspect "$DMTP_WORK_POOL" >/dev/null 2>&1; then
  prefect work-pool create "$DMTP_WORK_POOL" --type process >/dev/null
  echo "up: created process work pool $DMTP_WORK_POOL"
fi
# Registers every deployment in prefect.yaml; job variables take DMTP_DATA_ROOT and
# MLFLOW_TRACKING_URI from this environment (credentials never: they stay in each worker's).
prefect --no-prompt deploy --all >"$DMTP_SERVICES_DIR/deploy.log" 2>&1 \
  || { tail -n 30 "$DMTP_SERVICES_DIR/deploy.log" >&2; exit 1; }
echo "up: deployments registered (log: $DMTP_SERVICES_DIR/deploy.log)"

if [ "${1:-}" != "--no-worker" ]; then
  # deploy/worker.sh: one flow run at a time on this host (DMTP_WORKER_LIMIT).
  start_service worker "$DMTP_REPO/deploy/worker.sh"
fi

if $auth; then
  access="credentials required (PREFECT_API_AUTH_STRING; MLFLOW_TRACKING_USERNAME/PASSWORD)"
else
  access="no credentials: reachable from this machine only"
fi
cat <<MSG
up: ready, bound to $DMTP_BIND_HOST, $access
  Prefect UI   http://127.0.0.1:$PREFECT_PORT        (flow runs, task states, logs)
  MLflow UI    http://127.0.0.1:$MLFLOW_PORT        (training runs, metrics, heads)
  run the job  source deploy/env.sh && prefect deployment run collect-and-train/gpu
  stop         deploy/down.sh
MSG
