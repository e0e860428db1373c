"""What keeps a run folder honest while a run owns it: an exclusive lock, and SIGTERM / SIGINT handling.

* :class:`RunLock`: one process per run folder. Two identical commands started together would otherwise
  interleave ``metrics.jsonl`` and overwrite each other's checkpoints; the second is refused with one line.
  It is an ``flock``, so the kernel releases it when its holder dies, even by SIGKILL.
* :class:`SignalGuard`: schedulers stop jobs with SIGTERM (SLURM, Kubernetes), people with Ctrl-C. During
  training the signal is noted and the run stops at the end of the current optimizer step, after a checkpoint
  (:class:`StopOnSignal`), so a rerun resumes from exactly there; anywhere else (loading, evaluation) the run
  stops at once. Either way it ends as :class:`~qaft.training.records.RunInterrupted`: status ``interrupted``, exit
  ``128 + signal``. A second signal during a step stops at once too.
"""
from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl

from qaft.run_folder import LOCK_FILE
from qaft.training.records import RunInterrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunBusy(RuntimeError):
    """Another process holds the run folder."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/.qaft.lock`` (holds the owner's pid)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
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
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class SignalGuard:
    """Turns SIGTERM / SIGINT into :class:`RunInterrupted`: deferred to the step's end while training."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.training = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.training and self.pending is None:
            self.pending = signum
            print(f"qaft-train: {signal.Signals(signum).name} received: stopping after this step "
                  "(checkpointed; rerun the same command to resume)", file=sys.stderr, flush=True)
            return
        raise RunInterrupted(signum)

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class StopOnSignal(pl.Callback):
    """Ends training at a step boundary once a signal is pending on any rank: checkpoint, then stop."""

    def __init__(self, guard: SignalGuard, last_checkpoint: Path) -> None:
        self.guard, self.last = guard, Path(last_checkpoint)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.guard.training = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.guard.training = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.guard.training = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation is no step boundary
        # Every rank takes part, so that all stop at the same step and the checkpoint is collective.
        if not trainer.strategy.reduce_boolean_decision(self.guard.pending is not None, all=False):
            return
        # The full state (optimizers, loops) a resume needs, said explicitly: left unset, Lightning logs that it
        # defaulted weights_only to False, which reads like an unpickling warning in an interrupted run's log.
        trainer.save_checkpoint(self.last, weights_only=False)
        self.guard.training = False
        raise RunInterrupted(self.guard.pending or signal.SIGTERM, trainer.global_step)


__all__ = ["RunBusy", "RunLock", "SignalGuard", "StopOnSignal"]
