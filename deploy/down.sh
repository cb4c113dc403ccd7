#!/usr/bin/env bash
# Stop what deploy/up.sh started (worker, MLflow server, Prefect server) by the pids it recorded,
# each with its child processes: SIGTERM, then SIGKILL after a grace period. Data is kept.
set -euo pipefail
source "$(dirname "$0")/env.sh"
pids=()
names=()
for name in worker mlflow-server prefect-server; do
  pid_file="$DMTP_SERVICES_DIR/$name.pid"
  [ -f "$pid_file" ] || continue
  pid="$(cat "$pid_file")"
  rm -f "$pid_file"
  if kill -0 "$pid" 2>/dev/null; then
    pids+=("$pid")
    names+=("$name (pid $pid)")
  fi
done
[ ${#pids[@]} -gt 0 ] || { echo "down: nothing running"; exit 0; }
cd "$DMTP_REPO"
"$DMTP_VENV/bin/python" -c "import sys; from tasks.launch import kill_trees; kill_trees(map(int, sys.argv[1:]))" "${pids[@]}"
printf 'down: stopped %s\n' "${names[@]}"
