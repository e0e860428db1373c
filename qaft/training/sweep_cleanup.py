"""A Hydra callback that leaves nothing behind when a sweep fails without a run.

Hydra writes ``multirun.yaml`` into the sweep folder (``runs_root``) before it composes the sweep's jobs; when
composing fails (an unknown option in a sweep list), no job ran, and when every job's config was refused, their
folders were removed again (:func:`qaft.training.run_dir.discard_run_dir`): either way that file is all the sweep
left. ``qaft-train`` calls :meth:`SweepCleanup.after_failure` when it exits non-zero. (Its own module:
``python -m qaft.training.cli`` runs that file as ``__main__``, and Hydra would instantiate a second copy of a class
defined there.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qaft.training.run_dir import remove_made

SWEEP_FILE = "multirun.yaml"


class SweepCleanup(Callback):
    """Removes the sweep's ``multirun.yaml`` after a failure that left nothing else in the sweep folder (no job ran,
    or every job was refused), and the folder itself where this process made it."""

    sweep: Path | None = None
    jobs = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepCleanup.sweep, SweepCleanup.jobs = Path(config.hydra.sweep.dir), 0

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepCleanup.jobs += 1

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SweepCleanup.sweep = None

    @classmethod
    def after_failure(cls) -> None:
        sweep, cls.sweep = cls.sweep, None
        if sweep is None or not sweep.is_dir():
            return
        if cls.jobs == 0 or {p.name for p in sweep.iterdir()} == {SWEEP_FILE}:
            (sweep / SWEEP_FILE).unlink(missing_ok=True)
            remove_made(sweep)
