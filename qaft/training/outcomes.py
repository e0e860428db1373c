"""How a run ends: the one table from what stopped it to its record's status and ``qaft-train``'s exit code.

=========================================  ==============  ==========================================
what happened                              status          exit code
=========================================  ==============  ==========================================
finished, with the evidence ``ok`` needs   ``ok``          0
any other error                            ``failed``      1
an invalid config or a refused checkpoint  (no record)     2 (one line, nothing written)
non-finite loss / gradient / metric        ``diverged``    3
the run folder is held by another process  (no record)     4
SIGTERM / SIGINT (Ctrl-C)                  ``interrupted`` 128 + signal number (resumable)
=========================================  ==============  ==========================================
"""
from __future__ import annotations

import signal
from dataclasses import dataclass

from pytorch_lightning.utilities.exceptions import SIGTERMException

from qaft.run_folder import EXIT_BUSY, RunBusy, Status
from qaft.training.config import ConfigError
from qaft.training.records import Diverged, RunInterrupted
from qaft.training.run_dir import EXIT_INVALID

EXIT_CODES = {Status.OK: 0, Status.FAILED: 1, Status.DIVERGED: 3}  # interrupted: 128 + the signal's number


@dataclass(frozen=True)
class Outcome:
    """``status``: what the record says (``None``: no record is written); ``error``: the exception to report
    (Lightning's and Python's own interruptions become :class:`RunInterrupted`)."""

    status: Status | None
    exit_code: int
    error: BaseException | None = None


def outcome(err: BaseException | None) -> Outcome:
    """The :class:`Outcome` of a run that raised ``err`` (``None``: it finished)."""
    if err is None:
        return Outcome(Status.OK, EXIT_CODES[Status.OK])
    if isinstance(err, SIGTERMException):  # Lightning's own SIGTERM exit (a signal between two of our checks)
        err = RunInterrupted(signal.SIGTERM)
    elif isinstance(err, KeyboardInterrupt):
        err = RunInterrupted(signal.SIGINT)
    if isinstance(err, RunInterrupted):
        return Outcome(Status.INTERRUPTED, 128 + err.signum, err)
    if isinstance(err, ConfigError):
        return Outcome(None, EXIT_INVALID, err)
    if isinstance(err, RunBusy):
        return Outcome(None, EXIT_BUSY, err)
    if isinstance(err, Diverged):
        return Outcome(Status.DIVERGED, EXIT_CODES[Status.DIVERGED], err)
    return Outcome(Status.FAILED, EXIT_CODES[Status.FAILED], err)


__all__ = ["EXIT_BUSY", "EXIT_CODES", "EXIT_INVALID", "Outcome", "outcome"]
