"""Run one dmtp stage as a child process that a timeout can kill, and find the GPUs it may use.

GPU and distributed work never runs inside the Prefect task's own process: a hung NCCL call or a
wedged CUDA context cannot be interrupted from Python, but a child process tree can be killed and
the task retried. Each stage's output goes to a log file beside its result and, line by line, to
the task run's log in the Prefect UI.

Two kinds of timeout, because a hang looks different from a long job:
- `timeout_s`: the whole stage may take at most this long (None: no limit);
- `stall_timeout_s`: the stage printed nothing and touched none of its `activity` paths (a shard's
  commit record, a checkpoint folder) for this long. A healthy collection commits rows every few
  minutes at most; a process that has done neither is stuck.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

TAIL_LINES = 40  # lines of a failed stage's output kept for its error message
# progress-bar redraws ('\r' lines) reach the run log at most this often
PROGRESS_LOG_EVERY_S = 30.0
KILL_GRACE_S = 10.0  # between SIGTERM and SIGKILL: torchrun uses it to stop its workers
USER_ERROR_EXIT_CODE = 2  # dmtp.errors.DmtpError.exit_code: bad input, retrying cannot help
PREEMPTED_EXIT_CODE = 75  # dmtp.errors.Preempted.exit_code: SIGTERM, work saved, retry resumes
FAIL_ONCE_ENV = "DMTP_FAIL_ONCE"


class StageFailed(RuntimeError):
    """A stage's process exited non-zero. `permanent` when retrying cannot change the outcome."""

    def __init__(
        self, message: str, *, returncode: int | None, log_path: Path, tail: Sequence[str]
    ):
        details = "\n".join(tail[-12:])
        super().__init__(f"{message} (log: {log_path})" + (f"\n{details}" if details else ""))
        self.returncode = returncode
        self.log_path = log_path
        self.tail = list(tail)

    @property
    def permanent(self) -> bool:
        return self.returncode == USER_ERROR_EXIT_CODE


class StageTimedOut(StageFailed):
    """The stage ran past its timeout or stalled; its process tree was killed. Retryable."""


class StagePreempted(StageFailed):
    """SIGTERM stopped the stage after it saved its work (exit 75). Retryable: the retry resumes."""


class InjectedFailure(RuntimeError):
    """Raised on a task's first attempt when $DMTP_FAIL_ONCE names it (retry drills, tests)."""


@dataclass
class StageRun:
    returncode: int
    seconds: float
    log_path: Path
    tail: list[str]


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger (shown in the Prefect UI); a plain logger when called outside a run,
    as tests call task functions directly through `task.fn`."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("dmtp.tasks")


def retry_unless_permanent(task: object, task_run: object, state: object) -> bool:
    """Prefect `retry_condition_fn`: retry everything except errors that would only repeat.

    A user error (a DmtpError, or exit code 2 from a stage: bad flag, store made with other
    settings) and a store that fails validation fail the same way every time; retrying them only
    delays the message.
    """
    from dmtp.errors import DmtpError

    error = getattr(state, "data", None)
    return not (isinstance(error, DmtpError) or getattr(error, "permanent", False))


def fail_once_if_requested(task_name: str) -> None:
    """Fail the first attempt of `task_name` when $DMTP_FAIL_ONCE lists it (comma-separated).

    A fault drill on the real code path: the retry that follows is Prefect's own.
    """
    from prefect.runtime import task_run

    wanted = {name.strip() for name in os.environ.get(FAIL_ONCE_ENV, "").split(",")}
    if task_name in wanted and task_run.run_count <= 1:
        raise InjectedFailure(
            f"{task_name}: failure injected by ${FAIL_ONCE_ENV} (first attempt only)"
        )


