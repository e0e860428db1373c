"""Lightning's rich progress bar on a terminal, with a rate and an ETA however slow a step is.

Rich estimates a task's speed from the progress samples of its last ``speed_estimate_period`` seconds (30 by
default) and has none while fewer than two fall in that window. A step that takes longer than 30 s (a CPU, or a
large model) leaves one sample at most, so Lightning's bar read ``3/32 0:01:40 • -:--:-- 0.00it/s`` on every
step: no rate, no time left. :class:`RateProgressBar` keeps every sample (rich keeps the last 1000 at most), so
the rate is the mean over the run so far, as qaft's log-file lines have it
(:class:`qaft.training.module.ProgressLines`), and the time left is the remaining steps at that rate.
"""
from __future__ import annotations

import importlib.util
import math

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


class RateProgressBar(RichProgressBar):
    """:class:`~pytorch_lightning.callbacks.RichProgressBar` whose rate and ETA span the whole run (module doc)."""

    def _init_progress(self, trainer: pl.Trainer) -> None:
        super()._init_progress(trainer)
        if self.progress is not None:  # read by each task's speed at every update, so set before the first step
            self.progress.speed_estimate_period = math.inf


def terminal_bar() -> list[pl.Callback]:
    """The bar to draw on a terminal: :class:`RateProgressBar` where ``rich`` is installed (else Lightning's
    default, tqdm's, whose rate and ETA already span the run)."""
    return [RateProgressBar()] if importlib.util.find_spec("rich") is not None else []


__all__ = ["RateProgressBar", "terminal_bar"]
