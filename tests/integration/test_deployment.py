"""The real thing on loopback: Prefect server, MLflow server and a process worker (deploy/up.sh),
`prefect deploy` of the repo's prefect.yaml, `prefect deployment run`, then deploy/down.sh.

Asserts the flow run completed, the store validated, MLflow holds the training run with metrics,
tags naming the flow run, the store as its `log_input` dataset, and the head as its logged model,
registered as `dmtp-<base model>` with τ and speedup on the version; a second run with the same
parameters is served from the cache in a small fraction of the time; every process the test
started is gone afterwards. About 3-4 minutes on two CPU cores, most of it the servers starting
and the first run's child processes importing torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from integration.stack import local_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """deploy/up.sh in a scratch data root and PREFECT_HOME on free ports; deploy/down.sh after."""
    with local_stack(tmp_path_factory.mktemp("services")) as env:
        yield env


def _run_deployment(env: dict[str, str], parameters: dict) -> str:
    """`prefect deployment run collect-and-train/gpu --watch`; returns the flow run id."""
    result = subprocess.run(
        ["prefect", "deployment", "run", "collect-and-train/gpu", "--params", json.dumps(parameters),
         "--watch", "--watch-interval", "2", "--watch-timeout", "400"],
        env={**env, "PATH": f"{REPO_ROOT / '.venv' / 'bin'}:{env['PATH']}"},
        capture_output=True, text=True, timeout=450, cwd=REPO_ROOT,
    )  # fmt: skip
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout)
    assert match, result.stdout + result.stderr
    return match.group(1)


def _flow_run(env: dict[str, str], flow_run_id: str) -> tuple[dict, dict[str, str]]:
    """The flow run, and its task runs' state names by task run name."""
    api = env["PREFECT_API_URL"]
    run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30).json()
    tasks = httpx.post(
        f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}}, timeout=30
    ).json()
    return run, {task["name"]: task["state"]["name"] for task in tasks}


def test_deployment_runs_the_flow_on_the_worker_and_reruns_from_cache(
    services, debug_model_dir, tmp_path
):
    import mlflow

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"Say something about {w}."}) + "\n"
            for w in ("rivers", "owls", "salt", "maps", "glass", "bees")
        )
    )
    parameters = {
        "base_model_path": str(debug_model_dir),
        "input_data_path": str(prompts),
        "max_new_tokens": 16,
        "batch_size": 3,
        "num_shards": 2,
        "chunk_rows": 16,
        "rows_per_file": 32,
        "max_steps": 4,
        "per_device_train_batch_size": 16,
        "logging_steps": 1,
        "eval_input_data_path": str(prompts),
        "eval_max_new_tokens": 12,
        "eval_max_prompts": 2,
    }

    first_id = _run_deployment(services, parameters)
    first, first_tasks = _flow_run(services, first_id)
    assert first["state"]["type"] == "COMPLETED", (first["state"], first_tasks)
    assert first_tasks == {
        f"plan {debug_model_dir.name}": "Completed",
        f"collect {debug_model_dir.name} shard 0/2": "Completed",
        f"collect {debug_model_dir.name} shard 1/2": "Completed",
        f"validate {debug_model_dir.name} store": "Completed",
        f"train head on {debug_model_dir.name} (1 proc)": "Completed",
        f"evaluate head on {debug_model_dir.name}": "Completed",
        f"export head of {debug_model_dir.name} (dflash)": "Completed",
        "publish results to the Prefect UI": "Completed",
    }

    data_root = Path(services["DMTP_DATA_ROOT"])
    (report_path,) = data_root.glob("stores/*/validation.json")
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["rows"] > 0 and len(report["shards"]) == 2

    client = mlflow.MlflowClient(services["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("dmtp")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`dmtp.stage` = 'train'"
    )
    assert run.info.status == "FINISHED"
    assert {"train/loss", "val/loss", "val/tau"} <= set(run.data.metrics)
    # linked to the flow run that trained it, and named after it
    assert run.info.run_name == first["name"]
    assert run.data.tags["prefect.flow_run_id"] == first_id
    assert run.data.tags["prefect.deployment"] == "collect-and-train/gpu"
    # lineage: the validated store as the run's input, described without reading its rows
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    store = report_path.parent / "collected_data_final"
    assert json.loads(dataset.source) == {"uri": str(store.resolve())}
    assert dataset.name == report_path.parent.name
    profile = json.loads(dataset.profile)
    assert profile["rows"] == report["rows"] and len(profile["shards"]) == 2
    assert profile["prompts_sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    # the head: the run's logged model, registered per base model, τ and speedup on the version
    (output,) = run.outputs.model_outputs
    model_files = {a.path for a in client.list_logged_model_artifacts(output.model_id)}
    assert {"MLmodel", "config.json", "model.safetensors"} <= model_files
    assert not client.list_artifacts(run.info.run_id, "checkpoints")  # they stay local
    (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert version.name == f"dmtp-{debug_model_dir.name}"
    assert version.source == f"models:/{output.model_id}"
    assert float(version.tags["tau"]) >= 1.0 and float(version.tags["speedup"]) > 0
    assert version.tags["evaluation_run_id"] == run.info.run_id
    # the Prefect UI: the evaluation table and the link to this MLflow run, under the keys of
    # flow and deployment (so every run of the deployment adds to one history)
    found = httpx.post(
        f"{services['PREFECT_API_URL']}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [first_id]}}},
        timeout=30,
    ).json()
    by_key = {artifact["key"]: artifact for artifact in found}
    table = by_key["collect-and-train-gpu-evaluation"]
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert [row["method"] for row in rows][0] == "head" and rows[-1]["method"] == "greedy"
    assert abs(rows[0]["tau"] - float(version.tags["tau"])) < 1e-3
    assert run.info.run_id in by_key["collect-and-train-gpu-mlflow-run"]["data"]

    second_id = _run_deployment(services, parameters)
    second, second_tasks = _flow_run(services, second_id)
    assert second["state"]["type"] == "COMPLETED", second["state"]
    # planning and publishing to the Prefect UI run every time; every stage is served from cache
    every_time = ("plan ", "publish ")
    assert {
        name: state for name, state in second_tasks.items() if not name.startswith(every_time)
    } == {name: "Cached" for name in first_tasks if not name.startswith(every_time)}
    assert second["total_run_time"] < 0.25 * first["total_run_time"], (
        second["total_run_time"],
        first["total_run_time"],
    )
    assert (
        len(
            client.search_runs(
                [experiment.experiment_id], filter_string="tags.`dmtp.stage` = 'train'"
            )
        )
        == 1
    )
    assert len(client.search_model_versions(f"name = '{version.name}'")) == 1
