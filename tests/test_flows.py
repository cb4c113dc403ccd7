"""The flows end to end on a temporary Prefect backend, with the tiny debug model on CPU.

What the orchestration promises: a rerun with the same inputs is served from the cache; a changed
training setting retrains on the cached store; a task that fails once is retried and the flow
completes; a shard killed mid-way is resumed from its committed rows; an output that vanished or
got corrupted is recomputed; a store that fails validation stops the flow before training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

N_PROMPTS = 12
TINY = {  # small enough that a whole flow takes seconds on two CPU cores
    "max_new_tokens": 24,
    "batch_size": 4,
    "chunk_rows": 16,
    "rows_per_file": 32,
    "max_steps": 4,
    "per_device_train_batch_size": 16,
    "logging_steps": 1,
    "save_steps": 100,
    "evaluate": False,
    "export": False,  # test_a_run_exports_the_head_and_publishes_its_results turns both on
}


@pytest.fixture(scope="module")
def prefect_backend(tmp_path_factory):
    """A temporary Prefect server for this module; retries back off 0.5 s instead of minutes."""
    from prefect.testing.utilities import prefect_test_harness

    saved = {k: os.environ.get(k) for k in ("DMTP_RETRY_DELAY_SECONDS", "DMTP_FAIL_ONCE")}
    os.environ["DMTP_RETRY_DELAY_SECONDS"] = "0.5"
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    topics = [
        "tides",
        "bread",
        "volcanoes",
        "owls",
        "glass",
        "maps",
        "bees",
        "ice",
        "paper",
        "salt",
        "rain",
        "wool",
    ]
    path.write_text(
        "".join(json.dumps({"prompt": f"Tell me about {t}."}) + "\n" for t in topics[:N_PROMPTS])
    )
    return path


def _parameters(debug_model_dir: Path, prompts: Path, data_root: Path, **overrides) -> dict:
    return {
        "base_model_path": str(debug_model_dir),
        "input_data_path": str(prompts),
        "data_root": str(data_root),
        **TINY,
        **overrides,
    }


def _serializers(data_root: Path) -> set[str]:
    """How the cached manifests under a data root were written (must be JSON: no pickle)."""
    return {
        json.loads(p.read_text())["metadata"]["serializer"]["type"]
        for p in (data_root / "results").iterdir()
    }


def _task_runs(flow_state) -> dict[str, object]:
    """Task runs of a finished flow run, by task run name ("collect tiny-qwen2 shard 0/2", ...)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])
            )
        )
    return {run.name: run for run in runs}


@pytest.fixture(scope="module")
def first_run(prefect_backend, debug_model_dir, prompts, tmp_path_factory):
    from flows.collect_and_train import collect_and_train

    root = tmp_path_factory.mktemp("first")
    parameters = _parameters(debug_model_dir, prompts, root)
    started = time.perf_counter()
    summary = collect_and_train(**parameters)
    return parameters, summary, time.perf_counter() - started


