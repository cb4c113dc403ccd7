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
from dmtp.train import (
    count_blocks,
    diffusion_loss,
    draft_counts,
    make_dataloaders,
    plan_training,
    summarize_draft_counts,
    train,
)

HIDDEN, VOCAB = 32, 16
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


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

    from dmtp.head import load_head

    head = load_head(result.final_dir).eval()  # its own vocabulary: the store names no base model
    assert head.config.owns_vocabulary and head.config.feature_layers == [-1]
    train_dl, _ = make_dataloaders(config, plan_training(config), rank=0, world_size=1)
    counts: dict[str, torch.Tensor] = {}
    for batch in train_dl:
        for key, value in draft_counts(head, head, batch, head.config.mask_token_id).items():
            counts[key] = counts.get(key, 0) + value
    assert counts["tau_count"].item() == 44  # 22 full blocks of 3 in each 24-row sequence
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
        # validation takes whole sequences, an equal number per rank: 2 of the 8, one each
        "--train_ratio=0.75",
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
    # checkpoints stay local; the final head is the run's logged model, registered per base model
    assert client.list_artifacts(run.info.run_id) == []
    (output,) = run.outputs.model_outputs
    head_files = {Path(a.path).name for a in client.list_logged_model_artifacts(output.model_id)}
    assert head_files == {"MLmodel", "config.json", "model.safetensors"}
    (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert version.name == "dmtp-no-base-model"  # the synthetic store names no base model
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["registered_model_version"] == str(version.version)
    assert summary["mlflow_tracking_uri"] == tracking_uri

    from dmtp.head import MTPHeadModel

    head = MTPHeadModel.from_pretrained(out / "final")
    assert head.config.block_length == 4 and head.config.mask_token_id == VOCAB
    _no_pickle_under(out, Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts")


def test_final_head_gives_the_trained_models_logits(tiny_store, tmp_path):
    result = train(_config(tiny_store, tmp_path / "out", max_steps=3))
    from dmtp.head import MTPHeadModel, load_head

    a = MTPHeadModel.from_pretrained(result.final_dir).eval()
    b = load_head(tmp_path / "out" / "final").eval()
    hidden = torch.randn(5, 7, HIDDEN)  # 7 context rows of the final state
    ids = torch.full((5, 4), VOCAB)
    ids[:, 0] = torch.arange(5)
    with torch.no_grad():
        logits = a(in_hidden_states=hidden, input_ids=ids).logits
        assert logits.shape == (5, 4, VOCAB + 1)  # its own vocabulary plus the mask row
        assert torch.equal(logits, b(in_hidden_states=hidden, input_ids=ids).logits)
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
        (["--vocab_size=8"], "--vocab_size 8 is smaller than the store's vocabulary 16"),
        (["--mask_token_id=17"], "--mask_token_id 17 is outside the vocabulary [0, 17)"),
        (["--feature_layers=5"], "--feature_layers 5: layer(s) [5] not in the store"),
        (["--feature_layers=2,x"], "--feature_layers '2,x': use auto, last, or layer indices"),
        (["--context_window=0"], "context_window must be >= 1, got 0"),
        (["--position_decay=-1"], "position_decay must be >= 0, got -1"),
        (["--init_from_base"], "--init_from_base needs a base model"),
        (
            ["--model_name_or_path={debug_model}"],
            "not a dmtp head; pass a base model as --base_model_path",
        ),
        (["--train_data_dir={tmp}/nowhere"], "no such store"),
        (["--train_data_dir={corrupt}"], "fails validation"),
    ],
    ids=[
        "block_length",
        "hidden_size",
        "vocab",
        "mask_outside",
        "feature_layers",
        "feature_layers_syntax",
        "context_window",
        "position_decay",
        "init_without_base",
        "base_as_head",
        "missing_store",
        "corrupt_store",
    ],
)
def test_bad_configuration_stops_before_training(
    tiny_store, tmp_path, capsys, debug_model_dir, flags, expected
):
    corrupt = tmp_path / "corrupt"
    if any("{corrupt}" in flag for flag in flags):
        write_synthetic_store(
            corrupt, sequence_lengths=[24] * 4, hidden_size=HIDDEN, vocab_size=VOCAB
        )
        _corrupt_hidden_states(corrupt)
    flags = [
        flag.format(tmp=tmp_path, corrupt=corrupt, debug_model=debug_model_dir) for flag in flags
    ]
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
    from dmtp.checkpoint import load_state_dict, save_state_dict
    from dmtp.errors import DmtpError

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


