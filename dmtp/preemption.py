"""SIGTERM as "stop at the next safe point": what spot reclaims, Kubernetes evictions and a
cancelled or timed-out Prefect task send, a grace period (30 s by default on Kubernetes, 10 s from
`tasks.launch.kill_tree`) before SIGKILL.

    with StopOnSigterm() as preemption:
        rows = run_the_model()           # abandoned at once on SIGTERM: Preempted is raised here
        with preemption.deferred():
            writer.append(rows)          # never cut in half: Preempted is raised when it is done

The model's work between two writes is abandoned rather than finished: a batch of long answers can
take minutes, longer than any grace period. Only the first SIGTERM counts: the code that catches
Preempted (committing what is on disk) is not interrupted by a second one.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from dmtp.errors import Preempted


class StopOnSigterm:
    """Turns SIGTERM into `Preempted` for the `with` block (main thread only; elsewhere a no-op,
    as Python delivers signals to the main thread)."""

    def __init__(self, message: str = "stopped by SIGTERM; rerun with --resume to continue"):
        self.message = message
        self.requested = False  # SIGTERM arrived
        self._deferring = 0
        self._installed = False
        self._previous: Any = signal.SIG_DFL

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            # None: the previous handler was not set from Python; the default is the best guess.
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            return
        self.requested = True
        if not self._deferring:
            raise Preempted(self.message)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block SIGTERM must not interrupt (a write); Preempted follows at its end."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        # Also catches a Preempted that library code swallowed (`except Exception: pass`).
        if self.requested and not self._deferring:
            raise Preempted(self.message)
