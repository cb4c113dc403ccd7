#!/usr/bin/env bash
# Run a process worker for the GPU pool on this host, in the foreground (a systemd unit or a tmux
# pane on each GPU host). Point it at the team's server first:
#   PREFECT_API_URL=http://prefect.internal:4200/api DMTP_DATA_ROOT=/shared/dmtp deploy/worker.sh
# Each flow run it picks up runs in this checkout with this host's GPUs (CUDA_VISIBLE_DEVICES of the
# deployment's job variables, or of this environment when the deployment leaves it unset).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$DMTP_REPO"
exec prefect worker start --pool "$DMTP_WORK_POOL" --type process --name "$(hostname)-worker" "$@"
