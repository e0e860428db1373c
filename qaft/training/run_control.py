"""SIGTERM / SIGINT while a run owns its folder (the folder's lock, one process per run folder:
:class:`qaft.run_folder.RunLock`).

* :class:`SignalGuard`: schedulers stop jobs with SIGTERM (SLURM, Kubernetes), people with Ctrl-C. During
  training the signal is noted and the run stops at the end of the current optimizer step, after a checkpoint
  (:class:`StopOnSignal`), so a rerun resumes from exactly there; anywhere else (loading, evaluation) the run
  stops at once. Either way it ends as :class:`~qaft.training.records.RunInterrupted`: status ``interrupted``, exit
  ``128 + signal``. A second signal during a step stops at once too.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl

from qaft.training.records import RunInterrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


__all__ = ["SignalGuard", "StopOnSignal"]
