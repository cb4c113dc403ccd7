# Helpers of the deploy scripts: background services with pid files, and waiting for them.
# shellcheck shell=bash

# start_service NAME COMMAND...: run COMMAND detached (own session, so a terminal's Ctrl-C or
# hang-up does not reach it), log to $DMTP_SERVICES_DIR/NAME.log, pid in NAME.pid.
start_service() {
  local name="$1"; shift
  local pid_file="$DMTP_SERVICES_DIR/$name.pid"
  if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    echo "up: $name already running (pid $(cat "$pid_file"))"
    return
  fi
  setsid "$@" >"$DMTP_SERVICES_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$pid_file"
  echo "up: started $name (pid $!, log $DMTP_SERVICES_DIR/$name.log)"
}

# wait_http URL NAME SECONDS: until URL answers 200, or fail showing NAME's log.
wait_http() {
  local url="$1" name="$2" seconds="$3"
  if ! "$DMTP_VENV/bin/python" - "$url" "$seconds" <<'PY'
import sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(1)
PY
  then
    echo "up: $name did not answer at $url; its log:" >&2
    tail -n 30 "$DMTP_SERVICES_DIR/$name.log" >&2
    return 1
  fi
}
