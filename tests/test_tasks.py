"""The task helpers without a Prefect server: child processes, leases, CLI flags, cache keys."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from dmtp import lease
from dmtp.cli import build_parser, config_from_args, parse_args, run_command
from dmtp.config import (
    CollectConfig,
    DataConfig,
    EvalConfig,
    StoreLayout,
    TrainConfig,
    save_config,
)
from tasks.caching import digest
from tasks.launch import StageFailed, StageTimedOut, run_stage
from tasks.train import train_config


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_stage_returns_output_and_logs_it(tmp_path):
    run = run_stage("echo", _python("print('hello'); print('world')"), log_path=tmp_path / "a.log")
    assert run.returncode == 0 and run.tail == ["hello", "world"]
    assert "world" in (tmp_path / "a.log").read_text()


def test_user_error_exit_code_is_permanent_and_others_are_not(tmp_path):
    with pytest.raises(StageFailed) as user_error:
        run_stage(
            "bad flag",
            _python("import sys; print('dmtp x: error: bad'); sys.exit(2)"),
            log_path=tmp_path / "b.log",
        )
    assert user_error.value.permanent and "dmtp x: error: bad" in str(user_error.value)
    with pytest.raises(StageFailed) as crash:
        run_stage("crash", _python("raise SystemExit(1)"), log_path=tmp_path / "c.log")
    assert not crash.value.permanent


def test_a_stalled_stage_is_killed_with_its_children(tmp_path):
    """A child that spawns a grandchild and then hangs silently: both are gone after the stall timeout."""
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(120)"
    )
    started = time.monotonic()
    with pytest.raises(StageTimedOut, match="no output and no progress"):
        run_stage("hang", _python(code), log_path=tmp_path / "h.log", stall_timeout_s=2, poll_s=0.2)
    assert time.monotonic() - started < 30
    grandchild = int(pid_file.read_text())
    assert (
        not psutil.pid_exists(grandchild)
        or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    )


def test_activity_on_disk_keeps_a_quiet_stage_alive(tmp_path):
    """Silent on stdout but committing to its output folder: not a stall."""
    out = tmp_path / "out"
    out.mkdir()
    code = (
        "import time, pathlib\n"
        "for i in range(8):\n"
        f"    pathlib.Path({str(out)!r}, f'f{{i}}').write_text('x'); time.sleep(0.5)\n"
    )
    run = run_stage(
        "quiet",
        _python(code),
        log_path=tmp_path / "q.log",
        stall_timeout_s=1.5,
        activity=[out],
        poll_s=0.2,
    )
    assert run.returncode == 0


def test_total_timeout(tmp_path):
    code = "import time\nwhile True:\n    print('tick', flush=True); time.sleep(0.2)"
    with pytest.raises(StageTimedOut, match="still running after"):
        run_stage("busy", _python(code), log_path=tmp_path / "t.log", timeout_s=1.5, poll_s=0.2)


# ----------------------------------------------------------------------------------------------
# leases


def test_lease_is_exclusive_while_its_holder_lives(tmp_path):
    path = tmp_path / "shard-0.json"
    with lease.held(path, "shard 0"):
        with pytest.raises(lease.LeaseHeld, match="shard 0 is being written by pid") as held:
            lease.acquire(path, "shard 0")
    # one line naming the holder: pid, host and since when
    message = str(held.value)
    assert (
        "\n" not in message and f"pid {os.getpid()} on {socket.gethostname()} since 20" in message
    )
    assert not path.exists()  # released
    lease.acquire(path, "shard 0").release()


def test_a_lease_left_by_a_killed_process_is_taken_over_at_once(tmp_path):
    """SIGKILL leaves the lease file behind; the next run must not wait for it."""
    path = tmp_path / "shard-0.json"
    code = (
        "import pathlib, time\nfrom dmtp import lease\n"
        f"lease.acquire(pathlib.Path({str(path)!r}), 'shard 0', ttl_s=3600)\n"
        "print('held', flush=True)\ntime.sleep(120)"
    )
    child = subprocess.Popen(_python(code), stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    child.kill()
    child.wait()
    assert json.loads(path.read_text())["pid"] == child.pid  # the stale lease is still there
    started = time.monotonic()
    taken = lease.acquire(path, "shard 0", ttl_s=3600)
    assert time.monotonic() - started < 1
    assert json.loads(path.read_text())["token"] == taken.record["token"]
    taken.release()


def test_an_expired_lease_of_another_host_is_taken_over(tmp_path):
    path = tmp_path / "shard-1.json"
    path.write_text(
        json.dumps({"host": "elsewhere", "pid": 1, "token": "old", "expires": time.time() - 1})
    )
    lease.acquire(path, "shard 1").release()
    path.write_text(
        json.dumps({"host": "elsewhere", "pid": 1, "token": "old", "expires": time.time() + 60})
    )
    with pytest.raises(lease.LeaseHeld):
        lease.acquire(path, "shard 1")


def test_a_lease_is_handed_down_only_to_the_child_given_its_token(tmp_path):
    """The collect task holds the shard's lease and runs `dmtp collect`, which takes it too."""
    path = tmp_path / "shard-3.json"
    code = (
        "import pathlib\nfrom dmtp import lease\n"
        f"taken = lease.acquire(pathlib.Path({str(path)!r}), 'shard 3')\n"
        "taken.release()\nprint('owned' if taken.owned else 'handed down')"
    )
    with lease.held(path, "shard 3") as parent:
        env = {**os.environ, **lease.handed_down_env([parent])}
        child = subprocess.run(_python(code), env=env, capture_output=True, text=True)
        assert child.stdout.strip() == "handed down", child.stderr
        assert json.loads(path.read_text())["token"] == parent.token  # the child left it alone
        other = subprocess.run(_python(code), capture_output=True, text=True)
        assert (
            other.returncode == 1 and "LeaseHeld: shard 3 is being written by pid" in other.stderr
        )
    assert not path.exists()


