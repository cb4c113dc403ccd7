"""Leases: at most one live writer per store shard, and nothing a killed run can leave locked.

Zarr loses rows silently when two processes append to one shard (DESIGN §3): two `dmtp collect`
into one output dir, or two flow runs with the same parameters, would both write the same shard. A
plain lock file would keep the second out, but a run killed with SIGKILL never removes it and every
later run would wait forever. A lease instead carries an expiry that its holder keeps pushing
forward while it works: a holder that dies stops renewing, and the lease is free again `ttl_s`
later, or at once when the holder was a process on this host that no longer exists.

    with held(shard_lease_path(store_path, 0), "shard 0 of data/collected_data_final"):
        ...  # write shard 0

A process holding a lease may hand it to a child it launches (the Prefect task holds a shard's
lease, then runs `dmtp collect` for it): `handed_down_env([lease])` goes into the child's
environment, and the child's `acquire` of that lease succeeds while the parent keeps renewing it.

Expiry compares wall clocks, so hosts sharing a data root need clocks within a fraction of `ttl_s`
(NTP gives milliseconds).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from dmtp.errors import DiskFull, StoreError

DEFAULT_TTL_S = 120.0
HANDED_DOWN_ENV = "DMTP_LEASE_TOKENS"  # comma-separated tokens of leases a parent process holds


class LeaseHeld(StoreError):
    """Another live process holds the lease: it is free once that process ends or dies."""


def shard_lease_path(store_path: str | Path, shard_index: int) -> Path:
    """Where shard `shard_index`'s lease lives: beside the store, not in it, so `--overwrite`
    (which deletes the store) cannot delete a lease another run holds."""
    return Path(store_path).parent / "leases" / f"shard-{shard_index}.json"


def _read(path: Path) -> dict[str, Any] | None:
    """The lease record; None when there is no lease file. Leases are created and replaced whole
    (link, rename), so unreadable content is junk no live holder wrote: read as an expired lease."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


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
    try:
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def describe_holder(holder: dict[str, Any]) -> str:
    """'pid 4242 on gpu-3 since 2026-11-28T14:58:37+00:00' (a lease from before `since`: no since)."""
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    since = holder.get("since")
    if isinstance(since, int | float):
        text += f" since {datetime.fromtimestamp(since).astimezone().isoformat(timespec='seconds')}"
    return text


class Lease:
    """A held lease, renewed by a daemon thread until `release()`. A lease handed down by the
    parent process (`owned=False`) is renewed and released by that parent, not here."""

    def __init__(self, path: Path, record: dict[str, Any], ttl_s: float, owned: bool = True):
        self.path, self.record, self.ttl_s, self.owned = path, record, ttl_s, owned
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease {path.name}")
        if owned:
            self._thread.start()

    @property
    def token(self) -> str:
        return str(self.record["token"])

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            current = _read(self.path)
            if current is None or current.get("token") != self.token:
                self.lost = True  # taken over after we failed to renew in time: stop touching it
                return
            self.record["expires"] = time.time() + self.ttl_s
            try:
                _write_atomically(self.path, self.record)
            except OSError:
                pass  # disk full for a moment: the next renewal tries again, well before expiry

    def release(self) -> None:
        if not self.owned:
            return
        self._stop.set()
        self._thread.join()
        current = _read(self.path)
        if current is not None and current.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def handed_down_env(leases: Iterable[Lease]) -> dict[str, str]:
    """Environment for a child process that may write under these leases (see the module doc)."""
    return {HANDED_DOWN_ENV: ",".join(lease.token for lease in leases)}


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create the lease file with its whole record, or return False when one exists. Written
    aside and linked into place (link, unlike rename, never replaces a file), so no reader ever
    sees a half-written lease, even when the writer is killed."""
    tmp = path.with_name(f".{path.name}.{record['token']}")
    try:
        tmp.write_text(json.dumps(record))
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def acquire(path: Path, what: str, ttl_s: float = DEFAULT_TTL_S) -> Lease:
    """Take the lease at `path` or raise LeaseHeld naming its live holder. Never waits."""
    try:
        return _acquire(path, what, ttl_s)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(
                f"{path.parent}: no space left on the device to write the lease for {what}; "
                "free space and rerun"
            ) from None
        raise


def _acquire(path: Path, what: str, ttl_s: float) -> Lease:
    path.parent.mkdir(parents=True, exist_ok=True)
    me = psutil.Process()
    now = time.time()
    record = {
        "what": what,
        "host": socket.gethostname(),
        "pid": me.pid,
        "pid_started": me.create_time(),
        "since": now,
        "token": uuid.uuid4().hex,
        "expires": now + ttl_s,
    }
    handed_down = set(filter(None, os.environ.get(HANDED_DOWN_ENV, "").split(",")))
    for _ in range(3):
        if _create(path, record):
            return Lease(path, record, ttl_s)
        holder = _read(path)
        if holder is None:
            continue  # removed since we looked: race for it again
        if not _holder_is_gone(holder, time.time()):
            if holder.get("token") in handed_down:
                return Lease(path, holder, ttl_s, owned=False)
            raise LeaseHeld(
                f"{what} is being written by {describe_holder(holder)} (lease {path}); wait for "
                "that run to end or stop it: a lease whose holder died is taken over at once on "
                f"the same host, {ttl_s:.0f} s after its last renewal from another"
            )
        # Move the dead holder's lease aside; of several runs doing this at once only one rename
        # succeeds, and the others see the file gone and race to create it instead.
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
    raise LeaseHeld(f"{what}: could not take the lease {path} (contended); retry")


@contextmanager
def held(path: Path, what: str, ttl_s: float = DEFAULT_TTL_S) -> Iterator[Lease]:
    lease = acquire(path, what, ttl_s)
    try:
        yield lease
    finally:
        lease.release()
