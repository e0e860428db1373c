"""Lightning callbacks that tests plug into a real ``qaft-train`` process through the ``callbacks`` config.

    qaft-train ... '+callbacks.pause={_target_: run_probes.PauseAt, step: 7, marker: /tmp/at7}'

(with ``tests/`` on ``PYTHONPATH``). They only observe or wait; the tests do the killing, with real signals.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from safetensors.torch import save_file


class PauseAt(pl.Callback):
    """Before optimizer step ``step + 1`` starts (``step`` steps done), write ``marker`` and wait there for
    ``seconds``, or until a ``release`` file appears."""

    def __init__(self, step: int, marker: str, seconds: float = 600.0, release: str | None = None) -> None:
        self.step, self.marker, self.seconds = step, Path(marker), seconds
        self.release = Path(release) if release else None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(str(self.step))
            deadline = time.monotonic() + self.seconds
            while time.monotonic() < deadline and not (self.release and self.release.exists()):
                time.sleep(0.05)  # short sleeps: a signal handler runs between them


class HeavyCheckpoint(pl.Callback):
    """Adds ``mb`` MiB of padding to every checkpoint from step ``from_step`` on, so that writing one takes long
    enough for a test to kill the process in the middle of it; ``marker`` is written just before."""

    def __init__(self, mb: int, marker: str, from_step: int = 0) -> None:
        self.mb, self.marker, self.from_step = mb, Path(marker), from_step

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.global_step >= self.from_step:
            checkpoint["padding"] = torch.ones(self.mb * 2**18)
            self.marker.write_text(str(trainer.global_step))


class DumpTrainable(pl.Callback):
    """Each rank saves its trained tensors at the end, as safetensors (the DDP test compares the ranks)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        keys = pl_module.checkpoint_keys()
        state = {k: v.detach().cpu().contiguous() for k, v in pl_module.state_dict().items() if k in keys}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_file(state, str(self.run_dir / f"trainable_rank{trainer.global_rank}.safetensors"))