def test_first_run_collects_validates_and_trains_into_mlflow(first_run):
    import mlflow

    parameters, summary, _ = first_run
    assert summary["cached"] == {"collect": False, "validate": False, "train": False}
    report = json.loads((Path(summary["store"]).parent / "validation.json").read_text())
    assert report["ok"] and report["rows"] == summary["store_rows"] > 0
    assert (Path(summary["head"]) / "model.safetensors").is_file()
    client = mlflow.MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert "train/loss" in run.data.metrics and "val/loss" in run.data.metrics
    # the head: the run's logged model, registered per base model; the run names its flow run
    (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    registered = (summary["registered_model_name"], summary["registered_model_version"])
    assert registered == (version.name, str(version.version))
    assert registered == (f"dmtp-{Path(parameters['base_model_path']).name}", "1")
    assert run.data.tags["prefect.flow_run_name"] == run.info.run_name
    assert run.data.tags["prefect.flow_run_id"]
    assert run.inputs.dataset_inputs[0].dataset.source == json.dumps(
        {"uri": str(Path(summary["store"]).resolve())}
    )
    assert (
        summary["mlflow_tracking_uri"]
        == f"sqlite:///{Path(parameters['data_root']).resolve() / 'mlflow.db'}"
    )


def test_second_run_with_the_same_parameters_is_cached(first_run):
    from flows.collect_and_train import collect_and_train

    parameters, first, first_seconds = first_run
    started = time.perf_counter()
    again = collect_and_train(**parameters)
    seconds = time.perf_counter() - started
    assert again["cached"] == {"collect": True, "validate": True, "train": True}
    assert again["head"] == first["head"] and again["mlflow_run_id"] == first["mlflow_run_id"]
    assert seconds < 0.25 * first_seconds, (
        f"cached run took {seconds:.1f} s, first {first_seconds:.1f} s"
    )


def test_a_changed_training_setting_retrains_without_recollecting(first_run):
    from flows.collect_and_train import collect_and_train

    parameters, first, _ = first_run
    changed = collect_and_train(**{**parameters, "learning_rate": 1e-3})
    assert changed["cached"] == {"collect": True, "validate": True, "train": False}
    assert changed["store"] == first["store"]
    assert changed["head"] != first["head"] and changed["mlflow_run_id"] != first["mlflow_run_id"]


def test_a_larger_data_budget_adds_shards_to_the_same_store(
    prefect_backend, debug_model_dir, prompts, tmp_path
):
    """`make head --data_shards N`: fixed shards, so a larger budget collects only the new ones."""
    from flows.collect_and_train import collect

    parameters = _parameters(debug_model_dir, prompts, tmp_path, prompts_per_shard=4)
    for key in (
        "max_steps",
        "per_device_train_batch_size",
        "learning_rate",
        "logging_steps",
        "save_steps",
        "evaluate",
        "export",
    ):
        parameters.pop(key, None)
    small = collect(**parameters, num_shards=1)
    shard_0 = Path(small["store"]) / "shards" / "0"
    written = {p: p.stat().st_mtime_ns for p in shard_0.rglob("*") if p.is_file()}
    large = collect(**parameters, num_shards=3)
    assert large["store"] == small["store"]
    assert [s["rows"] for s in large["shards"]][0] == small["store_rows"]
    assert large["store_sequences"] == N_PROMPTS and large["store_rows"] > small["store_rows"]
    assert {p: p.stat().st_mtime_ns for p in written} == written, "shard 0 was collected again"


def test_a_run_exports_the_head_and_publishes_its_results(
    prefect_backend, debug_model_dir, prompts, tmp_path
):
    """The export stage writes the DFlash folder (cached on a rerun); the evaluation table and the
    link to the MLflow run are artifacts of the flow run under stable keys, read back through the
    Prefect client, and a second run adds to the same keys' history."""
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.collect_and_train import collect_and_train

    parameters = _parameters(
        debug_model_dir,
        prompts,
        tmp_path,
        evaluate=True,
        export=True,
        eval_max_prompts=2,
        eval_max_new_tokens=12,
        artifact_key="Flow test: tiny",
    )
    state = collect_and_train(**parameters, return_state=True)
    summary = state.result()
    keys = {"table": "flow-test-tiny-evaluation", "link": "flow-test-tiny-mlflow-run"}
    assert summary["artifacts"] == keys
    export = Path(summary["export"])
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["dflash_config"]
    assert (export / "model.safetensors").is_file()
    assert (
        f"| this head | {summary['acceptance_length']:.3f} |" in (export / "README.md").read_text()
    )

    def artifacts(key: str) -> list:
        with get_client(sync_client=True) as client:
            return client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )

    [table] = artifacts(keys["table"])
    assert table.type == "table" and table.flow_run_id == state.state_details.flow_run_id
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    methods = [row["method"] for row in rows]
    assert methods[0] == "head" and "prompt lookup" in methods and methods[-1] == "greedy"
    assert rows[0]["tau"] == round(summary["acceptance_length"], 3)
    assert rows[0]["speedup"] == round(summary["speedup"], 3) and rows[-1]["speedup"] == 1.0
    assert {"acceptance_pos1", "acceptance_pos2", "acceptance_pos3", "tokens_per_s"} <= set(rows[0])
    [link] = artifacts(keys["link"])
    run = mlflow.MlflowClient(summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"])
    page = f"#/experiments/{run.info.experiment_id}/runs/{summary['mlflow_run_id']}"
    assert f"(http://127.0.0.1:5000/{page})" in link.data
    assert "mlflow ui --backend-store-uri sqlite:///" in link.description

    again = collect_and_train(**parameters)
    assert again["cached"]["export"] and again["export"] == summary["export"]
    assert len(artifacts(keys["table"])) == 2 and len(artifacts(keys["link"])) == 2


# ----------------------------------------------------------------------------------------------
# failures: retried, resumed, recomputed, or stopped


@pytest.fixture(scope="module")
def collected(prefect_backend, debug_model_dir, prompts, tmp_path_factory):
    """A `collect` flow run whose collect_shard task fails on its first attempt."""
    from flows.collect_and_train import collect

    parameters = _parameters(
        debug_model_dir, prompts, tmp_path_factory.mktemp("collected"), num_shards=2
    )
    for key in (
        "max_steps",
        "per_device_train_batch_size",
        "logging_steps",
        "save_steps",
        "evaluate",
        "export",
    ):
        parameters.pop(key, None)
    os.environ["DMTP_FAIL_ONCE"] = "collect_shard"
    try:
        state = collect(**parameters, return_state=True)
    finally:
        os.environ.pop("DMTP_FAIL_ONCE")
    return parameters, state


def test_a_task_failing_once_is_retried_and_the_flow_completes(collected):
    _, state = collected
    assert state.is_completed(), state.message
    runs = {
        name: run.run_count
        for name, run in _task_runs(state).items()
        if name.startswith("collect ")
    }
    assert runs == {"collect tiny-qwen2 shard 0/2": 2, "collect tiny-qwen2 shard 1/2": 2}
    assert state.result()["cached"] == {"collect": False, "validate": False}
    assert _serializers(Path(collected[0]["data_root"])) == {"json"}


def test_a_vanished_shard_is_collected_again(collected):
    import shutil

    from flows.collect_and_train import collect

    parameters, state = collected
    before = state.result()
    shutil.rmtree(Path(before["store"]) / "shards" / "1")
    after = collect(**parameters)
    assert [s["cached"] for s in after["shards"]] == [True, False]
    assert after["store_rows"] == before["store_rows"] and after["cached"]["validate"] is False


def test_a_corrupted_cached_shard_is_collected_again(collected):
    """A flipped byte in a cached shard fails validation; the flow re-collects that shard, once."""
    from flows.collect_and_train import collect

    parameters, state = collected
    store = Path(state.result()["store"])
    chunk = next(
        p
        for p in sorted((store / "shards" / "0" / "hidden_states").rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    )
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    repaired = collect(**parameters)
    assert repaired["cached"]["collect"] is False
    assert json.loads((store.parent / "validation.json").read_text())["ok"]


def test_a_shard_killed_mid_way_is_resumed_not_restarted(
    prefect_backend, debug_model_dir, prompts, tmp_path
):
    from dmtp.config import save_config
    from dmtp.store import open_store
    from flows.collect_and_train import collect
    from tasks.collect import collect_config, plan_collection
    from tasks.launch import dmtp_command

    parameters = _parameters(
        debug_model_dir, prompts, tmp_path, batch_size=1, chunk_rows=16, rows_per_file=16
    )
    for key in (
        "max_steps",
        "per_device_train_batch_size",
        "logging_steps",
        "save_steps",
        "evaluate",
        "export",
    ):
        parameters.pop(key, None)
    settings = {
        "max_new_tokens": 24, "batch_size": 1, "max_samples": None, "sample_size": 512, "stride": 256,
        "temperature": 0.0, "seed": 0, "dtype": "auto", "device": "auto",
        "prompts_per_shard": None, "feature_layers": "auto",
        "chunk_rows": 16, "rows_per_file": 16, "compressor": "none",
    }  # fmt: skip
    # The very collection the flow would run, started by hand and SIGKILLed after its first commit.
    plan = plan_collection.fn(str(debug_model_dir), str(prompts), settings, 1, str(tmp_path))
    config = collect_config(
        plan.model.requested,
        plan.prompts.path,
        plan.settings,
        1,
        output_dir=plan.output_dir,
        shard_index=0,
        resume=True,
    )
    child = subprocess.Popen(
        dmtp_command("collect", "--config", str(save_config(config, tmp_path / "config.json"))),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            try:
                if open_store(plan.store_path).shard(0).n_committed > 0:
                    break
            except Exception:  # the store or the shard is still being created
                pass
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    shard = open_store(plan.store_path).shard(0)
    committed = shard.n_committed
    assert 0 < committed and not shard.complete, "the kill did not land mid-way"

    summary = collect(**parameters)
    (facts,) = summary["shards"]
    assert facts["resumed_from_rows"] == committed
    shard = open_store(summary["store"]).shard(0)
    assert (
        shard.complete and shard.n_sequences == N_PROMPTS and summary["cached"]["validate"] is False
    )
    assert "resuming after" in (Path(plan.output_dir) / "logs" / "collect-shard0.log").read_text()


def test_a_store_failing_validation_stops_the_flow_before_training(prefect_backend, tmp_path):
    from dmtp.synthetic import write_synthetic_store
    from flows.collect_and_train import train

    store = write_synthetic_store(
        tmp_path / "data", sequence_lengths=[40, 30, 50], hidden_size=64, vocab_size=320
    )
    tokens = next(
        p
        for p in sorted((Path(store.path) / "shards" / "0" / "tokens").rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    )
    tokens.write_bytes(tokens.read_bytes()[:-7])  # a truncated chunk
    state = train(
        train_data_dir=str(store.path),
        data_root=str(tmp_path / "root"),
        max_steps=2,
        evaluate=False,
        return_state=True,
    )
    assert state.is_failed()
    runs = _task_runs(state)
    assert runs["validate data store"].state.is_failed()
    assert not [name for name in runs if name.startswith("train")]
    assert not (tmp_path / "root" / "heads").exists()


# The settings check: each case is a bad setting a Prefect UI form or a script can pass, and the
# config that refuses it (built in Python here, to show the flow fails with that same message).
INVALID_SETTINGS = {
    "misspelt_choice": ({"scheduler_type": "cosin"}, ("TrainConfig", {"scheduler_type": "cosin"})),
    "choice_in_train_options": (
        {"train_options": {"mixed_precision": "fp8"}},
        ("TrainConfig", {"mixed_precision": "fp8"}),
    ),
    "training_range": ({"learning_rate": 0.0}, ("TrainConfig", {"learning_rate": 0.0})),
    "collection_range": ({"temperature": -1.0}, ("CollectConfig", {"temperature": -1.0})),
    "collection_choice": ({"compressor": "lz4"}, ("StoreLayout", {"compressor": "lz4"})),
    "store_layout": (
        {"chunk_rows": 16, "rows_per_file": 40},
        ("StoreLayout", {"chunk_rows": 16, "rows_per_file": 40}),
    ),
    "evaluation_range": (
        {"evaluate": True, "denoising_steps": 0},
        ("EvalConfig", {"head_path": "h", "denoising_steps": 0}),
    ),
    "device_torchrun_cannot_use": ({"device": "cuda:1"}, ("TrainConfig", {"device": "cuda:1"})),
    "device_no_process_can_use": ({"device": "gpu0"}, ("CollectConfig", {"device": "gpu0"})),
}


@pytest.mark.parametrize("case", sorted(INVALID_SETTINGS))
def test_an_invalid_setting_fails_the_flow_before_any_task_starts(prefect_backend, tmp_path, case):
    import dmtp.config
    from dmtp.errors import DmtpError
    from flows.collect_and_train import collect_and_train

    overrides, (config_name, values) = INVALID_SETTINGS[case]
    with pytest.raises(DmtpError) as direct:
        getattr(dmtp.config, config_name)(**values)
    root = tmp_path / "root"
    state = collect_and_train(
        **_parameters(Path("no-model"), Path("no-prompts.jsonl"), root, **overrides),
        return_state=True,
    )
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, DmtpError) and str(error) == str(direct.value)
    assert "\n" not in str(error)
    assert _task_runs(state) == {}  # not even plan_collection started
    assert not root.exists()
