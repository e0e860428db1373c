"""The run record mirrored into the experiment tracker of ``logger=...`` (Weights & Biases: ``logger=wandb``).

The local record (:mod:`qaft.training.records`) stays the reference; the tracker gets the same facts, so that a
table can be rebuilt from either. At the start, the tracker's config gets :meth:`RunRecord.described
<qaft.training.records.RunRecord.described>`: the record's descriptive keys (method, bits, group size, seed,
model, data, experiment, scale, identity digest), the run folder's name and the whole resolved config under
``config``. When the record is written, whatever the status, a wandb run's summary gets the record's outcome
under the record's own keys (:data:`SUMMARY_KEYS`: ``status``, ``metrics`` with every perplexity and the nested
lm-eval results, ...) and the run is finished, which flushes it (offline: its ``.wandb`` file; a sweep in one
process starts its next job with a run of its own instead of Lightning reusing the open one).

Each attempt of a run is one wandb run (a resumed run is a second one, with the same run folder name; the last
one carries the final status). A finished run is not run again, so ``logger=wandb`` added to it starts no wandb
run and changes nothing.
"""
from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import Logger, WandbLogger

from qaft.run_folder import Status
from qaft.training.outcomes import EXIT_CODES
from qaft.training.records import RunRecord

# The record's keys that describe the outcome: the summary of the tracker's run (the rest is in its config).
SUMMARY_KEYS = ("status", "metrics", "timings", "finished", "error", "non_finite")


def track(logger: Logger | None, record: RunRecord) -> None:
    """Give ``logger`` the run's description now, and (wandb) its outcome when ``record`` is written."""
    if not logger:
        return
    logger.log_hyperparams(record.described())
    if isinstance(logger, WandbLogger):
        record.mirrors.append(lambda written: finish_wandb(logger, written))


def finish_wandb(logger: WandbLogger, record: dict[str, Any]) -> None:
    """The record's outcome into the wandb run's summary; then the run is finished with the run's exit status."""
    run = logger.experiment
    run.summary.update({key: record[key] for key in SUMMARY_KEYS if key in record})
    run.finish(exit_code=EXIT_CODES.get(Status(record["status"]), 1))


__all__ = ["SUMMARY_KEYS", "finish_wandb", "track"]
