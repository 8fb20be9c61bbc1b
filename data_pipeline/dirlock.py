"""One writer per directory: a run directory or a preparer's output is held by one job at a time.

Two `recsys train --run-dir R` at once would resume each other's live checkpoints and interleave
their step directories and metrics; two preparers into one `--out` would each report rows the other
overwrote. `DirLock` holds an exclusive `flock` on `<dir>/.lock` for the job's life, with who holds
it written inside (host, pid, job id, start time) for the error the next job gets:

    error: run directory runs/demo is in use by pid 4242 on host node-3 since 2026-12-02 07:41:09 UTC

The kernel drops a `flock` when its process dies, so the lock of a crashed or killed job is free at
once; the next holder takes it over with a note naming the dead holder. A torchrun restart of the
same job (same TORCHELASTIC_RUN_ID) takes it over silently. The file is never deleted (deleting a
locked path lets a third process lock a new file of the same name while the second holds the old).
`flock` is advisory and, on some network file systems, local to one host: it guards against the
mistakes people make, not against a writer that ignores it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"

_HELD: set[Path] = set()
"""Lock files this process holds: taking one again in the same process is a no-op (a preparer
that failed and is called again, in a notebook or a test), not a conflict with itself."""


class DirInUse(RuntimeError):
    """The directory is held by another live job."""


def _job_id() -> str:
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {since}"


class DirLock:
    """`with DirLock(path, "run directory"):` ... held until the block ends or the process dies.
    Raises DirInUse if another job holds it; `note` is what to say about a holder taken over."""

    def __init__(self, directory: str | Path, what: str) -> None:
        self.directory, self.what = Path(directory), what
        self.note = ""
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = (self.directory / LOCK_FILE).resolve()
        if path in _HELD:
            return self
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise DirInUse(f"{self.what} {self.directory} is in use by {_describe(holder)}") from None
        previous = self._read(fd)
        if previous and not (_job_id() and previous.get("job") == _job_id()):
            self.note = f"took over the lock of {_describe(previous)}, which is no longer running"
        record = {"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd, self._path = fd, path
        _HELD.add(path)
        return self

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return {}

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a clean release leaves no holder to report
            os.close(self._fd)  # closing drops the flock
            _HELD.discard(self._path)
            self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
