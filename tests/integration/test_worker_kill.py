"""A host lost mid-training, on the real stack (deploy/up.sh: Prefect server, MLflow server, one
process worker): the worker and everything under it (the flow run, torchrun, the rank) are killed
with SIGKILL once the training has written a checkpoint, as a dead machine or an OOM kill would
leave them. After a new worker starts, a rerun of the deployment recomputes nothing that was cached
(collect and validate show as Cached), the training resumes from its newest checkpoint, and MLflow
holds one run for the training. About 4-5 minutes on two CPU cores, most of it servers and torch
starting.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from integration.stack import local_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _prefect(env: dict[str, str], *args: str, timeout: float = 450) -> str:
    result = subprocess.run(
        ["prefect", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )
    return result.stdout + result.stderr


def _run_deployment(env: dict[str, str], parameters: dict, watch: bool) -> str:
    """`prefect deployment run collect-and-train/gpu`; returns the flow run id."""
    watching = ["--watch", "--watch-interval", "2", "--watch-timeout", "400"] if watch else []
    output = _prefect(
        env, "deployment", "run", "collect-and-train/gpu", "--params", json.dumps(parameters),
        *watching,
    )  # fmt: skip
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert match, output
    return match.group(1)


def _task_states(env: dict[str, str], flow_run_id: str) -> tuple[str, dict[str, str]]:
    api = env["PREFECT_API_URL"]
    run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30).json()
    tasks = httpx.post(
        f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}}, timeout=30
    ).json()
    return run["state"]["type"], {task["name"]: task["state"]["name"] for task in tasks}


def test_a_worker_killed_mid_training_resumes_from_its_checkpoint_and_recomputes_nothing_cached(
    debug_model_dir, tmp_path
):
    import mlflow

    from dmtp import checkpoint

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"Say something about {w}."}) + "\n"
            for w in ("rivers", "owls", "salt", "maps", "glass", "bees")
        )
    )
    max_steps = 60
    parameters = {
        "base_model_path": str(debug_model_dir),
        "input_data_path": str(prompts),
        "max_new_tokens": 16,
        "batch_size": 3,
        "num_shards": 2,
        "chunk_rows": 16,
        "rows_per_file": 32,
        "max_steps": max_steps,
        "save_steps": 5,
        "per_device_train_batch_size": 16,
        "logging_steps": 1,
        "evaluate": False,
        "export": False,
    }
    with local_stack(tmp_path / "services") as env:
        data_root = Path(env["DMTP_DATA_ROOT"])
        worker = psutil.Process(int((data_root / "services" / "worker.pid").read_text()))
        first_id = _run_deployment(env, parameters, watch=False)

        # kill -9 the whole host's share of the run once a checkpoint is committed
        deadline = time.monotonic() + 300
        while not list(data_root.glob(f"heads/*/checkpoint-*/{checkpoint.STATE_FILE}")):
            assert time.monotonic() < deadline, _task_states(env, first_id)
            time.sleep(0.05)
        doomed = [worker, *worker.children(recursive=True)]
        assert any("torch.distributed.run" in " ".join(p.cmdline()) for p in doomed)
        for process in doomed:
            process.kill()
        psutil.wait_procs(doomed, timeout=30)
        (head_dir,) = data_root.glob("heads/*")
        assert not (head_dir / "final").exists()  # killed mid-training
        newest = checkpoint.list_checkpoints(head_dir)[-1]
        killed_state = checkpoint.read_state(newest)
        first_state, _ = _task_states(env, first_id)
        print(f"killed at {newest.name}; the first flow run is left {first_state}")

        # a new worker on the same host, as its service manager would start it
        subprocess.run(
            ["bash", "-c", "source deploy/env.sh && source deploy/lib.sh && "
             "start_service worker deploy/worker.sh"],
            env=env, check=True, cwd=REPO_ROOT, timeout=60,
        )  # fmt: skip
        started = time.monotonic()
        second_id = _run_deployment(env, parameters, watch=True)
        second_state, second_tasks = _task_states(env, second_id)
        print(f"rerun: {second_state} in {time.monotonic() - started:.0f} s, {second_tasks}")

        assert second_state == "COMPLETED", second_tasks
        name = debug_model_dir.name
        assert second_tasks == {
            f"plan {name}": "Completed",
            f"collect {name} shard 0/2": "Cached",
            f"collect {name} shard 1/2": "Cached",
            f"validate {name} store": "Cached",
            f"train head on {name} (1 proc)": "Completed",
            "publish results to the Prefect UI": "Completed",
        }
        step = killed_state["step"]
        log = (head_dir / "logs" / "train.log").read_text()
        assert f"resuming from {newest} at step {step}" in log
        assert log.count("dmtp train: starting;") == 1  # the first attempt only

        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("dmtp")
        (run,) = client.search_runs(
            [experiment.experiment_id], filter_string="tags.`dmtp.stage` = 'train'"
        )
        assert run.info.run_id == killed_state["mlflow_run_id"]
        assert run.info.status == "FINISHED"
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
        assert steps == set(range(1, max_steps + 1))
        assert run.data.tags["prefect.flow_run_id"] == second_id  # the run that finished it
