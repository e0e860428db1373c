"""One process per run folder: an exclusive, non-blocking ``flock`` on ``<run_dir>/.qaft.lock``.

Two identical commands started together would otherwise interleave ``metrics.jsonl`` and overwrite each other's
checkpoints; the second is refused with one line (:class:`RunBusy`, exit 4). It is an ``flock``, so the kernel
releases it when its holder dies, even by SIGKILL: whoever holds it knows no other writer of the folder is alive.
The file holds its holder's pid while it is held and is empty once released (after a SIGKILL it keeps the dead pid
until the next holder writes its own).
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".qaft.lock"
EXIT_BUSY = 4  # the exit status of a qaft-* command refused because another process holds the run folder


class RunBusy(RuntimeError):
    """Another process holds the run folder."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/.qaft.lock`` (holds the owner's pid): one process per
    run folder (training, or ``qaft-eval`` adding to its record). The kernel releases it when its holder dies, even by
    SIGKILL, so whoever holds it knows that no other writer of the folder is alive."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunBusy(f"run folder {self.path.parent} is in use by process {owner} (the same run, already "
                          "running); wait for it to finish, or change the config") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock, leaving the file empty: a pid in it names the process that holds it now, never one gone.
        (Emptied, not removed: another process may have opened this file and wait to lock it; removing it would let
        a third lock a new file of the same name, and two processes would both hold "the" lock.)"""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # still under the lock: no holder's pid is wiped
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["EXIT_BUSY", "LOCK_FILE", "RunBusy", "RunLock"]
