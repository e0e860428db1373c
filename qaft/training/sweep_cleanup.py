"""A Hydra callback that leaves nothing behind when a sweep fails before its first job.

Hydra writes ``multirun.yaml`` into the sweep folder before it composes the sweep's jobs; when composing fails
(an unknown option in a sweep list), no job ran and that file is all the sweep left. ``qaft-train`` calls
:meth:`SweepCleanup.after_failure` when it exits non-zero. (Its own module: ``python -m qaft.training.cli`` runs that
file as ``__main__``, and Hydra would instantiate a second copy of a class defined there.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepCleanup(Callback):
    """Hydra writes ``multirun.yaml`` before it composes the sweep's jobs; when composing fails (an unknown
    option in a sweep list), no job ran and that file is all the sweep left: remove it."""

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
        if cls.sweep is not None and cls.jobs == 0:
            (cls.sweep / "multirun.yaml").unlink(missing_ok=True)
            if cls.sweep.is_dir() and not any(cls.sweep.iterdir()):
                cls.sweep.rmdir()
        cls.sweep = None
