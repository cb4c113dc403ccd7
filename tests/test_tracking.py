"""dmtp.tracking against a real MLflow server on 127.0.0.1 (SQLite backend, proxied artifacts).

What a training run records (params, tags from the launcher, the store as a dataset input, the
head as a logged and registered model), and what an evaluation adds (metrics, τ and speedup on
the registered version), all read back through MlflowClient as a user of the UI would see them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from dmtp.config import TrainConfig
from dmtp.errors import DmtpError
from dmtp.synthetic import write_synthetic_store
from dmtp.tracking import (
    RUN_TAGS_ENV,
    Tracker,
    experiment_id,
    log_evaluation,
    registered_model_name,
    resolve_tracking_uri,
    run_tags_from_environment,
    store_dataset,
)

HIDDEN, VOCAB = 32, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> str:
    """`mlflow server --workers 1` on a free loopback port (~15 s to start); its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "mlartifacts"),
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        # the server's own session: its gunicorn/uvicorn workers go with it
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "run-a" / "collected_data_final"
    write_synthetic_store(
        path, sequence_lengths=[12, 20, 8], hidden_size=HIDDEN, vocab_size=VOCAB, num_shards=2
    )
    return path


def _tiny_head(folder: Path) -> Path:
    from dmtp.head import build_head

    head = build_head(
        hidden_size=HIDDEN, vocab_size=VOCAB + 1, mask_token_id=VOCAB, block_length=4,
        feature_layers=[-1], num_target_layers=-1,
    )  # fmt: skip
    head.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------
# no server needed


def test_one_rule_resolves_the_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path / "runs") == (
        f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}"
    )
    assert resolve_tracking_uri(None, None) is None  # dmtp evaluate with nothing recorded: off
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://mlflow.internal:5000"
    assert resolve_tracking_uri(None, None) == "http://mlflow.internal:5000"
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


def test_the_flows_and_the_trainer_share_that_rule(tmp_path, monkeypatch):
    from flows.collect_and_train import resolve_tracking_uri as flow_rule

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert flow_rule(None, tmp_path) == resolve_tracking_uri(None, tmp_path)
    config = TrainConfig(output_dir=str(tmp_path / "heads" / "run1"))
    assert Tracker(config, enabled=False).tracking_uri == resolve_tracking_uri(
        None, tmp_path / "heads"
    )


@pytest.mark.parametrize(
    ("base_model", "name"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", "dmtp-Qwen2.5-7B-Instruct"),
        ("/models/tiny qwen2/", "dmtp-tiny-qwen2"),
        ("models/SmolLM2-135M-Instruct.Q4_1.gguf", "dmtp-SmolLM2-135M-Instruct.Q4_1"),
        (None, "dmtp-no-base-model"),
    ],
)
def test_registered_model_name_is_one_per_base_model(base_model, name):
    assert registered_model_name(base_model) == name


def test_run_tags_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(RUN_TAGS_ENV, raising=False)
    assert run_tags_from_environment() == {}
    monkeypatch.setenv(RUN_TAGS_ENV, json.dumps({"prefect.flow_run_id": "abc", "empty": ""}))
    assert run_tags_from_environment() == {"prefect.flow_run_id": "abc"}
    monkeypatch.setenv(RUN_TAGS_ENV, "[1, 2]")
    with pytest.raises(DmtpError, match="must be a JSON object"):
        run_tags_from_environment()


def test_the_store_dataset_is_built_from_metadata(store):
    dataset = store_dataset(store)
    assert dataset.name == "run-a"
    assert json.loads(dataset.source.to_json())["uri"] == str(store.resolve())
    assert dataset.profile["rows"] == 40 and dataset.profile["sequences"] == 3
    assert [s["rows"] for s in dataset.profile["shards"]] == [20, 20]
    assert dataset.profile["hidden_size"] == HIDDEN and dataset.profile["vocab_size"] == VOCAB
    assert store_dataset(store).digest == dataset.digest and len(dataset.digest) == 16


