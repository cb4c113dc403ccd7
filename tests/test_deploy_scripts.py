"""deploy/up.sh's access-control rules and deploy/worker.sh's flow-run limit, without starting servers.

up.sh decides on credentials before it creates a folder or starts a process, so a refused call is
checked here in a scratch data root that must stay empty. worker.sh is run against a stand-in
`prefect` executable that prints the command it was given. The servers themselves, with
credentials, are started in tests/integration/test_auth.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    for name in (
        "PREFECT_API_URL",
        "MLFLOW_TRACKING_URI",
        "DMTP_SERVICES_DIR",
        "DMTP_BIND_HOST",
        "DMTP_WORK_POOL",
    ):
        env.pop(name, None)
    env.update(DMTP_DATA_ROOT=str(tmp_path / "runs"), PREFECT_HOME=str(tmp_path / "prefect"))
    env.update(extra)
    return env


def _up(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO_ROOT / "deploy" / "up.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "10.20.30.40", "prefect.internal", "::"])
def test_up_refuses_a_non_loopback_bind_without_credentials(tmp_path, host):
    result = _up(_clean_env(tmp_path, DMTP_BIND_HOST=host))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"up: refusing to bind to {host} without credentials: ")
    for name in CREDENTIALS:
        assert name in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "prefect").exists()


def test_up_refuses_partial_credentials_naming_the_missing_ones(tmp_path):
    env = _clean_env(tmp_path, DMTP_BIND_HOST="0.0.0.0", MLFLOW_TRACKING_USERNAME="dmtp")
    result = _up(env)
    assert result.returncode == 2
    assert result.stderr == (
        "up: credentials are all or none: PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_PASSWORD not set\n"
    )
    assert not (tmp_path / "runs").exists()


def test_up_refuses_an_mlflow_password_the_auth_app_would_reject(tmp_path):
    env = _clean_env(
        tmp_path,
        DMTP_BIND_HOST="0.0.0.0",
        PREFECT_API_AUTH_STRING="dmtp:secret",
        MLFLOW_TRACKING_USERNAME="dmtp",
        MLFLOW_TRACKING_PASSWORD="too-short",
    )
    result = _up(env)
    assert result.returncode == 2
    assert "needs 12 or more" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def _fake_venv(tmp_path: Path) -> Path:
    """A DMTP_VENV whose `prefect` prints its arguments, one a line, instead of starting a worker."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    prefect = bin_dir / "prefect"
    prefect.write_text(f"#!{sys.executable}\nimport sys\nprint('\\n'.join(sys.argv[1:]))\n")
    prefect.chmod(0o755)
    return tmp_path / "venv"


@pytest.mark.parametrize(
    ("limit", "expected"), [(None, ["--limit", "1"]), ("2", ["--limit", "2"]), ("0", [])]
)
def test_worker_runs_one_flow_run_at_a_time_unless_told_otherwise(tmp_path, limit, expected):
    env = _clean_env(tmp_path, DMTP_VENV=str(_fake_venv(tmp_path)))
    env.pop("DMTP_WORKER_LIMIT", None)
    if limit is not None:
        env["DMTP_WORKER_LIMIT"] = limit
    result = subprocess.run(
        [str(REPO_ROOT / "deploy" / "worker.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    args = result.stdout.splitlines()
    assert args[:6] == ["worker", "start", "--pool", "gpu-pool", "--type", "process"]
    assert args[8:] == expected


def test_stage_child_processes_inherit_the_credentials(tmp_path, monkeypatch):
    """Workers pass their environment to flow runs (Prefect's process worker), and tasks to the
    stages they launch: dmtp's MLflow client and the prefect client then read them natively."""
    from tasks.launch import run_stage

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "dmtp")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-password-for-tests")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "dmtp:secret")
    script = f"import os; print(*(os.environ[n] for n in {CREDENTIALS!r}))"
    run = run_stage(
        "env",
        [sys.executable, "-c", script],
        log_path=tmp_path / "env.log",
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"},  # a stage's own variables add to them
    )
    assert run.tail == ["dmtp:secret dmtp a-password-for-tests"]
