"""Metric points on their way to MLflow, so that training never waits on the tracking server.

    outbox = MetricOutbox(tracking_uri, output_dir / SPILL_FILE, current_run_id=run_id)
    outbox.put(run_id, {"train/loss": 0.41}, step=100)  # returns at once
    report = outbox.close(timeout_s=60)                 # the run's end: wait for what is left

    python -m dmtp.outbox heads/run1/mlflow_undelivered.jsonl  # deliver a spill file later

A background thread sends the points in batches (`MlflowClient.log_batch`). They wait in a
bounded buffer; a batch the server did not take (it was down for longer than MLflow's own HTTP
retries) goes to a spill file with everything waiting behind it: one JSON line per batch, each
naming its tracking URI and run, so any process can deliver it. While the server is down, the
thread asks its /health every few seconds and spills what training logs meanwhile; when it
answers, the spill file goes out first, oldest first. A full buffer (a server slower than the
training, or one the thread is still retrying inside MLflow) spills too. A SQL tracking store
(the default, and behind `mlflow server`) ignores a point it already holds (same key, step,
timestamp and value), so delivering a line twice costs nothing.

Why not MLflow's own async logging (`log_metrics(..., synchronous=False)`): its queue is
unbounded, and a batch that still fails after the retries is reported as an error and dropped,
so an outage longer than the retry budget (~4 min with the defaults) loses points.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPILL_FILE = "mlflow_undelivered.jsonl"  # in the training's output_dir
# ~1 MB of points: 5 metrics logged every step fill it in 2,000 steps
BUFFER_POINTS = 10_000
BATCH_POINTS = 1000  # MLflow's limit on metrics in one log_batch request
PROBE_SECONDS = 2.0  # how often a server that is down is asked whether it is back
HEALTH_TIMEOUT_S = 5.0
# The server answered and refuses these points (a deleted run, a bad value): sending them again
# would be refused again, so they are dropped with a warning instead of waiting forever.
REFUSED_ERROR_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE"}
)

# key, value, timestamp (ms since the epoch), step
Point = tuple[str, float, int, int]


@dataclass
class Batch:
    """Points of one run, or the run's end (`end_status`), as one line of the spill file."""

    tracking_uri: str
    run_id: str
    points: list[Point] = field(default_factory=list)
    end_status: str | None = None
    end_time: int | None = None

    def line(self) -> bytes:
        record: dict[str, Any] = {"uri": self.tracking_uri, "run_id": self.run_id}
        if self.points:
            record["metrics"] = self.points
        if self.end_status:
            record["end"] = {"status": self.end_status, "time": self.end_time}
        return (json.dumps(record) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes) -> Batch:
        record = json.loads(line)
        end = record.get("end") or {}
        return cls(
            record["uri"],
            record["run_id"],
            [(str(k), float(v), int(t), int(s)) for k, v, t, s in record.get("metrics", [])],
            end.get("status"),
            end.get("time"),
        )


@dataclass
class DeliveryReport:
    """What a closing outbox could and could not deliver."""

    sent: int  # points MLflow took
    refused: int  # points MLflow refused (warned about as they were)
    left: int  # points still in the spill file
    spill_path: Path
    down_seconds: float  # how long the server was unreachable, all outages together
    down_now: bool  # unreachable when the outbox closed
    complete: bool  # everything waiting was delivered in time


def server_answers(tracking_uri: str) -> bool:
    """Whether an MLflow server's /health answers 200 (a store that is not a server: always)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        response = requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S)
    except requests.RequestException:
        return False
    return response.status_code == 200


def _refused(error: Exception) -> bool:
    return getattr(error, "error_code", None) in REFUSED_ERROR_CODES


def _short(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 240 else text[:237] + "..."


def _send(client: Any, batch: Batch) -> None:
    from mlflow.entities import Metric

    if batch.points:
        metrics = [
            Metric(key, value, timestamp, step) for key, value, timestamp, step in batch.points
        ]
        client.log_batch(batch.run_id, metrics=metrics, synchronous=True)
    if batch.end_status:
        client.set_terminated(batch.run_id, batch.end_status, batch.end_time)


def _mlflow_client(tracking_uri: str) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _groups(batches: list[Batch]) -> list[tuple[list[int], Batch]]:
    """Consecutive batches of one run merged into requests of at most BATCH_POINTS points; a
    run's end closes its group (it is sent after the points before it)."""
    groups: list[tuple[list[int], Batch]] = []
    for index, batch in enumerate(batches):
        last = groups[-1][1] if groups else None
        if (
            last is not None
            and last.end_status is None
            and (last.tracking_uri, last.run_id) == (batch.tracking_uri, batch.run_id)
            and len(last.points) + len(batch.points) <= BATCH_POINTS
        ):
            groups[-1][0].append(index)
            last.points.extend(batch.points)
            last.end_status, last.end_time = batch.end_status, batch.end_time
        else:
            merged = Batch(
                batch.tracking_uri, batch.run_id, [*batch.points], batch.end_status, batch.end_time
            )
            groups.append(([index], merged))
    return groups


