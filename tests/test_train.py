"""`dmtp train`: overfitting, torchrun on CPU, kill + resume, MLflow, reload, bad configurations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmtp.cli import run_command
from dmtp.config import DataConfig, TrainConfig
from dmtp.synthetic import write_synthetic_store
from dmtp.train import draft_counts, summarize_draft_counts, train

HIDDEN, VOCAB = 32, 16
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@pytest.fixture(autouse=True)
def one_thread():
    # Two threads on a shared 2-core box spin-wait each other: a 20k-parameter step takes 100 ms
    # instead of 7. One thread is also what the subprocesses below get (OMP_NUM_THREADS=1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite tracking store for the module: creating its tables takes seconds."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "data"
    write_synthetic_store(path, sequence_lengths=[24] * 8, hidden_size=HIDDEN, vocab_size=VOCAB)
    return path


def _config(store: Path, out: Path, tracking_uri: str | None = None, **overrides) -> TrainConfig:
    values = dict(
        train_data_dir=str(store),
        output_dir=str(out),
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        logging_steps=1,
        save_steps=1000,
        max_eval_examples=64,
        mlflow_tracking_uri=tracking_uri,
        experiment_name=str(out),  # one experiment per training in the shared tracking store
        report_to="mlflow" if tracking_uri else "none",
    )
    values.update(overrides)
    return TrainConfig(**values)


def _subprocess_env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def _cli_flags(config: TrainConfig) -> list[str]:
    return [
        f"--train_data_dir={config.train_data_dir}",
        f"--output_dir={config.output_dir}",
        f"--per_device_train_batch_size={config.per_device_train_batch_size}",
        f"--learning_rate={config.learning_rate}",
        f"--logging_steps={config.logging_steps}",
        f"--save_steps={config.save_steps}",
        f"--max_steps={config.max_steps}",
        f"--max_eval_examples={config.max_eval_examples}",
        f"--mlflow_tracking_uri={config.mlflow_tracking_uri}",
        f"--experiment_name={config.experiment_name}",
    ]


def _runs(config: TrainConfig):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment_name)
    return client, client.search_runs([experiment.experiment_id])


def _no_pickle_under(*folders: Path) -> None:
    for folder in folders:
        for path in folder.rglob("*"):
            assert path.suffix not in PICKLE_SUFFIXES, path
            if path.is_file():
                assert path.read_bytes()[:2] != b"\x80\x04", f"{path} is a pickle"


def test_tiny_head_overfits_a_tiny_store(tmp_path):
    store = tmp_path / "data"
    write_synthetic_store(store, sequence_lengths=[24, 24], hidden_size=HIDDEN, vocab_size=VOCAB)
    config = _config(
        store,
        tmp_path / "out",
        data=DataConfig(block_length=3, train_ratio=1.0),
        per_device_train_batch_size=48,
        max_steps=500,
        learning_rate=1e-2,
        loss_weight_type="ones",
        logging_steps=100,
    )
    result = train(config)

    losses = [result.losses[step] for step in sorted(result.losses)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last <= 0.1 * first, (first, last)

    from dmtp.data import create_dataloaders
    from dmtp.head import MTPHeadModel

    head = MTPHeadModel.from_pretrained(result.final_dir).eval()
    loader, _, _ = create_dataloaders(store, block_length=3, batch_size=48, train_ratio=1.0)
    counts: dict[str, torch.Tensor] = {}
    for batch in loader:
        for key, value in draft_counts(head, batch, head.config.mask_token_id).items():
            counts[key] = counts.get(key, 0) + value
    metrics = summarize_draft_counts(counts, prefix="")
    assert metrics["draft_accuracy"] >= 0.95, metrics
    assert metrics["tau"] >= 2.9, metrics  # τ <= L = 3
    _no_pickle_under(tmp_path / "out")


def test_kill_and_resume_continue_the_same_loss_curve(tiny_store, tracking_uri, tmp_path):
    steps, kill_at = 8, 4  # 7 steps per epoch: the resumed run crosses an epoch boundary
    uninterrupted = train(
        _config(tiny_store, tmp_path / "a" / "out", max_steps=steps, save_steps=3)
    )

    killed = _config(
        tiny_store, tmp_path / "b" / "out", tracking_uri, max_steps=steps, save_steps=3
    )
    process = subprocess.run(
        [sys.executable, "-m", "dmtp.train", *_cli_flags(killed)],
        env={**_subprocess_env(), "DMTP_TEST_KILL_AT_STEP": str(kill_at)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert not (tmp_path / "b" / "out" / "final").exists()
    assert (tmp_path / "b" / "out" / "checkpoint-3" / "trainer_state.json").exists()

    resumed = train(
        _config(
            tiny_store,
            tmp_path / "b" / "out",
            tracking_uri,
            max_steps=steps,
            save_steps=3,
            resume_from_checkpoint="auto",
        )
    )
    assert sorted(resumed.losses) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert resumed.losses[step] == uninterrupted.losses[step], step
    assert resumed.metrics == uninterrupted.metrics

    # one MLflow run per training: the resumed run continued the killed one
    client, runs = _runs(killed)
    assert len(runs) == 1 and runs[0].info.run_id == resumed.run_id
    assert runs[0].info.status == "FINISHED"
    history = client.get_metric_history(resumed.run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, steps + 1))
    _no_pickle_under(tmp_path / "b")


def test_torchrun_two_cpu_processes_keep_identical_weights(tiny_store, tracking_uri, tmp_path):
    out = tmp_path / "out"
    config = _config(
        tiny_store, out, tracking_uri, max_steps=4, save_steps=2, per_device_train_batch_size=8
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "dmtp.train", *_cli_flags(config), "--check_replicas_steps=1",
    ]  # fmt: skip
    process = subprocess.run(
        command, env=_subprocess_env(), capture_output=True, text=True, timeout=240
    )
    assert process.returncode == 0, process.stderr[-3000:]
    identical = [
        line for line in process.stderr.splitlines() if "weights identical on 2 ranks" in line
    ]
    assert [line.split("step ")[1].split(":")[0] for line in identical] == ["1", "2", "3", "4"]
    assert process.stdout.count("head: ") == 1  # only rank 0 reports

    client, runs = _runs(config)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id in process.stdout
    assert run.data.params["resolved.world_size"] == "2"
    assert run.data.params["data.block_length"] == "4"
    assert run.data.params["learning_rate"] == "0.003"
    for metric in (
        "train/loss", "train/learning_rate", "train/grad_norm", "train/examples_per_second",
        "val/loss", "val/tau", "val/accuracy_pos1", "val/accuracy_pos3",
    ):  # fmt: skip
        assert metric in run.data.metrics, metric
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"head", "checkpoints"} <= artifacts
    head_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "head")}
    assert head_files == {"config.json", "model.safetensors"}

    from dmtp.head import MTPHeadModel

    head = MTPHeadModel.from_pretrained(out / "final")
    assert head.config.block_length == 4 and head.config.mask_token_id == VOCAB
    _no_pickle_under(out, Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts")


def test_final_head_gives_the_trained_models_logits(tiny_store, tmp_path):
    result = train(_config(tiny_store, tmp_path / "out", max_steps=3))
    from dmtp.head import MTPHeadModel, load_head

    a = MTPHeadModel.from_pretrained(result.final_dir).eval()
    b = load_head(tmp_path / "out" / "final").eval()
    hidden = torch.randn(5, HIDDEN)
    ids = torch.full((5, 4), VOCAB)
    with torch.no_grad():
        assert torch.equal(
            a(in_hidden_states=hidden, input_ids=ids).logits,
            b(in_hidden_states=hidden, input_ids=ids).logits,
        )
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["step"] == 3


def _corrupt_hidden_states(store: Path) -> None:
    chunk_files = sorted(
        p
        for p in (store / "shards" / "0" / "hidden_states").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    data = bytearray(chunk_files[0].read_bytes())
    data[len(data) // 3] ^= 0xFF
    chunk_files[0].write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--block_length=0"], "block_length must be >= 1, got 0"),
        (
            [f"--hidden_size={HIDDEN + 1}"],
            f"--hidden_size {HIDDEN + 1} != the store's hidden size {HIDDEN}",
        ),
        (["--vocab_size=8"], "--vocab_size 8 is too small: the store"),
        (["--mask_token_id=3", "--vocab_size=16"], "--mask_token_id 3 occurs as a real token"),
        (["--train_data_dir={tmp}/nowhere"], "no such store"),
        (["--train_data_dir={corrupt}"], "fails validation"),
    ],
    ids=[
        "block_length",
        "hidden_size",
        "vocab",
        "mask_collision",
        "missing_store",
        "corrupt_store",
    ],
)
def test_bad_configuration_stops_before_training(tiny_store, tmp_path, capsys, flags, expected):
    corrupt = tmp_path / "corrupt"
    if any("{corrupt}" in flag for flag in flags):
        write_synthetic_store(
            corrupt, sequence_lengths=[24] * 4, hidden_size=HIDDEN, vocab_size=VOCAB
        )
        _corrupt_hidden_states(corrupt)
    flags = [flag.format(tmp=tmp_path, corrupt=corrupt) for flag in flags]
    argv = [
        f"--train_data_dir={tiny_store}",
        f"--output_dir={tmp_path / 'out'}",
        "--report_to=none",
        *flags,
    ]
    code = run_command("train", argv)
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(error) == 1 and error[0].startswith("dmtp train: error: "), error
    assert expected in error[0]
    assert not (tmp_path / "out").exists()  # stopped before anything was trained or written


@pytest.mark.parametrize(("name", "stage"), [("zero2.json", 2), ("zero3.json", 3)])
def test_shipped_deepspeed_configs_take_their_sizes_from_the_flags(name, stage):
    from dmtp.train import deepspeed_config

    path = Path(__file__).resolve().parents[1] / "deploy" / "deepspeed" / name
    config = TrainConfig(
        deepspeed=str(path),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
    )
    values = deepspeed_config(config)
    assert values["zero_optimization"]["stage"] == stage
    assert values["train_micro_batch_size_per_gpu"] == 8
    assert values["gradient_accumulation_steps"] == 2
    assert values["gradient_clipping"] == 0.5
    assert "train_batch_size" not in values
    if stage == 3:  # the final head is gathered into one file on save
        assert values["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_flag_errors_name_the_file(tmp_path):
    from dmtp.errors import DmtpError
    from dmtp.train import deepspeed_config

    with pytest.raises(DmtpError, match="no such file"):
        deepspeed_config(TrainConfig(deepspeed=str(tmp_path / "nope.json")))
    (tmp_path / "bad.json").write_text("{stage: 2")
    with pytest.raises(DmtpError, match="not valid JSON"):
        deepspeed_config(TrainConfig(deepspeed=str(tmp_path / "bad.json")))


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    from dmtp.errors import DmtpError
    from dmtp.train import load_state_dict, save_state_dict

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    save_state_dict(optimizer.state_dict(), tmp_path / "optimizer")
    restored = load_state_dict(tmp_path / "optimizer")
    original = optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(restored["state"][0][key], original["state"][0][key])
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(restored)  # what resume does

    with pytest.raises(DmtpError, match="without pickle"):
        save_state_dict({"scaler": object()}, tmp_path / "other")
    (tmp_path / "forged.json").write_text(json.dumps({"__object__": "os:system", "__state__": {}}))
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "forged.safetensors"))
    with pytest.raises(DmtpError, match="refusing to rebuild"):
        load_state_dict(tmp_path / "forged")


def test_head_from_a_base_model_keeps_its_frozen_embedding_and_lm_head(debug_model_dir, tmp_path):
    from dmtp.head import MTPHeadModel, load_base_model_parts

    store = tmp_path / "data"
    write_synthetic_store(store, sequence_lengths=[20] * 4, hidden_size=64, vocab_size=320)
    config = _config(store, tmp_path / "out", max_steps=3, base_model_path=str(debug_model_dir))
    result = train(config)
    head = MTPHeadModel.from_pretrained(result.final_dir)
    base = load_base_model_parts(str(debug_model_dir))
    assert torch.equal(head.embed_tokens.weight[:320], base.embeddings)
    assert torch.equal(head.lm_head.weight[:320], base.lm_head)
    assert head.config.base_model["fingerprint"] == base.identity["fingerprint"]
    assert type(head.layers[0]).__name__ == "Qwen2DecoderLayer"


def test_base_model_other_than_the_stores_is_refused(debug_model_dir, tmp_path, capsys):
    import zarr

    store = tmp_path / "data"
    write_synthetic_store(store, sequence_lengths=[20] * 4, hidden_size=64, vocab_size=320)
    recorded = {"name_or_path": "some/model", "fingerprint": "0" * 32, "hidden_state": "h"}
    zarr.open_group(store, mode="a").attrs.update({"base_model": recorded})
    argv = [
        f"--train_data_dir={store}",
        f"--output_dir={tmp_path / 'out'}",
        f"--base_model_path={debug_model_dir}",
        "--report_to=none",
    ]
    assert run_command("train", argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "train with the model that made the hidden states" in error[0]


def test_the_original_guides_command_lines_parse():
    from dmtp.cli import build_parser, config_from_args

    parser = build_parser("train")
    guide_31 = (
        "--model_name_or_path heads/mtpmodel --train_data_dir data/prompt_000001 --output_dir ckpt "
        "--block_length 4 --per_device_train_batch_size 128 --dataloader_num_workers 8 "
        "--num_train_epochs 100 --learning_rate 5e-5 --warmup_step 500 --logging_steps 100 "
        "--save_steps 10000 --test-mode"
    )
    config = config_from_args(TrainConfig, parser.parse_args(guide_31.split()))
    assert config.warmup_steps == 500 and config.test_mode and config.model_name_or_path
    assert config.max_steps == 20 and config.logging_steps == 1  # what --test-mode caps
    guide_32 = (
        "--num_hidden_layers 1 --vocab_size 151936 --train_data_dir data --output_dir ./mtp_checkpoints "
        "--block_length 4 --per_device_train_batch_size 32 --num_train_epochs 3 --learning_rate 1e-4 "
        "--scheduler_type linear --loss_weight_type scheduler --hidden_size 3584 --mask_token_id 151935 "
        "--pad_token_id 151643 --max_samples 100 --train_ratio 0.9 --time_epsilon 0.01 "
        "--warmup_steps 1000 --deepspeed deploy/deepspeed/zero2.json"
    )
    config = config_from_args(TrainConfig, parser.parse_args(guide_32.split()))
    assert (config.vocab_size, config.hidden_size, config.mask_token_id) == (151936, 3584, 151935)
    assert config.data.max_samples == 100 and config.data.train_ratio == 0.9
    assert config.time_epsilon == 0.01 and config.deepspeed.endswith("zero2.json")


def test_allow_incomplete_trains_on_the_committed_rows_of_an_interrupted_store(tmp_path):
    """--allow_incomplete must get past the trainer's own validation, which flags `complete`."""
    import zarr

    from dmtp.config import DataConfig, TrainConfig
    from dmtp.errors import DmtpError
    from dmtp.synthetic import write_synthetic_store
    from dmtp.train import plan_training, validate_before_training

    store = write_synthetic_store(
        tmp_path / "s", sequence_lengths=[40] * 6, hidden_size=16, vocab_size=64
    )
    zarr.open_group(store.path / "shards" / "0", mode="a").attrs.update({"complete": False})
    strict = TrainConfig(
        train_data_dir=str(store.path),
        output_dir=str(tmp_path / "o"),
        report_to="none",
        data=DataConfig(allow_incomplete=True),
    )
    validate_before_training(strict, plan_training(strict))  # no error: only `complete` is unset
    strict.data.allow_incomplete = False
    with pytest.raises(DmtpError):
        validate_before_training(strict, plan_training(strict))
