"""`dmtp train` under the faults of real clusters (issue 12), each injected for real where this
machine allows: SIGTERM sent to a running training at a random step, ENOSPC raised at a random
checkpoint write, the newest checkpoint truncated or flipped on disk. Every case ends with the
resumed run's loss curve equal to an uninterrupted run's, step for step."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmtp import checkpoint
from dmtp.cli import run_command
from dmtp.config import TrainConfig
from dmtp.errors import DiskFull, Preempted
from dmtp.synthetic import write_synthetic_store
from dmtp.train import LOG_FILE, train

HIDDEN, VOCAB = 32, 16
STEPS = 16  # 7 steps per epoch on the tiny store: a resume crosses epoch boundaries


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "data"
    write_synthetic_store(path, sequence_lengths=[24] * 8, hidden_size=HIDDEN, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="module")
def uninterrupted(tiny_store, tmp_path_factory):
    """The reference: the same training with nothing going wrong."""
    return train(_config(tiny_store, tmp_path_factory.mktemp("uninterrupted") / "out"))


def _config(store: Path, out: Path, tracking_uri: str | None = None, **overrides) -> TrainConfig:
    values = dict(
        train_data_dir=str(store),
        output_dir=str(out),
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        logging_steps=1,
        save_steps=4,
        max_steps=STEPS,
        max_eval_examples=64,
        mlflow_tracking_uri=tracking_uri,
        experiment_name=str(out),
        report_to="mlflow" if tracking_uri else "none",
    )
    values.update(overrides)
    return TrainConfig(**values)


def _flags(config: TrainConfig) -> list[str]:
    flags = [
        f"--train_data_dir={config.train_data_dir}",
        f"--output_dir={config.output_dir}",
        f"--per_device_train_batch_size={config.per_device_train_batch_size}",
        f"--learning_rate={config.learning_rate}",
        f"--logging_steps={config.logging_steps}",
        f"--save_steps={config.save_steps}",
        f"--max_steps={config.max_steps}",
        f"--max_eval_examples={config.max_eval_examples}",
        f"--experiment_name={config.experiment_name}",
        f"--report_to={config.report_to}",
    ]
    if config.mlflow_tracking_uri:
        flags.append(f"--mlflow_tracking_uri={config.mlflow_tracking_uri}")
    return flags


def _assert_same_curve(resumed, uninterrupted) -> None:
    assert sorted(resumed.losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed.losses[step] == uninterrupted.losses[step], step
    assert resumed.metrics == uninterrupted.metrics


def _logged_step(out: Path) -> int:
    try:
        lines = (out / LOG_FILE).read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def test_sigterm_at_a_random_step_saves_a_checkpoint_exits_75_and_resumes_the_same_curve(
    tiny_store, uninterrupted, tmp_path
):
    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    # save_steps past the end: the only checkpoint is the one SIGTERM asks for
    config = _config(tiny_store, out, tracking_uri, save_steps=1000)
    signal_after = random.randint(2, 9)
    print(f"SIGTERM once step {signal_after} is logged")
    process = subprocess.Popen(
        [sys.executable, "-m", "dmtp.train", *_flags(config)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while _logged_step(out) < signal_after and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == Preempted.exit_code == 75, stderr[-3000:]
    (saved,) = checkpoint.list_checkpoints(out)
    step = checkpoint.checkpoint_step(saved)
    print(f"SIGTERM after step {signal_after}: checkpoint-{step} saved, exit 75")
    assert signal_after <= step < STEPS
    assert checkpoint.checkpoint_problem(saved) is None
    assert not (out / "final").exists()
    errors = [line for line in stderr.splitlines() if line.startswith("dmtp train: error:")]
    assert errors == [
        f"dmtp train: error: SIGTERM at step {step}/{STEPS}: saved {saved}; rerun with "
        "--resume_from_checkpoint auto to go on from there"
    ]
    assert "Traceback" not in stderr
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(str(out)).experiment_id])
    assert run.info.status == "KILLED"

    resumed = train(_config(tiny_store, out, tracking_uri, resume_from_checkpoint="auto"))
    _assert_same_curve(resumed, uninterrupted)
    (run,) = client.search_runs([client.get_experiment_by_name(str(out)).experiment_id])
    assert run.info.run_id == resumed.run_id and run.info.status == "FINISHED"


class _DiskFills:
    """Raise ENOSPC at one write of one checkpoint: after the model, the optimizer state, the RNG
    state, or halfway through the state file that would commit the checkpoint."""

    WRITES = ("model", "optimizer", "rng", "state")

    def __init__(self, monkeypatch, at_step: int, write: str):
        self.at_step, self.write, self.step, self.fired = at_step, write, None, False
        save_model = __import__("dmtp.train", fromlist=["Trainer"]).Trainer._save_model
        save_state_dict, save_rng = checkpoint.save_state_dict, checkpoint.save_rng_state

        def model(trainer, folder):
            self.step = trainer.step
            save_model(trainer, folder)
            self._maybe("model")

        def optimizer(state, path):
            save_state_dict(state, path)
            self._maybe("optimizer")

        def rng(folder, rank):
            save_rng(folder, rank)
            self._maybe("rng")

        def commit(tmp, final, state):
            if self._due("state"):
                (tmp / checkpoint.STATE_FILE).write_text(json.dumps(state)[:20])
                self._raise()
            raise AssertionError("unreachable")  # pragma: no cover

        monkeypatch.setattr("dmtp.train.Trainer._save_model", model)
        monkeypatch.setattr(checkpoint, "save_state_dict", optimizer)
        monkeypatch.setattr(checkpoint, "save_rng_state", rng)
        if write == "state":
            original = checkpoint.commit_checkpoint
            monkeypatch.setattr(
                checkpoint,
                "commit_checkpoint",
                lambda tmp, final, state: (
                    commit(tmp, final, state) if self._due("state") else original(tmp, final, state)
                ),
            )

    def _due(self, write: str) -> bool:
        return not self.fired and write == self.write and self.step == self.at_step

    def _maybe(self, write: str) -> None:
        if self._due(write):
            self._raise()

    def _raise(self) -> None:
        self.fired = True
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_at_a_random_checkpoint_write_commits_nothing_and_resume_completes(
    tiny_store, uninterrupted, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    config = _config(tiny_store, out)
    at_step = random.choice([4, 8, 12])  # save_steps 4
    write = random.choice(_DiskFills.WRITES)
    fault = _DiskFills(monkeypatch, at_step, write)
    code = run_command("train", _flags(config))
    stderr = capsys.readouterr().err
    print(f"ENOSPC at the {write} write of checkpoint-{at_step}")

    assert fault.fired and code == DiskFull.exit_code
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, stderr[-3000:]
    print(errors[0])
    assert errors[0].startswith(
        f"dmtp train: error: no space left on the device of {out} for checkpoint-{at_step} "
    )
    assert "a checkpoint needs about" in errors[0] and "MB are free" in errors[0]
    assert "Traceback" not in stderr
    # nothing that looks like a checkpoint of that step, nothing half-written left behind
    assert [checkpoint.checkpoint_step(p) for p in checkpoint.list_checkpoints(out)] == list(
        range(4, at_step, 4)
    )
    assert not (out / f"checkpoint-{at_step}").exists()
    assert not list(out.glob(".*.tmp")) and not (out / "final").exists()

    monkeypatch.undo()  # space freed
    resumed = train(_config(tiny_store, out, resume_from_checkpoint="auto"))
    _assert_same_curve(resumed, uninterrupted)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(
    tiny_store, uninterrupted, tmp_path, capsys, damage
):
    out = tmp_path / "out"
    train(_config(tiny_store, out))  # checkpoints 4, 8, 12 and the final head
    newest = out / "checkpoint-12"
    victim = newest / ("model.safetensors" if damage == "truncated" else "optimizer.safetensors")
    data = bytearray(victim.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0x01  # a flipped bit in a tensor: the file still opens
    victim.write_bytes(bytes(data))
    capsys.readouterr()

    resumed = train(_config(tiny_store, out, resume_from_checkpoint="auto"))
    stderr = capsys.readouterr().err
    warnings = [line for line in stderr.splitlines() if "warning" in line]
    print(warnings)
    reason = "has" if damage == "truncated" else "does not match its crc32c"
    assert len(warnings) == 1 and f"skipping {newest} ({victim.name} {reason}" in warnings[0]
    assert warnings[0].endswith(f"resuming from {out / 'checkpoint-8'} instead")
    assert f"resuming from {out / 'checkpoint-8'} at step 8" in stderr
    _assert_same_curve(resumed, uninterrupted)


def test_the_train_task_turns_sigterm_into_a_retryable_preemption_and_the_retry_resumes(
    tiny_store, tmp_path
):
    """The Prefect task's own code path (`train_head.fn`, as Prefect calls it on each attempt):
    torchrun gets SIGTERM at a random step and forwards it; torchrun exits 1, the task reads the
    ranks' record and fails the attempt as retryable StagePreempted; the next attempt resumes."""
    import threading

    import psutil
    from mlflow.tracking import MlflowClient

    from tasks.launch import StagePreempted, retry_unless_permanent
    from tasks.manifests import ModelRef, StoreManifest
    from tasks.train import head_dir, train_head

    store = StoreManifest(
        store_path=str(tiny_store), identity_sha256="0" * 64,
        model=ModelRef(requested=None, name="synthetic", fingerprint="0"),
        rows=192, sequences=8, bytes_on_disk=0, report_path="", shard_rows=[192],
    )  # fmt: skip
    settings = {
        "max_steps": STEPS, "save_steps": 1000, "per_device_train_batch_size": 16,
        "learning_rate": 3e-3, "logging_steps": 1, "max_eval_examples": 64,
    }  # fmt: skip
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = head_dir(store, settings, 1, str(tmp_path))
    signal_after = random.randint(2, 9)

    def preempt() -> None:
        while _logged_step(out) < signal_after:
            time.sleep(0.005)
        (torchrun,) = [
            child
            for child in psutil.Process().children()
            if "torch.distributed.run" in child.cmdline()
        ]
        torchrun.send_signal(signal.SIGTERM)  # torchrun passes it on to its ranks

    sender = threading.Thread(target=preempt, daemon=True)
    sender.start()
    with pytest.raises(StagePreempted) as preempted:
        train_head.fn(store, settings, str(tmp_path), tracking_uri, stall_timeout_s=None)
    sender.join(timeout=5)
    print(preempted.value.args[0].splitlines()[0])
    (saved,) = checkpoint.list_checkpoints(out)
    assert f"stopped by SIGTERM at step {checkpoint.checkpoint_step(saved)}" in str(preempted.value)
    assert signal_after <= checkpoint.checkpoint_step(saved) < STEPS
    failed = type("State", (), {"data": preempted.value})()
    assert retry_unless_permanent(None, None, failed)  # Prefect retries it

    head = train_head.fn(store, settings, str(tmp_path), tracking_uri, stall_timeout_s=None)
    log = (out / "logs" / "train.log").read_text()
    assert f"resuming from {saved} at step {checkpoint.checkpoint_step(saved)}" in log
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dmtp").experiment_id])
    assert run.info.run_id == head.mlflow_run_id and run.info.status == "FINISHED"


