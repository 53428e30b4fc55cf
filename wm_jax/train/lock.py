"""One writer per run directory: an advisory lock on `RUN/.lock` held for a training run's life.

`fcntl.flock` is released by the kernel when its holder exits, however it exits (kill -9
included), so a dead holder never blocks a restart. The file records the holder (host,
pid, start time) and a clean exit empties it: a record found when the lock is free names
a holder that died holding it, a stale lock, which is taken over and reported. Process 0
of a multi-process run holds it, and all processes agree on whether it was taken. Readers
(eval, export, generate) never take it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

import jax

from wm_jax import distributed

LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another process is training in this run directory; the message names its host and pid."""


def holder_record() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def read_record(fd: int) -> dict[str, Any] | None:
    """The holder record in the lock file (None when empty; {} when unreadable)."""
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "a process that has not written its details yet"
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')} (since {record.get('started', '?')})"


class RunLock:
    """`with RunLock(workdir) as lock:` holds the run lock; RunLocked when another process
    does. `lock.events`: (kind, message) pairs for the run's events.jsonl: "stale_lock"
    (one taken over), "no_lock" (a file system without locks)."""

    def __init__(self, workdir: str | Path) -> None:
        self.path = Path(workdir) / LOCK_FILE
        self.events: list[tuple[str, str]] = []
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        refusal = self._acquire() if jax.process_index() == 0 else None
        if distributed.any_process(refusal is not None):
            self.release()
            raise RunLocked(refusal or f"process 0 could not take the run lock {self.path} (its log says why)")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _acquire(self) -> str | None:
        """Takes the lock; the refusal message when another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe(read_record(fd))
            os.close(fd)
            return (
                f"run directory {self.path.parent} is being trained by {holder} (lock file {self.path}); "
                "wait for it or stop it, or train in another --workdir"
            )
        except OSError as e:  # a file system without flock (some network mounts): run, but say so
            os.close(fd)
            self.events.append(
                (
                    "no_lock",
                    f"no run lock: {self.path} cannot be locked on this file system "
                    f"({e.strerror}); a second writer in this run directory would not be stopped",
                )
            )
            return None
        previous = read_record(fd)
        if previous is not None:
            self.events.append(
                (
                    "stale_lock",
                    f"took over the stale run lock of {describe(previous)}, which ended without releasing it",
                )
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_record()).encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        """Empties the record (a clean exit leaves no stale lock) and unlocks."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None