def test_head_from_a_base_model_borrows_its_embedding_and_lm_head(debug_model_dir, tmp_path):
    import numpy as np
    from safetensors import safe_open

    from dmtp.head import load_base_model_parts, load_head
    from dmtp.store import open_store

    store = tmp_path / "data"
    write_synthetic_store(store, sequence_lengths=[20] * 4, hidden_size=64, vocab_size=320)
    config = _config(store, tmp_path / "out", max_steps=3, base_model_path=str(debug_model_dir))
    plan = plan_training(config)
    # the mask is the largest token id the base model never output in the store
    outputs = np.concatenate([np.asarray(s.array("tokens")[:]) for s in open_store(store).shards()])
    unused = sorted(set(range(320)) - set(outputs.tolist()))
    assert (plan.vocab_size, plan.mask_token_id) == (320, unused[-1])

    result = train(config)
    with safe_open(result.final_dir / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
    assert not any("embed" in n or "lm_head" in n for n in names)  # borrowed, never saved
    head = load_head(result.final_dir)
    base = load_base_model_parts(str(debug_model_dir))
    assert not head.config.owns_vocabulary and head.config.vocab_size == 320
    assert head.config.mask_token_id == plan.mask_token_id
    assert head.config.base_model["fingerprint"] == base.identity["fingerprint"]
    assert head.config.num_target_layers == 2 and head.config.feature_layers == [-1]
    head.attach_base(base.embeddings, base.lm_head)
    states = head(in_hidden_states=torch.randn(2, 5, 64), input_ids=torch.full((2, 4), 7))
    torch.testing.assert_close(states.logits, states.hidden_states[:, 0] @ base.lm_head.T)


def test_init_from_base_starts_the_draft_layer_from_the_last_base_layer(debug_model_dir, tmp_path):
    from safetensors.torch import load_file

    from dmtp.train import build_or_load_head

    store = tmp_path / "data"
    write_synthetic_store(store, sequence_lengths=[20] * 2, hidden_size=64, vocab_size=320)
    config = _config(
        store, tmp_path / "out", base_model_path=str(debug_model_dir), init_from_base=True
    )
    head = build_or_load_head(config, plan_training(config))
    weights = load_file(str(debug_model_dir / "model.safetensors"))
    for name in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight"):
        assert torch.equal(head.layers[0].get_parameter(name), weights[f"model.layers.1.{name}"])
    config.init_from_base = False
    fresh = build_or_load_head(config, plan_training(config))
    assert not torch.equal(
        fresh.layers[0].mlp.up_proj.weight, weights["model.layers.1.mlp.up_proj.weight"]
    )


def test_a_head_continues_training_with_the_base_model_its_store_names(debug_model_dir, tmp_path):
    """Pretrain on one store, go on from that head on another: the base model whose vocabulary the
    head borrows comes from the store's record, as for a new head, with no --base_model_path."""
    import zarr

    from dmtp.head import load_base_model_parts, load_head

    identity = load_base_model_parts(str(debug_model_dir)).identity
    stores = []
    for name in ("pretrain", "finetune"):
        store = tmp_path / name
        write_synthetic_store(store, sequence_lengths=[20] * 4, hidden_size=64, vocab_size=320)
        recorded = {**identity, "name_or_path": str(debug_model_dir)}
        zarr.open_group(store, mode="a").attrs.update({"base_model": recorded})
        stores.append(store)
    first = train(_config(stores[0], tmp_path / "first", max_steps=2))
    second = train(
        _config(
            stores[1], tmp_path / "second", max_steps=2, model_name_or_path=str(first.final_dir)
        )
    )
    head = load_head(second.final_dir)
    assert not head.config.owns_vocabulary
    assert head.config.base_model["fingerprint"] == identity["fingerprint"]


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
    assert config.objective == "decode_all" and config.feature_layers == "auto"  # the defaults
    dflash = (
        "--train_data_dir data --output_dir out --feature_layers 2,15,28 --context_window 512 "
        "--objective decode --position_decay 7 --init_from_base --anchors_per_sequence 32 "
        "--max_sequence_rows 1024"
    )
    config = config_from_args(TrainConfig, parser.parse_args(dflash.split()))
    assert config.feature_layers == "2,15,28" and config.context_window == 512
    assert config.objective == "decode"
    assert config.position_decay == 7.0 and config.init_from_base
    assert (config.data.anchors_per_sequence, config.data.max_sequence_rows) == (32, 1024)


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


# ----------------------------------------------------------------------------------------------
# the step functions on anchored batches


class LogitsAreStates(torch.nn.Module):
    """A stand-in head whose LM head is the identity: the states it is given are the logits."""

    def compute_logits(self, states: torch.Tensor) -> torch.Tensor:
        return states

    draft_logits = compute_logits  # no draft vocabulary: every token may be drafted

    def draft_token_ids(self, device=None) -> None:
        return None

    def to_draft_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels


def test_draft_counts_score_greedy_one_step_drafts():
    labels = torch.tensor([[
        [5, 1, 2, 3],                # full block: drafts right, wrong, right -> τ = 2
        [6, 4, 0, -100],             # not full: per-position counts only
        [-100, -100, -100, -100],    # padding
    ]])  # fmt: skip
    predicted = torch.tensor([[[0, 1, 9, 3], [0, 4, 0, 0], [0, 0, 0, 0]]])
    seen = {}

    def model(**kwargs):
        seen.update(kwargs)
        logits = torch.nn.functional.one_hot(predicted, 10).float()
        return type("Out", (), {"hidden_states": logits})()

    batch = {
        "labels": labels,
        "anchors": torch.tensor([[3, 8, -1]]),
        "context_features": torch.zeros(1, 10, 1, 4),
        "context_mask": torch.ones(1, 10, dtype=torch.bool),
    }
    counts = draft_counts(model, LogitsAreStates(), batch, mask_token_id=9)
    # the model saw what decoding sees: the bonus token, then MASK
    assert seen["input_ids"].tolist() == [[[5, 9, 9, 9], [6, 9, 9, 9], [0, 9, 9, 9]]]
    assert seen["anchors"] is batch["anchors"] and seen["with_logits"] is False
    assert counts["valid"].tolist() == [2, 2, 2, 1]
    assert counts["correct"].tolist() == [2, 2, 1, 1]
    assert (counts["tau_sum"].item(), counts["tau_count"].item()) == (2, 1)
    metrics = summarize_draft_counts(counts, prefix="")
    assert metrics == {
        "accuracy_pos1": 1.0, "accuracy_pos2": 0.5, "accuracy_pos3": 1.0, "draft_accuracy": 0.8, "tau": 2.0,
    }  # fmt: skip
    assert count_blocks(batch) == 2


@pytest.mark.parametrize("objective", ["decode", "decode_all", "seed"])
def test_diffusion_loss_feeds_the_objectives_blocks_and_replays_from_the_generator(
    tiny_store, tmp_path, objective
):
    from dmtp.head import build_head
    from dmtp.schedules import get_schedule

    config = _config(tiny_store, tmp_path / "out", objective=objective)
    plan = plan_training(config)
    train_dl, _ = make_dataloaders(config, plan, rank=0, world_size=1)
    batch = next(iter(train_dl))
    assert count_blocks(batch) <= config.per_device_train_batch_size
    head = build_head(
        hidden_size=HIDDEN, vocab_size=plan.vocab_size, mask_token_id=plan.mask_token_id,
        block_length=4, feature_layers=plan.feature_layers, num_target_layers=-1,
    )  # fmt: skip
    fed = []

    def model(**kwargs):
        fed.append(kwargs["input_ids"])
        return head(**kwargs)

    def loss(seed: int) -> torch.Tensor:
        return diffusion_loss(
            model, head, batch, schedule=get_schedule("linear"), loss_weight_type="scheduler",
            time_epsilon=1e-3, mask_token_id=plan.mask_token_id, objective=objective,
            position_decay=0.0, generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    first = loss(0)
    assert torch.isfinite(first) and first.item() > 0
    assert loss(0).item() == first.item()
    if objective != "decode_all":  # decode_all's block is always the same: nothing is drawn
        assert loss(1).item() != first.item()
    ids, labels = fed[0], batch["labels"]
    real = labels != -100
    clean = ids == labels
    masked = ids == plan.mask_token_id
    assert (clean | masked)[real].all() and masked[~real].all()
    if objective != "seed":
        assert clean[..., 0][real[..., 0]].all()  # the bonus token is always given
    if objective == "decode_all":
        assert masked[..., 1:].all()
    first.backward()
    assert head.fc.weight.grad.abs().sum() > 0


def test_draft_vocabulary_is_the_most_frequent_outputs_without_the_mask(tiny_store, tmp_path):
    import numpy as np

    from dmtp.store import open_store
    from dmtp.train import draft_vocabulary

    counts = np.array([5, 9, 9, 1, 0, 7, 9])
    assert draft_vocabulary(counts, 3, mask_token_id=6) == [1, 2, 5]  # 6 is frequent, but the mask
    assert draft_vocabulary(counts, 3, mask_token_id=1) == [2, 5, 6]
    assert draft_vocabulary(counts, 0, 6) is None and draft_vocabulary(counts, 7, 6) is None

    plan = plan_training(_config(tiny_store, tmp_path / "out", draft_vocab_size=8))
    outputs = np.concatenate(
        [np.asarray(s.array("tokens")[:]) for s in open_store(tiny_store).shards()]
    )
    frequency = np.bincount(outputs, minlength=VOCAB)
    chosen = plan.draft_vocab
    assert len(chosen) == 8 and chosen == sorted(chosen) and plan.mask_token_id not in chosen
    others = [i for i in range(VOCAB) if i not in chosen]
    assert min(frequency[chosen]) >= max(frequency[others])
    assert plan_training(_config(tiny_store, tmp_path / "out")).draft_vocab is None


def test_per_device_batch_size_counts_blocks(tiny_store, tmp_path):
    config = _config(
        tiny_store, tmp_path / "out", per_device_train_batch_size=12,
        data=DataConfig(anchors_per_sequence=4),
    )  # fmt: skip
    train_dl, val_dl = make_dataloaders(config, plan_training(config), rank=0, world_size=1)
    batches = list(train_dl)
    assert len(batches) == len(train_dl) == 3  # 7 training sequences, 3 a batch
    assert all(b["anchors"].shape == (len(b["anchors"]), 4) for b in batches)
    assert [count_blocks(b) for b in batches] == [12, 12, 4]
    assert sum(count_blocks(b) for b in val_dl) == 4  # the one validation sequence
