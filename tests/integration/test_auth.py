"""The servers as several hosts would use them, on loopback: deploy/up.sh with credentials.

With PREFECT_API_AUTH_STRING and MLFLOW_TRACKING_USERNAME/PASSWORD set, up.sh starts the Prefect
server with its API auth string and the MLflow server with its basic-auth app, and the worker
(deploy/worker.sh, one flow run at a time) takes the credentials from its environment.

Asserts: a Prefect client and an MLflow client without credentials (or with wrong ones) are refused;
two authenticated `prefect deployment run`s queued at once on the one worker run one after the
other (start and end times read back through the Prefect client), both complete, and the training
stage's child process logged to the authenticated MLflow server. Both tests share one stack: its
start is most of the cost. About 4 minutes on two shared CPU cores.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from integration.stack import local_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT_AUTH_STRING = "dmtp:prefect-test-secret"
MLFLOW_USERNAME = "dmtp"
MLFLOW_PASSWORD = "mlflow-test-secret"
CREDENTIALS = {
    "PREFECT_API_AUTH_STRING": PREFECT_AUTH_STRING,
    "MLFLOW_TRACKING_USERNAME": MLFLOW_USERNAME,
    "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
}
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def secured_services(tmp_path_factory):
    """deploy/up.sh with credentials in a scratch data root on free ports; deploy/down.sh after."""
    # DMTP_WORKER_LIMIT: worker.sh's default, spelled out, as it is what is under test
    scratch = tmp_path_factory.mktemp("secured")
    with local_stack(scratch, **CREDENTIALS, DMTP_WORKER_LIMIT="1") as env:
        yield env


def _prefect(api_url: str, auth_string: str | None):
    from prefect.client.orchestration import PrefectClient

    return PrefectClient(api_url, auth_string=auth_string)


def _mlflow_client(env: dict[str, str], monkeypatch, username: str | None, password: str | None):
    """An MlflowClient whose requests carry these credentials (none: no Authorization header).

    MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD from the environment at each request.
    """
    import mlflow

    for name, value in (
        ("MLFLOW_TRACKING_USERNAME", username),
        ("MLFLOW_TRACKING_PASSWORD", password),
    ):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])


def test_clients_without_credentials_are_refused(secured_services, monkeypatch):
    from mlflow.exceptions import MlflowException
    from prefect.exceptions import PrefectHTTPStatusError

    api = secured_services["PREFECT_API_URL"]

    async def prefect_checks() -> None:
        async with _prefect(api, PREFECT_AUTH_STRING) as client:
            deployment = await client.read_deployment_by_name("collect-and-train/gpu")
        for auth_string in (None, "dmtp:wrong"):
            async with _prefect(api, auth_string) as client:
                with pytest.raises(PrefectHTTPStatusError) as refused_read:
                    await client.read_deployments()
                with pytest.raises(PrefectHTTPStatusError) as refused_run:
                    await client.create_flow_run_from_deployment(deployment.id)
            assert refused_read.value.response.status_code == 401
            assert refused_run.value.response.status_code == 401

    asyncio.run(prefect_checks())

    for username, password in ((None, None), (MLFLOW_USERNAME, "not-the-password")):
        client = _mlflow_client(secured_services, monkeypatch, username, password)
        with pytest.raises(MlflowException) as refused_read:
            client.search_experiments()
        with pytest.raises(MlflowException) as refused_write:
            client.create_experiment("not-allowed")
        assert refused_read.value.get_http_status_code() == 401
        assert refused_write.value.get_http_status_code() == 401
    client = _mlflow_client(secured_services, monkeypatch, MLFLOW_USERNAME, MLFLOW_PASSWORD)
    assert "not-allowed" not in {e.name for e in client.search_experiments()}


def _submit(env: dict[str, str], parameters: dict) -> str:
    """`prefect deployment run collect-and-train/gpu` (not watched); returns the flow run id."""
    result = subprocess.run(
        ["prefect", "deployment", "run", "collect-and-train/gpu", "--params", json.dumps(parameters)],
        env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )  # fmt: skip
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout)
    assert match, result.stdout + result.stderr
    return match.group(1)


async def _wait_for(api: str, flow_run_ids: list[str], timeout_s: float) -> list:
    """The flow runs once all are final, in the order given."""
    deadline = time.monotonic() + timeout_s
    async with _prefect(api, PREFECT_AUTH_STRING) as client:
        while True:
            runs = [await client.read_flow_run(flow_run_id) for flow_run_id in flow_run_ids]
            if all(run.state_type.value in FINAL_STATES for run in runs):
                return runs
            assert time.monotonic() < deadline, [(r.name, r.state_name) for r in runs]
            await asyncio.sleep(2)


def test_two_authenticated_runs_take_turns_on_one_worker_and_log_to_mlflow(
    secured_services, debug_model_dir, tmp_path, monkeypatch
):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"Say something about {w}."}) + "\n"
            for w in ("rivers", "owls", "salt")
        )
    )
    parameters = {
        "base_model_path": str(debug_model_dir),
        "input_data_path": str(prompts),
        "max_new_tokens": 12,
        "batch_size": 3,
        "num_shards": 1,
        "chunk_rows": 16,
        "rows_per_file": 32,
        "max_steps": 2,
        "per_device_train_batch_size": 16,
        "logging_steps": 1,
        "eval_input_data_path": str(prompts),
        "eval_max_new_tokens": 8,
        "eval_max_prompts": 1,
    }
    # Queued back to back: without the worker's limit both would start within a second. The
    # second asks for the same result, so once it may start it is served from the cache.
    flow_run_ids = [_submit(secured_services, parameters) for _ in range(2)]
    runs = asyncio.run(_wait_for(secured_services["PREFECT_API_URL"], flow_run_ids, 600))
    assert all(run.start_time for run in runs), [(run.name, run.state) for run in runs]
    first, second = sorted(runs, key=lambda run: run.start_time)
    # Checked before the states: runs that overlap also fail (the second finds the shard leased).
    assert first.end_time <= second.start_time, (
        f"flow runs overlapped on one worker: {first.name} ran {first.start_time}..{first.end_time}, "
        f"{second.name} started {second.start_time}"
    )
    for run in runs:
        assert run.state_type.value == "COMPLETED", (run.name, run.state)

    client = _mlflow_client(secured_services, monkeypatch, MLFLOW_USERNAME, MLFLOW_PASSWORD)
    experiment = client.get_experiment_by_name("dmtp")
    trainings = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`dmtp.stage` = 'train'"
    )
    assert trainings and all(run.info.status == "FINISHED" for run in trainings)
    assert {"train/loss", "val/loss"} <= set(trainings[0].data.metrics)
