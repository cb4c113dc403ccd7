"""Leases: at most one live writer per store shard, and nothing a killed run can leave locked.

Zarr loses rows silently when two processes append to one shard (DESIGN §3), and two flow runs with
the same parameters would both schedule the same shard. A plain lock file would keep the second
out, but a run killed with SIGKILL never removes it and every later run would wait forever. A lease
instead carries an expiry that its holder keeps pushing forward while it works: a holder that dies
stops renewing, and the lease is free again `ttl_s` later, or at once when the holder was a process
on this host that no longer exists.

Expiry compares wall clocks, so hosts sharing a data root need clocks within a fraction of `ttl_s`
(NTP gives milliseconds).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

DEFAULT_TTL_S = 120.0


class LeaseHeld(RuntimeError):
    """Another live run holds the lease. Retryable: it is free once that run ends or dies."""


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # gone, or caught half-written: treat as absent / re-read next time


def _holder_is_gone(holder: dict[str, Any], now: float) -> bool:
    if holder.get("expires", 0) < now:
        return True
    if holder.get("host") != socket.gethostname():
        return False  # can't see another host's processes: wait for the expiry
    try:
        process = psutil.Process(int(holder["pid"]))
        # A recycled pid belongs to a younger process than the one that took the lease.
        return abs(process.create_time() - float(holder.get("pid_started", 0))) > 1.0
    except (psutil.NoSuchProcess, KeyError, ValueError):
        return True


def _write_atomically(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


class Lease:
    """A held lease; renewed by a daemon thread until `release()`."""

    def __init__(self, path: Path, record: dict[str, Any], ttl_s: float):
        self.path, self.record, self.ttl_s = path, record, ttl_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease {path.name}")
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            current = _read(self.path)
            if current is None or current.get("token") != self.record["token"]:
                self.lost = True  # taken over after we failed to renew in time: stop touching it
                return
            self.record["expires"] = time.time() + self.ttl_s
            _write_atomically(self.path, self.record)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        current = _read(self.path)
        if current is not None and current.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)


def acquire(path: Path, what: str, ttl_s: float = DEFAULT_TTL_S) -> Lease:
    """Take the lease at `path` or raise LeaseHeld naming its live holder. Never waits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = psutil.Process()
    record = {
        "what": what,
        "host": socket.gethostname(),
        "pid": me.pid,
        "pid_started": me.create_time(),
        "token": uuid.uuid4().hex,
        "expires": time.time() + ttl_s,
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:
                time.sleep(0.05)  # being written or removed right now; look again
                continue
            if not _holder_is_gone(holder, time.time()):
                raise LeaseHeld(
                    f"{what} is being written by pid {holder.get('pid')} on {holder.get('host')} "
                    f"(lease {path}, renewed until {time.ctime(holder['expires'])}); "
                    "it becomes free when that run ends, or within "
                    f"{ttl_s:.0f} s of it dying"
                ) from None
            # Move the dead holder's lease aside; of several runs doing this at once only one
            # rename succeeds, and the others see the file gone and race on O_EXCL instead.
            stale = path.with_name(f".{path.name}.stale.{record['token']}")
            try:
                os.rename(path, stale)
            except FileNotFoundError:
                continue
            moved = _read(stale)
            if moved is not None and moved.get("token") != holder.get("token"):
                # A live run re-took the lease between our read and our rename: give it back
                # (link, unlike rename, never replaces a lease someone created meanwhile).
                try:
                    os.link(stale, path)
                except FileExistsError:
                    pass
                stale.unlink(missing_ok=True)
                continue
            stale.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(record))
        return Lease(path, record, ttl_s)
    raise LeaseHeld(f"{what}: could not take the lease {path} (contended); retry")


@contextmanager
def held(path: Path, what: str, ttl_s: float = DEFAULT_TTL_S) -> Iterator[Lease]:
    lease = acquire(path, what, ttl_s)
    try:
        yield lease
    finally:
        lease.release()
