"""A real MLflow server SIGKILLed mid-training for longer than MLflow's retry budget, then started
again on the same store (issue 12): training keeps its pace through the outage, the run completes,
and every metric point it logged is in MLflow afterwards.

MLflow's HTTP retry budget is made short through MLflow's own settings
(`MLFLOW_HTTP_REQUEST_MAX_RETRIES=2`, backoff factor 1: about 3 s instead of ~4 min), so the
outage outlasts it many times over in a test of ~2 minutes; `dmtp train` runs as it does in
production, as a subprocess against the server's URL.

Throughput is steps per second between two moments, read from the training's own log (`step N/M`
lines, timed as they arrive). The two CPU cores are shared with other work, whose load swings the
rate of any process several-fold within seconds; so a control training (the same settings,
`--report_to none`) runs beside it, and what is compared is the MLflow training's rate as a
fraction of the control's over the same seconds, before the kill and during the outage: side by
side in one run, the machine's load cancels out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dmtp.outbox import SPILL_FILE
from dmtp.synthetic import write_synthetic_store
from integration.stack import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 8000  # ~120 s at ~65 steps/s on two shared CPU cores, with the control beside it
WARMUP_STEPS = 50
# throughput measured this long before the kill: two identical trainings' rates differ by up to
# 20 % over 4 s on these shared cores, by a few % over half a minute
BEFORE_S = 30
OUTAGE_HOLD_S = 12  # the server stays dead this long before it is started again (then 15-40 s)
STEP_LINE = re.compile(r"^dmtp train: step (\d+)/\d+ train/loss=")


class Training:
    """`dmtp train` as a subprocess; its stderr read as it comes, each `step N/M` line timed.

    Its stderr goes to a file, not a pipe: a test process slow to read (the cores are busy) must
    not stall the training on a full pipe.
    """

    def __init__(self, flags: list[str], env: dict[str, str], log_path: Path):
        self.times: list[tuple[float, int]] = []
        self.lines: list[str] = []
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dmtp.train", *flags],
                env=env, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        self._reader = threading.Thread(target=self._read, args=(log_path,), daemon=True)
        self._reader.start()

    def _read(self, log_path: Path) -> None:
        with open(log_path) as log:
            partial = ""
            while True:
                exited = self.process.poll() is not None
                chunk = log.readline()
                if not chunk:
                    if exited:
                        return
                    time.sleep(0.01)
                    continue
                partial += chunk
                if not partial.endswith("\n"):
                    continue
                line, partial = partial, ""
                now = time.monotonic()
                self.lines.append(line)
                match = STEP_LINE.match(line)
                if match:
                    self.times.append((now, int(match.group(1))))

    def step(self) -> int:
        """The last step logged so far."""
        return self.times[-1][1] if self.times else 0

    def longest_pause(self, start: float, end: float) -> float:
        """The longest time between two step lines in [start, end]."""
        times = [t for t, _ in self.times if start <= t <= end]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def tail(self) -> str:
        """The last 40 lines that are not step lines, and the last step line."""
        other = [line for line in self.lines if not STEP_LINE.match(line)][-40:]
        steps = [line for line in self.lines[-5:] if STEP_LINE.match(line)][-1:]
        return "".join(other + steps)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join(timeout=10)
        return "".join(self.lines)


def _wait_for(condition, timeout_s: float, training: Training) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert training.process.poll() is None, training.tail()
        assert time.monotonic() < deadline, training.tail()
        time.sleep(0.05)


def _rates(start: tuple[float, int, int], end: tuple[float, int, int]) -> tuple[float, float]:
    """Steps per second of the MLflow training and of the control between two marks."""
    seconds = end[0] - start[0]
    return (end[1] - start[1]) / seconds, (end[2] - start[2]) / seconds


def test_training_keeps_its_pace_through_an_mlflow_outage_and_loses_no_point(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "data"
    write_synthetic_store(store, sequence_lengths=[24] * 8, hidden_size=32, vocab_size=16)
    out = tmp_path / "heads" / "outage"
    # niced: on these two cores, its start-up must not take the trainings' CPU
    server = MlflowServer(tmp_path / "mlflow", niceness=10)
    server.start()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    common = [
        f"--train_data_dir={store}", "--per_device_train_batch_size=16", "--logging_steps=1",
        "--save_steps=100000", "--max_eval_examples=64",
    ]  # fmt: skip
    tracked = Training(
        [*common, f"--output_dir={out}", f"--max_steps={STEPS}",
         f"--mlflow_tracking_uri={server.url}", "--experiment_name=outage",
         "--mlflow_registered_model=none"],
        env,
        tmp_path / "tracked.log",
    )  # fmt: skip
    control = Training(
        [*common, f"--output_dir={tmp_path / 'control'}", f"--max_steps={4 * STEPS}",
         "--report_to=none"],
        env,
        tmp_path / "control.log",
    )  # fmt: skip

    def mark() -> tuple[float, int, int]:
        return time.monotonic(), tracked.step(), control.step()

    try:
        _wait_for(lambda: min(tracked.step(), control.step()) >= WARMUP_STEPS, 120, tracked)
        started = mark()
        _wait_for(lambda: time.monotonic() >= started[0] + BEFORE_S, 60, tracked)
        killed = mark()
        server.kill()
        # the outbox gives up on the server once MLflow's retries are spent (~3 s)
        _wait_for(lambda: any("is unreachable" in x for x in tracked.lines), 60, tracked)
        gave_up_after = time.monotonic() - killed[0]
        _wait_for(lambda: time.monotonic() >= killed[0] + OUTAGE_HOLD_S, 60, tracked)
        restart_seconds = server.start()
        back = mark()
        assert tracked.process.poll() is None, "training ended in the outage: raise STEPS"
        control.stop()
        tracked.process.wait(timeout=300)
    finally:
        control.stop()
        log = tracked.stop()
    try:
        assert tracked.process.returncode == 0, log[-3000:]
        (before, control_before), (during, control_during) = (
            _rates(started, killed),
            _rates(killed, back),
        )
        # Tracking never makes training faster than the control: a share above 1 before the kill
        # is load noise (up to 9 % over 30 s here), and dividing by it would count that noise
        # twice (a 0.965 share in the outage read as 89 %).
        share_before = min(1.0, before / control_before)
        share_during = during / control_during
        print(
            f"steps/s before the kill {before:.1f} (control {control_before:.1f}, "
            f"{killed[0] - started[0]:.0f} s); during the {back[0] - killed[0]:.0f} s outage "
            f"{during:.1f} (control {control_during:.1f}): {share_during / share_before:.0%} of "
            f"the pace before, beside the control; the outbox gave up on the server after "
            f"{gave_up_after:.1f} s, which took {restart_seconds:.0f} s to start again"
        )
        print(
            f"longest pause between two steps in the outage: {tracked.longest_pause(killed[0], back[0]):.2f} s "
            f"(control {control.longest_pause(killed[0], back[0]):.2f} s)"
        )
        assert share_during >= 0.9 * share_before, (share_before, share_during)
        assert "takes metrics again" in log, log[-3000:]

        # every point the training logged (its own train_log.jsonl) is in MLflow, once
        summary = json.loads((out / "train_summary.json").read_text())
        client = MlflowClient(server.url)
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        logged: dict[str, set[int]] = {}
        for line in (out / "train_log.jsonl").read_text().splitlines():
            record = json.loads(line)
            for key in record.keys() - {"step"}:
                logged.setdefault(key, set()).add(record["step"])
        assert len(logged["train/loss"]) == STEPS
        points = 0
        for key, steps in logged.items():
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == sorted(steps), key
            points += len(history)
        logged_points = sum(len(steps) for steps in logged.values())
        print(f"{logged_points} metric points logged, {points} in MLflow after the restart")
        assert points == logged_points
        assert not (out / SPILL_FILE).exists()
        assert summary.get("mlflow_model_id"), summary  # the head was logged after the outage
    finally:
        server.kill()


def test_a_run_that_ends_while_the_server_is_down_says_so_and_is_delivered_later(
    tmp_path, monkeypatch, capsys
):
    """The run's end waits --mlflow_flush_timeout_s, not MLflow's retries; its points and its
    end go to the spill file; `python -m dmtp.outbox` delivers them once the server is back."""
    from mlflow.tracking import MlflowClient

    from dmtp.config import TrainConfig
    from dmtp.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    try:
        config = TrainConfig(
            output_dir=str(tmp_path / "heads" / "run"),
            mlflow_tracking_uri=server.url,
            experiment_name="ends-in-outage",
            mlflow_flush_timeout_s=2,
        )
        tracker = Tracker(config, enabled=True)
        tracker.start(config, None, {"lr": 1e-3}, {})
        for step in range(1, 6):
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
        assert tracker.flush()
        server.kill()
        for step in range(6, 11):
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
        started = time.monotonic()
        tracker.finish()
        assert time.monotonic() - started < 15  # 2 s of waiting, not minutes of retries
        said = capsys.readouterr().err
        assert "did not take 5 metric points and the run's end (FINISHED)" in said, said
        spill = tmp_path / "heads" / "run" / SPILL_FILE
        assert f"python -m dmtp.outbox {spill}" in said

        server.start()
        delivered = subprocess.run(
            [sys.executable, "-m", "dmtp.outbox", str(spill)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert delivered.returncode == 0, delivered.stderr
        client = MlflowClient(server.url)
        history = client.get_metric_history(tracker.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 11))
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
        assert not spill.exists()
    finally:
        server.kill()
