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

# is_loopback HOST: true for addresses only this machine can reach (127.0.0.0/8, ::1, localhost).
is_loopback() {
  case "$1" in
    127.*|localhost|::1|"[::1]") return 0 ;;
    *) return 1 ;;
  esac
}

# http_status URL [CREDENTIALS]: the HTTP status of a GET of URL (000 when nothing answers), sent
# with `Authorization: Basic base64(CREDENTIALS)` when given. Prefect's auth string and MLflow's
# user:password travel the same way. The credentials go through the environment, not argv (ps).
http_status() {
  DMTP_HTTP_CREDENTIALS="${2:-}" "$DMTP_VENV/bin/python" - "$1" <<'PY'
import base64, os, sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[1])
if credentials := os.environ["DMTP_HTTP_CREDENTIALS"]:
    request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
try:
    with urllib.request.urlopen(request, timeout=10) as response:
        print(response.status)
except urllib.error.HTTPError as error:
    print(error.code)
except OSError:
    print("000")
PY
}