# ----------------------------------------------------------------------------------------------
# against the server


def test_experiments_are_made_once_by_one_rule(client, mlflow_server):
    first = experiment_id(client, "shared", mlflow_server)
    assert experiment_id(client, "shared", mlflow_server) == first
    client.delete_experiment(first)
    with pytest.raises(DmtpError, match="is deleted .* restore it"):
        experiment_id(client, "shared", mlflow_server)


def test_a_training_run_records_its_store_flow_run_and_registered_head(
    client, mlflow_server, store, tmp_path, monkeypatch
):
    from mlflow.artifacts import download_artifacts

    from dmtp.head import load_head

    monkeypatch.setenv(
        RUN_TAGS_ENV,
        json.dumps({"prefect.flow_run_id": "f-123", "prefect.deployment": "collect-and-train/gpu"}),
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = TrainConfig(
        train_data_dir=str(store),
        output_dir=str(tmp_path / "out"),
        mlflow_tracking_uri=mlflow_server,
        experiment_name="training",
        run_name="collect-and-train tiny x2 shards",
    )
    tracker = Tracker(config, enabled=True)
    tracker.start(config, None, {"learning_rate": 0.003}, {"dmtp.stage": "train"}, store)
    tracker.log_metrics({"val/tau": 1.5}, step=3)
    head_dir = _tiny_head(tmp_path / "out" / "final")
    recorded = tracker.log_head(head_dir, 3, "dmtp-tiny", {"block_length": "4"})
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server  # what MLflow's fluent API reads
    tracker.finish()
    # handed back: a later training in this process resolves its own store
    assert "MLFLOW_TRACKING_URI" not in os.environ

    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "collect-and-train tiny x2 shards"
    assert run.data.tags["prefect.flow_run_id"] == "f-123"
    assert run.data.tags["prefect.deployment"] == "collect-and-train/gpu"
    assert run.data.params["learning_rate"] == "0.003"

    # the store as the run's input: identity and counts, no data
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == "run-a" and dataset.digest == store_dataset(store).digest
    assert json.loads(dataset.source)["uri"] == str(store.resolve())
    assert json.loads(dataset.profile)["rows"] == 40
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"

    # the head: a logged model of the run, registered, and loadable from the registry
    (output,) = run.outputs.model_outputs
    assert output.model_id == recorded["mlflow_model_id"] and output.step == 3
    model = client.get_logged_model(output.model_id)
    assert model.name == "head" and model.source_run_id == tracker.run_id
    assert {m.key: m.value for m in model.metrics}["val/tau"] == 1.5
    assert recorded["registered_model_name"] == "dmtp-tiny"
    version = client.get_model_version("dmtp-tiny", recorded["registered_model_version"])
    assert version.run_id == tracker.run_id and version.tags["block_length"] == "4"
    assert version.source == f"models:/{output.model_id}"
    assert client.get_registered_model("dmtp-tiny").description
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # where models:/ URIs resolve
    folder = Path(
        download_artifacts(f"models:/dmtp-tiny/{version.version}", dst_path=tmp_path / "dl")
    )
    assert {p.name for p in folder.iterdir()} >= {"MLmodel", "config.json", "model.safetensors"}
    assert not [p for p in folder.rglob("*") if p.suffix in {".pkl", ".pt", ".bin"}]
    reloaded, original = load_head(folder), load_head(head_dir)
    for name, tensor in original.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    # only the final head was uploaded: no checkpoint or head copy among the run's artifacts
    assert client.list_artifacts(tracker.run_id) == []

    # evaluation: into the training run, τ and speedup onto the registered version
    (tmp_path / "evaluation.json").write_text("{}")
    evaluated = log_evaluation(
        mlflow_server,
        metrics={"eval/head/tau": 2.25, "eval/head/speedup": 1.4},
        params={"max_new_tokens": 16},
        files=[tmp_path / "evaluation.json"],
        summary="head τ=2.25 speedup 1.40x",
        version_tags={"tau": "2.2500", "speedup": "1.4000"},
        run_id=tracker.run_id,
    )
    assert evaluated == tracker.run_id
    version = client.get_model_version("dmtp-tiny", version.version)
    assert version.tags["tau"] == "2.2500" and version.tags["speedup"] == "1.4000"
    assert version.tags["evaluation_run_id"] == tracker.run_id
    assert version.description == "head τ=2.25 speedup 1.40x"
    metrics = {m.key: m.value for m in client.get_logged_model(output.model_id).metrics}
    assert metrics["eval/head/tau"] == 2.25
    run = client.get_run(tracker.run_id)
    assert run.data.metrics["eval/head/tau"] == 2.25
    assert "max_new_tokens" not in run.data.params  # a training run's params are left alone
    assert [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")] == [
        "evaluation/evaluation.json"
    ]


def test_an_evaluation_without_a_run_gets_its_own_linked_run(client, mlflow_server, tmp_path):
    (tmp_path / "evaluation.json").write_text("{}")
    training = client.create_run(experiment_id(client, "other", mlflow_server)).info.run_id
    run_id = log_evaluation(
        mlflow_server,
        metrics={"eval/head/tau": 1.1},
        params={"max_new_tokens": 16},
        files=[tmp_path / "evaluation.json"],
        summary="head τ=1.10",
        version_tags={},
        experiment="evaluations",
        linked_run_id=training,
    )
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "evaluate"
    assert run.data.tags["dmtp.evaluates_run"] == training
    assert run.data.params["eval.max_new_tokens"] == "16"
    assert client.get_experiment(run.info.experiment_id).name == "evaluations"


def test_dmtp_evaluate_joins_the_run_its_head_was_trained_in(
    client, mlflow_server, debug_model_dir, tmp_path, monkeypatch
):
    """`dmtp train` then `dmtp evaluate` with no tracking flags: the evaluation finds the training
    run and its store through train_summary.json and tags the registered version."""
    from dmtp.config import DataConfig, EvalConfig
    from dmtp.evaluate import evaluate, recorded_training
    from dmtp.train import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "data"
    write_synthetic_store(store, sequence_lengths=[20] * 4, hidden_size=64, vocab_size=320)
    trained = train(
        TrainConfig(
            train_data_dir=str(store),
            output_dir=str(tmp_path / "out"),
            base_model_path=str(debug_model_dir),
            data=DataConfig(train_ratio=1.0),
            per_device_train_batch_size=16,
            max_steps=2,
            mlflow_tracking_uri=mlflow_server,
            experiment_name="chain",
        )
    )
    assert recorded_training(trained.final_dir) == {
        "mlflow_run_id": trained.run_id,
        "mlflow_tracking_uri": mlflow_server,
    }
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Tell me about owls."}) + "\n")
    result = evaluate(
        EvalConfig(
            base_model_path=str(debug_model_dir),
            head_path=str(trained.final_dir),
            input_data_path=str(prompts),
            max_new_tokens=8,
            warmup_tokens=2,
            device="cpu",
        ),
        progress=False,
    )
    # a new evaluation run linked to the training run, in the store the training logged to
    evaluation = client.get_run(result["mlflow_run_id"])
    assert evaluation.data.tags["dmtp.evaluates_run"] == trained.run_id
    assert client.get_experiment(evaluation.info.experiment_id).name == "chain"  # beside it
    (version,) = client.search_model_versions(f"run_id = '{trained.run_id}'")
    assert version.name == f"dmtp-{debug_model_dir.name}"
    tau = result["drafters"]["head"]["overall"]["tau"]
    assert version.tags["tau"] == f"{tau:.4f}" and "prompt_lookup_tau" in version.tags
    assert version.tags["evaluation_run_id"] == evaluation.info.run_id