class MetricOutbox:
    """Delivers metric points to one tracking URI from a background thread; `put` never blocks
    on the server. See the module docstring for the rules; `close` ends it."""

    def __init__(
        self,
        tracking_uri: str,
        spill_path: str | Path,
        *,
        current_run_id: str | None = None,
        buffer_points: int = BUFFER_POINTS,
        probe_seconds: float = PROBE_SECONDS,
        client_factory: Callable[[str], Any] = _mlflow_client,
        probe: Callable[[str], bool] = server_answers,
        name: str = "dmtp",
    ):
        self.tracking_uri = tracking_uri
        self.spill_path = Path(spill_path)
        # A spilled end of this run is stale: the run is going on again (a resumed training).
        self.current_run_id = current_run_id
        self.buffer_points = buffer_points
        self.probe_seconds = probe_seconds
        self.name = name
        self._client_factory = client_factory
        self._client: Any = None
        self._probe = probe
        self._lock = threading.Condition()  # guards everything below and the spill file
        self._buffer: deque[Batch] = deque()
        self._buffered = 0  # points in _buffer
        self._in_flight: Batch | None = None
        self._spill_pending = self.spill_path.exists() and self.spill_path.stat().st_size > 0
        self._down_since: float | None = None
        self._down_seconds = 0.0
        self._outage_started: float | None = None  # when the outage being reported began
        self._stopped = False
        self.sent = self.refused = 0
        self._thread = threading.Thread(target=self._run, name="dmtp-mlflow-outbox", daemon=True)
        self._thread.start()

    # -- the training's side ---------------------------------------------------------------------

    def put(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Queue `metrics` at `step`, stamped now; returns at once (a file append at worst)."""
        timestamp = int(time.time() * 1000)
        batch = Batch(
            self.tracking_uri,
            run_id,
            [(key, float(value), timestamp, step) for key, value in metrics.items()],
        )
        with self._lock:
            if self._stopped:
                self._append_spill([batch])
            elif self._buffered + len(batch.points) > self.buffer_points:
                # The server takes points slower than training makes them, or the thread is
                # still inside MLflow's retries of a server that went down: make room on disk.
                self._append_spill([*self._buffer, batch])
                self._buffer.clear()
                self._buffered = 0
            else:
                self._buffer.append(batch)
                self._buffered += len(batch.points)
                if self._down_since is None:  # while it is down, the thread wakes on its own
                    self._lock.notify_all()

    def spill_end(self, run_id: str, status: str) -> None:
        """Record the end of `run_id` in the spill file, for whoever delivers it (the server
        was down when the run ended)."""
        with self._lock:
            self._append_spill(
                [Batch(self.tracking_uri, run_id, [], status, int(time.time() * 1000))]
            )

    def flush(self, timeout_s: float) -> bool:
        """Wait at most `timeout_s` for every waiting point to be delivered; True if they were."""
        with self._lock:
            self._lock.notify_all()
            return self._lock.wait_for(self._idle, timeout=max(0.0, timeout_s))

    def close(self, timeout_s: float) -> DeliveryReport:
        """Wait at most `timeout_s` for the waiting points, spill what is left and stop."""
        delivered = self.flush(timeout_s)
        with self._lock:
            self._stopped = True
            # The batch the thread is sending goes to the file too: if MLflow takes it after
            # all, delivering it again changes nothing.
            waiting = ([self._in_flight] if self._in_flight else []) + list(self._buffer)
            self._append_spill(waiting)
            self._buffer.clear()
            self._buffered = 0
            self._in_flight = None
            down_seconds = self._down_seconds
            if self._down_since is not None:
                down_seconds += time.monotonic() - self._down_since
            self._lock.notify_all()
        if delivered:
            self._thread.join(timeout=5)
        return DeliveryReport(
            sent=self.sent,
            refused=self.refused,
            left=count_points(self.spill_path),
            spill_path=self.spill_path,
            down_seconds=down_seconds,
            down_now=self._down_since is not None,
            complete=delivered,
        )

    @property
    def down(self) -> bool:
        """The server did not take the last batch and has not answered since."""
        return self._down_since is not None

    # -- the thread's side -----------------------------------------------------------------------

    def _idle(self) -> bool:
        return not (self._buffer or self._in_flight or self._spill_pending)

    def _append_spill(self, batches: list[Batch]) -> None:
        """Append batches to the spill file (caller holds the lock)."""
        batches = [b for b in batches if b.points or b.end_status]
        if not batches:
            return
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spill_path, "ab+") as handle:
            # a line cut short by a killed process must not swallow the next one
            handle.seek(0, os.SEEK_END)
            torn = False
            if handle.tell():
                handle.seek(-1, os.SEEK_END)
                torn = handle.read(1) != b"\n"
            handle.write((b"\n" if torn else b"") + b"".join(b.line() for b in batches))
        self._spill_pending = True

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(
                    lambda: self._stopped or not self._idle() or self._down_since is not None
                )
                if self._stopped:
                    return
            try:
                self._step()
            except Exception as error:  # the thread must outlive any surprise; it spills
                self._went_down(error)

    def _step(self) -> None:
        if self._down_since is not None:
            with self._lock:
                # What training logs while the server is down waits on disk, not in memory.
                self._append_spill(list(self._buffer))
                self._buffer.clear()
                self._buffered = 0
                if self._lock.wait_for(lambda: self._stopped, timeout=self.probe_seconds):
                    return
            if not self._probe(self.tracking_uri):
                return
            self._came_back()
        if self._spill_pending and not self._send_spill():
            return
        with self._lock:
            batch = self._take()
        if batch is None:
            return
        try:
            _send(self._mlflow(), batch)
        except Exception as error:
            if _refused(error):
                self._refuse(batch, error)
            else:
                with self._lock:
                    if self._in_flight is batch:  # not already spilled by close()
                        self._append_spill([batch])
                        self._in_flight = None
                self._went_down(error)
                return
        else:
            self.sent += len(batch.points)
            self._delivered()
        with self._lock:
            if self._in_flight is batch:
                self._in_flight = None
            self._lock.notify_all()

    def _take(self) -> Batch | None:
        """The oldest waiting points of one run, up to BATCH_POINTS, as the batch in flight."""
        if not self._buffer:
            return None
        first = self._buffer.popleft()
        batch = Batch(first.tracking_uri, first.run_id, [*first.points])
        while (
            self._buffer
            and self._buffer[0].run_id == batch.run_id
            and len(batch.points) + len(self._buffer[0].points) <= BATCH_POINTS
        ):
            batch.points.extend(self._buffer.popleft().points)
        self._buffered -= len(batch.points)
        self._in_flight = batch
        return batch

    def _send_spill(self) -> bool:
        """Deliver the spill file's lines for this URI; False if the server stopped taking them.
        Lines for other URIs stay (`python -m dmtp.outbox` delivers them)."""
        with self._lock:
            try:
                data = self.spill_path.read_bytes()
            except FileNotFoundError:
                data = b""
        lines = data.splitlines(keepends=True)
        kept, error = deliver_lines(
            lines,
            self._mlflow,
            only_uri=self.tracking_uri,
            stale_end_run_id=self.current_run_id,
            counts=self,
            name=self.name,
        )
        with self._lock:
            try:
                appended = self.spill_path.read_bytes()[len(data) :]
            except FileNotFoundError:
                appended = b""
            _rewrite(self.spill_path, b"".join(lines[i] for i in kept) + appended)
            self._spill_pending = bool(appended) or error is not None
            self._lock.notify_all()
        if error is not None:
            self._went_down(error)
            return False
        self._delivered()
        return True

    def _refuse(self, batch: Batch, error: Exception) -> None:
        self.refused += len(batch.points)
        print(
            f"{self.name}: warning: MLflow at {batch.tracking_uri} refused {len(batch.points)} "
            f"metric points of run {batch.run_id}, dropped: {_short(error)}",
            file=sys.stderr,
            flush=True,
        )

    def _mlflow(self, tracking_uri: str | None = None) -> Any:
        if self._client is None:
            self._client = self._client_factory(self.tracking_uri)
        return self._client

    def _went_down(self, error: Exception) -> None:
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
            self._lock.notify_all()
            if self._outage_started is not None:
                return  # said once per outage, however often /health answers meanwhile
            self._outage_started = self._down_since
        print(
            f"{self.name}: MLflow at {self.tracking_uri} is unreachable ({_short(error)}); "
            f"metric points wait in {self.spill_path} and go out when it answers again",
            file=sys.stderr,
            flush=True,
        )

    def _came_back(self) -> None:
        """/health answers: try sending again (the outage ends with the first batch taken)."""
        with self._lock:
            if self._down_since is not None:
                self._down_seconds += time.monotonic() - self._down_since
                self._down_since = None

    def _delivered(self) -> None:
        with self._lock:
            if self._outage_started is None:
                return
            seconds = time.monotonic() - self._outage_started
            self._outage_started = None
        print(
            f"{self.name}: MLflow at {self.tracking_uri} takes metrics again, {seconds:.0f} s "
            f"after it stopped; the points that waited in {self.spill_path} went out first",
            file=sys.stderr,
            flush=True,
        )


# ----------------------------------------------------------------------------------------------
# the spill file


def _rewrite(path: Path, data: bytes) -> None:
    if not data:
        path.unlink(missing_ok=True)
        return
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)  # a kill mid-write leaves the old file whole


def count_points(path: Path) -> int:
    """Metric points in a spill file (0 when there is none)."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return 0
    total = 0
    for line in lines:
        try:
            total += len(Batch.from_line(line).points)
        except (ValueError, KeyError, TypeError):
            continue
    return total


def deliver_lines(
    lines: list[bytes],
    client_for: Callable[[str], Any],
    *,
    only_uri: str | None = None,
    stale_end_run_id: str | None = None,
    counts: Any = None,
    name: str = "dmtp",
) -> tuple[list[int], Exception | None]:
    """Send spill-file lines, merged per run; returns the indices of the lines that stay (other
    URIs, and from the first batch the server did not take on) and that failure, if any.

    Unreadable lines (a process killed mid-write) and points the server refuses are dropped with
    a warning; so is a spilled end of `stale_end_run_id` (that run is going on again).
    `counts.sent` and `counts.refused` are increased as points go.
    """
    kept: list[int] = []
    readable: list[int] = []
    batches: list[Batch] = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            batch = Batch.from_line(line)
        except (ValueError, KeyError, TypeError):
            print(
                f"{name}: warning: skipping an unreadable spill line: {line[:120]!r}",
                file=sys.stderr,
            )
            continue
        if only_uri is not None and batch.tracking_uri != only_uri:
            kept.append(index)
            continue
        if batch.end_status and batch.run_id == stale_end_run_id:
            batch.end_status = None
        readable.append(index)
        batches.append(batch)
    groups = _groups(batches)
    for number, (_, batch) in enumerate(groups):
        try:
            _send(client_for(batch.tracking_uri), batch)
        except Exception as error:
            if _refused(error):
                if counts is not None:
                    counts.refused += len(batch.points)
                print(
                    f"{name}: warning: MLflow at {batch.tracking_uri} refused "
                    f"{len(batch.points)} metric points of run {batch.run_id}, dropped: "
                    f"{_short(error)}",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            for later, _ in groups[number:]:
                kept.extend(readable[i] for i in later)
            return sorted(kept), error
        if counts is not None:
            counts.sent += len(batch.points)
    return sorted(kept), None


def deliver_spill_file(path: str | Path) -> DeliveryReport:
    """Deliver a spill file to the tracking URIs its lines name; what fails stays in it."""
    path = Path(path)
    clients: dict[str, Any] = {}

    def client_for(uri: str) -> Any:
        if uri not in clients:
            clients[uri] = _mlflow_client(uri)
        return clients[uri]

    @dataclass
    class Counts:
        sent: int = 0
        refused: int = 0

    counts = Counts()
    lines = path.read_bytes().splitlines(keepends=True) if path.exists() else []
    kept, error = deliver_lines(lines, client_for, counts=counts, name="dmtp outbox")
    _rewrite(path, b"".join(lines[i] for i in kept))
    if error is not None:
        print(f"dmtp outbox: MLflow did not take the rest: {_short(error)}", file=sys.stderr)
    return DeliveryReport(
        sent=counts.sent,
        refused=counts.refused,
        left=count_points(path),
        spill_path=path,
        down_seconds=0.0,
        down_now=error is not None,
        complete=error is None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dmtp.outbox",
        description="Deliver the metric points a training could not send to MLflow "
        f"(<output_dir>/{SPILL_FILE}) to the tracking URIs they name.",
    )
    parser.add_argument("spill_file", type=Path)
    args = parser.parse_args(argv)
    if not args.spill_file.exists():
        print(f"dmtp outbox: {args.spill_file}: no such file (nothing waits)", file=sys.stderr)
        return 0
    report = deliver_spill_file(args.spill_file)
    print(
        f"dmtp outbox: delivered {report.sent} metric points"
        + (f", {report.refused} refused" if report.refused else "")
        + (f"; {report.left} still wait in {report.spill_path}" if report.left else "")
    )
    return 1 if report.left else 0


if __name__ == "__main__":
    sys.exit(main())