def test_a_real_full_disk_stops_training_with_one_line_and_resume_completes(
    tiny_store, uninterrupted, tmp_path
):
    """The same on a real 512 KiB tmpfs (root only): the first checkpoint fits, the second does
    not. Then the filesystem grows ("space is freed") and the resume completes the uninterrupted
    curve."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = disk / "out"
        with pytest.raises(DiskFull) as full:
            train(_config(tiny_store, out))
        print(full.value)
        assert checkpoint.is_disk_full(full.value.__cause__)
        assert "\n" not in str(full.value) and f"of {out} for checkpoint-8 " in str(full.value)
        assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-4"]
        assert not list(out.glob(".*.tmp")) and not (out / "final").exists()

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        resumed = train(_config(tiny_store, out, resume_from_checkpoint="auto"))
        _assert_same_curve(resumed, uninterrupted)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_training_killed_before_its_first_checkpoint_resumes_into_the_same_mlflow_run(
    tiny_store, tmp_path
):
    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    config = _config(tiny_store, out, tracking_uri, max_steps=4, save_steps=1000)
    process = subprocess.run(
        [sys.executable, "-m", "dmtp.train", *_flags(config)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "DMTP_TEST_KILL_AT_STEP": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert not checkpoint.list_checkpoints(out)

    resumed = train(
        _config(
            tiny_store,
            out,
            tracking_uri,
            max_steps=4,
            save_steps=1000,
            resume_from_checkpoint="auto",
        )
    )
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(str(out)).experiment_id])
    assert run.info.run_id == resumed.run_id and run.info.status == "FINISHED"


def _losses(out: Path) -> dict[int, float]:
    lines = (out / LOG_FILE).read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


def test_sigterm_to_one_of_two_ranks_stops_both_at_the_same_step(tiny_store, tmp_path):
    """torchrun, 2 CPU ranks, SIGTERM to rank 1 only: the ranks agree on the step, both save into
    one checkpoint, rank 0 alone reports it; the resumed run's losses equal an uninterrupted 2-rank
    run's."""
    import psutil

    def torchrun(out: Path, *extra: str) -> subprocess.Popen:
        config = _config(tiny_store, out, per_device_train_batch_size=8, save_steps=1000)
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", "-m", "dmtp.train", *_flags(config), "--train_ratio=0.75",
             *extra],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    reference = torchrun(tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stdout.read()[-3000:]

    out = tmp_path / "out"
    process = torchrun(out)
    signal_after = random.randint(2, 9)
    deadline = time.monotonic() + 240
    while _logged_step(out) < signal_after and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    (rank1,) = [
        child
        for child in psutil.Process(process.pid).children()
        if child.environ().get("RANK") == "1"
    ]
    rank1.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0  # torchrun: 1, whatever its ranks exit with
    (saved,) = checkpoint.list_checkpoints(out)
    step = checkpoint.checkpoint_step(saved)
    print(f"SIGTERM to rank 1 after step {signal_after}: both ranks saved checkpoint-{step}")
    assert signal_after <= step < STEPS
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors"} <= {
        p.name for p in saved.iterdir()
    }
    assert output.count("dmtp train: error: SIGTERM at step") == 1, output[-3000:]
    assert "exitcode  : 75" in output  # torchrun's report of each rank's exit

    resumed = torchrun(out, "--resume_from_checkpoint=auto")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()[-3000:]
    assert _losses(out) == _losses(tmp_path / "reference")