def kill_tree(pid: int, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM a process and every descendant, then SIGKILL whatever is left after `grace_s`."""
    kill_trees([pid], grace_s)


def kill_trees(pids: Iterable[int], grace_s: float = KILL_GRACE_S) -> None:
    """`kill_tree` for several processes at once, sharing one grace period.

    Descendants are listed before anything is signalled: once torchrun dies its workers are
    re-parented and could no longer be found from its pid.
    """
    processes: list[psutil.Process] = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            processes += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def latest_activity(paths: Iterable[Path]) -> float:
    """Newest mtime among `paths` and, for folders, their direct children (0 when none exist)."""
    newest = 0.0
    for path in paths:
        try:
            newest = max(newest, path.stat().st_mtime)
            if path.is_dir():
                with os.scandir(path) as entries:
                    for entry in entries:
                        newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        except FileNotFoundError:
            continue
    return newest


class _OutputPump(threading.Thread):
    """Copies a child's output to its log file and to the run logger; remembers the tail."""

    def __init__(
        self, stream, log_file, logger: logging.Logger | logging.LoggerAdapter | None, prefix: str
    ):
        super().__init__(daemon=True)
        self.stream, self.log_file, self.logger, self.prefix = stream, log_file, logger, prefix
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.last_output = time.monotonic()
        self._last_progress_log = 0.0

    def run(self) -> None:
        pending = b""
        while chunk := os.read(self.stream.fileno(), 65536):
            self.last_output = time.monotonic()
            self.log_file.write(chunk)
            self.log_file.flush()
            pending += chunk
            # tqdm redraws with '\r'; a newline ends a real line.
            while True:
                cut = min(
                    (i for i in (pending.find(b"\n"), pending.find(b"\r")) if i >= 0), default=-1
                )
                if cut < 0:
                    break
                line, ending, pending = pending[:cut], pending[cut : cut + 1], pending[cut + 1 :]
                self._emit(line.decode("utf-8", "replace").rstrip(), progress=ending == b"\r")
        if pending:
            self._emit(pending.decode("utf-8", "replace").rstrip(), progress=False)

    def _emit(self, line: str, progress: bool) -> None:
        if not line:
            return
        if progress:
            now = time.monotonic()
            if now - self._last_progress_log < PROGRESS_LOG_EVERY_S:
                return
            self._last_progress_log = now
        else:
            self.tail.append(line)
        if self.logger is not None:
            self.logger.info("%s%s", self.prefix, line)


def run_stage(
    name: str,
    command: Sequence[str],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float | None = None,
    stall_timeout_s: float | None = None,
    activity: Sequence[Path] = (),
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    poll_s: float = 1.0,
) -> StageRun:
    """Run `command`, streaming its output; kill its process tree on timeout, stall or exception.

    Raises StageTimedOut or StageFailed; returns the run's facts when it exits 0.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n$ {' '.join(command)}\n".encode())
        log_file.flush()
        # Same process group as the flow run: a worker cancelling the flow run signals the whole
        # group, and that reaches this child too.
        process = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        pump = _OutputPump(process.stdout, log_file, logger, prefix="")
        pump.start()
        last_seen = latest_activity(activity)
        last_active = started
        try:
            while process.poll() is None:
                time.sleep(poll_s)
                now = time.monotonic()
                seen = latest_activity(activity)
                if seen != last_seen:
                    last_seen, last_active = seen, now
                last_active = max(last_active, pump.last_output)
                if timeout_s is not None and now - started > timeout_s:
                    raise StageTimedOut(
                        f"{name}: still running after {timeout_s:.0f} s; killed",
                        returncode=None,
                        log_path=log_path,
                        tail=list(pump.tail),
                    )
                if stall_timeout_s is not None and now - last_active > stall_timeout_s:
                    raise StageTimedOut(
                        f"{name}: no output and no progress for {stall_timeout_s:.0f} s; "
                        "killed as hung",
                        returncode=None,
                        log_path=log_path,
                        tail=list(pump.tail),
                    )
        finally:
            if process.poll() is None:
                kill_tree(process.pid)
            pump.join(timeout=KILL_GRACE_S)
    seconds = time.monotonic() - started
    if process.returncode != 0:
        failure = StagePreempted if process.returncode == PREEMPTED_EXIT_CODE else StageFailed
        raise failure(
            f"{name}: exited with code {process.returncode}",
            returncode=process.returncode,
            log_path=log_path,
            tail=list(pump.tail),
        )
    return StageRun(process.returncode, seconds, log_path, list(pump.tail))


def dmtp_command(subcommand: str, *flags: str) -> list[str]:
    """`python -m dmtp.cli <subcommand> ...` with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "dmtp.cli", subcommand, *flags]


def visible_gpus() -> list[str]:
    """CUDA device ids this host lets us use (honours CUDA_VISIBLE_DEVICES); [] without CUDA.

    CUDA ignores ordinals past the last real device, so the count comes from torch, not from the
    variable's length.
    """
    import torch  # heavy, and only needed on the host that runs the stage

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]
