"""dmtp.outbox: the buffer, the spill file and their delivery, against a stand-in MLflow client
whose server can be taken down and brought back (the real server is killed in
tests/integration/test_tracking_outage.py); one test delivers a spill file into a real SQLite
tracking store."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from dmtp.outbox import (
    SPILL_FILE,
    Batch,
    MetricOutbox,
    count_points,
    deliver_spill_file,
    main,
)

URI = "http://mlflow.test:5000"


class StandInMlflow:
    """MlflowClient's log_batch and set_terminated; `up` False answers as MLflow does once its
    HTTP retries are spent; `gate` cleared holds every call (a server that does not answer)."""

    def __init__(self) -> None:
        self.up = True
        self.gate = threading.Event()
        self.gate.set()
        self.points: list[tuple[str, str, float, int, int]] = []
        self.ended: dict[str, str] = {}
        self.requests = 0
        self.refuse_key: str | None = None

    def log_batch(self, run_id, metrics, synchronous):
        assert synchronous is True
        self.gate.wait()
        self.requests += 1
        if not self.up:
            raise MlflowException(f"API request to {URI}/api/2.0/mlflow/runs/log-batch failed")
        if any(m.key == self.refuse_key for m in metrics):
            raise MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)
        self.points += [(run_id, m.key, m.value, m.timestamp, m.step) for m in metrics]

    def set_terminated(self, run_id, status, end_time):
        self.gate.wait()
        if not self.up:
            raise MlflowException("down")
        self.ended[run_id] = status

    def steps(self, run_id: str = "run") -> list[int]:
        return sorted({step for r, _, _, _, step in self.points if r == run_id})


def _outbox(tmp_path: Path, server: StandInMlflow, **kwargs) -> MetricOutbox:
    kwargs.setdefault("probe_seconds", 0.05)
    return MetricOutbox(
        URI,
        tmp_path / SPILL_FILE,
        client_factory=lambda uri: server,
        probe=lambda uri: server.up,
        **kwargs,
    )


def _metrics(step: int) -> dict[str, float]:
    return {"train/loss": 1.0 / step, "train/learning_rate": 1e-3}


def test_points_reach_mlflow_in_batches(tmp_path):
    server = StandInMlflow()
    server.gate.clear()  # hold the first request so the rest pile up behind it
    outbox = _outbox(tmp_path, server)
    for step in range(1, 601):
        outbox.put("run", _metrics(step), step)
    server.gate.set()
    report = outbox.close(timeout_s=10)
    assert report.complete and report.left == 0 and report.sent == 1200
    assert server.steps() == list(range(1, 601))
    assert server.requests <= 4  # merged up to 1,000 points a request, not one per step
    assert not (tmp_path / SPILL_FILE).exists()


def test_an_outage_longer_than_the_retries_spills_and_delivers_every_point_after(tmp_path):
    server = StandInMlflow()
    outbox = _outbox(tmp_path, server, buffer_points=50)
    outbox.put("run", _metrics(1), 1)
    assert outbox.flush(5)
    server.up = False
    slowest = 0.0
    for step in range(2, 202):
        started = time.perf_counter()
        outbox.put("run", _metrics(step), step)
        slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.001)
    assert outbox.down
    spilled = count_points(tmp_path / SPILL_FILE)
    assert spilled > 0  # the server's points waited on disk, not in an unbounded queue
    assert slowest < 0.05, slowest  # put never waited on the server
    server.up = True
    report = outbox.close(timeout_s=10)
    assert report.complete and report.left == 0 and report.down_seconds > 0
    assert server.steps() == list(range(1, 202))
    assert len(server.points) == len(set(server.points)) == 402
    assert not (tmp_path / SPILL_FILE).exists()


def test_a_full_buffer_spills_while_the_server_hangs(tmp_path):
    server = StandInMlflow()
    server.gate.clear()  # MLflow is still retrying the first batch
    outbox = _outbox(tmp_path, server, buffer_points=20)
    for step in range(1, 101):
        outbox.put("run", _metrics(step), step)
    # at most the buffer and the batch in flight are in memory; the rest is on disk
    assert count_points(tmp_path / SPILL_FILE) >= 200 - 20 - 2
    server.gate.set()
    report = outbox.close(timeout_s=10)
    assert report.complete and report.left == 0
    assert server.steps() == list(range(1, 101))


def test_the_end_waits_a_bounded_time_and_leaves_the_rest_in_the_spill_file(tmp_path):
    server = StandInMlflow()
    server.up = False
    outbox = _outbox(tmp_path, server)
    for step in range(1, 11):
        outbox.put("run", _metrics(step), step)
    started = time.monotonic()
    report = outbox.close(timeout_s=0.5)
    assert time.monotonic() - started < 3
    assert not report.complete and report.down_now and report.left == 20
    outbox.spill_end("run", "FINISHED")
    lines = [json.loads(line) for line in (tmp_path / SPILL_FILE).read_text().splitlines()]
    assert {line["uri"] for line in lines} == {URI} and lines[-1]["end"]["status"] == "FINISHED"
    assert count_points(tmp_path / SPILL_FILE) == 20

    # the next training in this output_dir (a new run) delivers them, and the old run's end
    server.up = True
    later = _outbox(tmp_path, server, current_run_id="next-run")
    assert later.flush(10)
    later.close(1)
    assert server.steps() == list(range(1, 11)) and server.ended == {"run": "FINISHED"}
    assert not (tmp_path / SPILL_FILE).exists()


def test_a_resumed_run_drops_its_own_stale_end(tmp_path):
    spill = tmp_path / SPILL_FILE
    spill.write_bytes(
        Batch(URI, "run", [("train/loss", 0.5, 1000, 3)]).line()
        + Batch(URI, "run", [], "FAILED", 2000).line()
    )
    server = StandInMlflow()
    outbox = _outbox(tmp_path, server, current_run_id="run")  # resumed: the run goes on
    assert outbox.flush(10)
    outbox.close(1)
    assert server.steps() == [3] and server.ended == {}


def test_refused_points_are_dropped_with_a_warning_not_retried_forever(tmp_path, capsys):
    server = StandInMlflow()
    server.refuse_key = "bad"
    outbox = _outbox(tmp_path, server)
    outbox.put("run", {"bad": 1.0}, 1)
    outbox.put("run", {"good": 1.0}, 2)
    report = outbox.close(timeout_s=10)
    assert report.complete and report.refused >= 1 and not outbox.down
    assert "refused" in capsys.readouterr().err


def test_a_line_cut_short_by_a_kill_loses_only_itself(tmp_path, capsys):
    spill = tmp_path / SPILL_FILE
    spill.write_bytes(Batch(URI, "run", [("a", 1.0, 1000, 1)]).line() + b'{"uri": "htt')
    server = StandInMlflow()
    server.up = False
    outbox = _outbox(tmp_path, server)
    outbox.put("run", {"a": 2.0}, 2)
    outbox.close(timeout_s=0.3)
    assert count_points(spill) == 2  # the appended line starts on its own line
    server.up = True
    assert _outbox(tmp_path, server).close(timeout_s=10).left == 0
    assert server.steps() == [1, 2]
    assert "unreadable spill line" in capsys.readouterr().err


def test_lines_for_another_tracking_server_wait_for_the_replay_command(tmp_path):
    spill = tmp_path / SPILL_FILE
    other = Batch("http://elsewhere:5000", "old", [("a", 1.0, 1000, 1)]).line()
    spill.write_bytes(other)
    server = StandInMlflow()
    outbox = _outbox(tmp_path, server)
    outbox.put("run", {"a": 2.0}, 2)
    report = outbox.close(timeout_s=10)
    assert report.complete and server.steps() == [2] and spill.read_bytes() == other


@pytest.mark.slow
def test_the_replay_command_delivers_a_spill_file_into_a_real_store(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    spill = tmp_path / "out" / SPILL_FILE
    spill.parent.mkdir()
    points = [("train/loss", 1.0 / step, 1_000 + step, step) for step in range(1, 1501)]
    spill.write_bytes(
        b"".join(Batch(uri, run_id, points[i : i + 5]).line() for i in range(0, 1500, 5))
        + Batch(uri, run_id, [], "FINISHED", 9_000).line()
    )
    assert main([str(spill)]) == 0
    assert "delivered 1500 metric points" in capsys.readouterr().out
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 1501))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not spill.exists()

    # delivered twice (a line the server took before the process died): nothing doubles
    spill.write_bytes(Batch(uri, run_id, points[:5]).line())
    assert deliver_spill_file(spill).left == 0
    assert len(client.get_metric_history(run_id, "train/loss")) == 1500