def test_a_lease_file_with_junk_in_it_is_taken_over(tmp_path):
    path = tmp_path / "shard-4.json"
    path.write_text('{"host": "elsewh')
    lease.acquire(path, "shard 4").release()


def test_a_busy_shard_and_a_preempted_collection_are_retried_a_bad_input_is_not(tmp_path):
    """The collect task's view of the faults: another writer (ShardBusy) and SIGTERM (exit 75)
    are worth a retry; LeaseHeld is a user error when `dmtp collect` is run by hand."""
    from types import SimpleNamespace

    from tasks.collect import ShardBusy, shard_lease
    from tasks.launch import StagePreempted, retry_unless_permanent

    store = tmp_path / "out" / "collected_data_final"
    with lease.held(lease.shard_lease_path(store, 0), f"shard 0 of {store}"):
        with pytest.raises(ShardBusy, match=f"shard 0 of {store} is being written by pid") as busy:
            with shard_lease(store, 0):
                pass
    with shard_lease(store, 0) as taken:  # free again
        assert taken.path == tmp_path / "out" / "leases" / "shard-0.json"

    def retried(error: Exception) -> bool:
        return retry_unless_permanent(None, None, SimpleNamespace(data=error))

    log = tmp_path / "collect.log"
    assert retried(busy.value)
    assert retried(StagePreempted("exited with code 75", returncode=75, log_path=log, tail=[]))
    assert not retried(lease.LeaseHeld("shard 0 is being written by pid 1"))
    assert not retried(StageFailed("exited with code 2", returncode=2, log_path=log, tail=[]))


def test_a_held_lease_is_renewed(tmp_path):
    path = tmp_path / "shard-2.json"
    held = lease.acquire(path, "shard 2", ttl_s=0.8)
    first = json.loads(path.read_text())["expires"]
    time.sleep(0.6)
    assert json.loads(path.read_text())["expires"] > first
    held.release()


# ----------------------------------------------------------------------------------------------
# Config files: what a task launches must rebuild exactly the config it checked


@pytest.mark.parametrize(
    ("command", "config"),
    [
        (
            "collect",
            CollectConfig(
                base_model_path="m", input_data_path="p.jsonl", output_dir="o", max_new_tokens=7,
                num_shards=3, shard_index=2, resume=True, layout=StoreLayout(chunk_rows=16, rows_per_file=32),
            ),
        ),
        (
            "train",
            TrainConfig(
                train_data_dir="d", output_dir="o", mlflow_log_checkpoints=True, learning_rate=1e-3,
                max_steps=5, validate_sample=0.0, feature_layers="2,15,28", context_window=64,
                init_from_base=True, objective="decode_all", position_decay=7.0,
                data=DataConfig(block_length=3, loss_on="all", anchors_per_sequence=16, max_sequence_rows=512),
            ),
        ),
        ("evaluate", EvalConfig(head_path="h", prompt_lookup=False, max_prompts=2, output="r.json")),
    ],
)  # fmt: skip
def test_a_config_file_round_trips_through_the_cli(command, config, tmp_path):
    path = save_config(config, tmp_path / f"{command}-config.json")
    args = parse_args(build_parser(command), ["--config", str(path)])
    assert config_from_args(type(config), args) == config


def test_flags_beside_a_config_file_override_it(tmp_path):
    config = TrainConfig(train_data_dir="d", learning_rate=1e-3, test_mode=True)
    path = save_config(config, tmp_path / "train-config.json")
    argv = ["--config", str(path), "--warmup_step", "5", "--block-length", "6", "--no-test-mode"]
    rebuilt = config_from_args(TrainConfig, parse_args(build_parser("train"), argv))
    assert (rebuilt.learning_rate, rebuilt.warmup_steps, rebuilt.block_length) == (1e-3, 5, 6)
    assert rebuilt.train_data_dir == "d" and not rebuilt.test_mode


def test_a_config_file_naming_an_unknown_setting_fails_in_one_line(tmp_path, capsys):
    path = tmp_path / "train-config.json"
    path.write_text(json.dumps({"learning_rate": 1e-3, "data": {"block_lenght": 4}}))
    assert run_command("train", ["--config", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"dmtp train: error: --config {path}: 'block_lenght' is not a setting of DataConfig "
        "(the command's --help lists them)"
    )


def test_unknown_or_flow_owned_training_settings_are_refused():
    from dmtp.errors import DmtpError

    with pytest.raises(DmtpError, match="unknown training setting"):
        train_config({"learnin_rate": 1.0})
    with pytest.raises(DmtpError, match="chosen by the flow"):
        train_config({"output_dir": "x"})
    assert train_config({"kappa": 3.0, "block_length": 6}).data.block_length == 6


def test_digest_is_order_independent_and_value_sensitive():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_an_evaluation_is_cached_only_while_the_decoding_code_is_unchanged(tmp_path, monkeypatch):
    import dmtp
    from tasks import caching
    from tasks.evaluate import DECODING_MODULES

    package = tmp_path / "dmtp"
    package.mkdir()
    for name in DECODING_MODULES:
        (package / f"{name}.py").write_text(f"# {name}\n")
    monkeypatch.setattr(dmtp, "__file__", str(package / "__init__.py"))
    before = caching.source_digest(*DECODING_MODULES)
    assert caching.source_digest(*DECODING_MODULES) == before
    (package / "specdec.py").write_text("# specdec, changed\n")
    assert caching.source_digest(*DECODING_MODULES) != before
