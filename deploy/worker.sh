#!/usr/bin/env bash
# Run a process worker for the GPU pool on this host, in the foreground (a systemd unit or a tmux
# pane on each GPU host). Point it at the team's server first:
#   PREFECT_API_URL=http://prefect.internal:4200/api DMTP_DATA_ROOT=/shared/dmtp deploy/worker.sh
# Each flow run it picks up runs in this checkout with this host's GPUs (CUDA_VISIBLE_DEVICES of the
# deployment's job variables, or of this environment when the deployment leaves it unset).
#
# One flow run at a time (DMTP_WORKER_LIMIT, default 1; 0 lifts the limit): every deployment in
# prefect.yaml takes all of the host's GPUs or GPU 0, so two runs at once on one host would share
# GPUs they each think they own. Further runs stay Scheduled until this one finishes, or until the
# worker of an idle host takes them. deploy/README.md ("One flow run per GPU host") says why a
# worker limit rather than a deployment or global concurrency limit.
#
# Credentials come from this environment and reach every flow run and every stage's child process
# unchanged: PREFECT_API_AUTH_STRING for the Prefect API, MLFLOW_TRACKING_USERNAME and
# MLFLOW_TRACKING_PASSWORD for the MLflow server (deploy/README.md, "Several hosts").
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$DMTP_REPO"
limit="${DMTP_WORKER_LIMIT:-1}"
limit_args=()
[ "$limit" = 0 ] || limit_args=(--limit "$limit")
# Two workers on one host (each with its own CUDA_VISIBLE_DEVICES) need two names.
name="${DMTP_WORKER_NAME:-$(hostname)-worker}"
exec prefect worker start --pool "$DMTP_WORK_POOL" --type process --name "$name" \
  "${limit_args[@]}" "$@"
