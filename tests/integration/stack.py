"""The local orchestration stack for integration tests: deploy/up.sh on free ports, down.sh after."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("prefect-server", "mlflow-server", "worker")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_stack(scratch: Path, **settings: str) -> Iterator[dict[str, str]]:
    """Prefect server, MLflow server and one worker in a scratch data root and PREFECT_HOME;
    yields the environment that talks to them (`settings` go to up.sh, e.g. credentials)."""
    env = {
        k: v
        for k, v in os.environ.items()
        # never talk to a server this machine happens to point at
        if k
        not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "DMTP_SERVICES_DIR", "PREFECT_PROFILE")
    }
    env.update(
        DMTP_DATA_ROOT=str(scratch / "runs"),
        PREFECT_HOME=str(scratch / "prefect"),
        PREFECT_PORT=str(free_port()),
        MLFLOW_PORT=str(free_port()),
        PREFECT_WORKER_QUERY_SECONDS="1",  # pick a scheduled run up within a second, not ten
        DMTP_RETRY_DELAY_SECONDS="1",
        **settings,
    )
    env["PATH"] = f"{REPO_ROOT / '.venv' / 'bin'}:{env['PATH']}"
    services_dir = scratch / "runs" / "services"
    pids: dict[str, int] = {}
    try:
        subprocess.run(
            [str(REPO_ROOT / "deploy" / "up.sh")], env=env, check=True, timeout=300, cwd=REPO_ROOT
        )
        pids = {name: int((services_dir / f"{name}.pid").read_text()) for name in SERVICES}
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
        yield env
    finally:
        subprocess.run([str(REPO_ROOT / "deploy" / "down.sh")], env=env, timeout=120, cwd=REPO_ROOT)
        from tasks.launch import kill_trees

        kill_trees(pids.values(), grace_s=5)  # only if down.sh failed: never leave them behind
        alive = [
            name
            for name, pid in pids.items()
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]
        assert not alive, f"still running after deploy/down.sh: {alive}"


class MlflowServer:
    """`mlflow server --workers 1` on 127.0.0.1, as deploy/up.sh starts it (a SQLite store and
    proxied artifacts in `root`), alone: for tests that kill it and start it again on the same
    store. Its own session, so `kill` takes its worker processes too."""

    def __init__(self, root: Path, port: int | None = None, niceness: int = 0):
        self.root = root
        self.niceness = niceness  # >0: yields the CPU to the test's own processes
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> float:
        """Start it and wait for /health; returns the seconds that took."""
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    "nice", "-n", str(self.niceness),
                    sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                    "--port", str(self.port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                    "--artifacts-destination", str(self.root / "mlartifacts"),
                ],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
            )  # fmt: skip
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() - started > timeout_s:
                log_text = (self.root / "server.log").read_text()[-3000:]
                self.kill()
                raise RuntimeError(f"mlflow server did not start:\n{log_text}")
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL the server and its workers, as a crashed host or an OOM kill would."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
