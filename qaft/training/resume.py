"""Where a run starts: from its own checkpoint (``resume=auto``), a named one, or from scratch (``never``).

A checkpoint is resumed only when it is this run's and whole: it carries this run's identity
(:mod:`qaft.training.identity`; any other is refused with the keys that differ) and its contents match the digest it
was saved with (:func:`qaft.training.module.checkpoint_digest`); its tensors are checked one by one when they load
(:meth:`qaft.training.module.QaftModule.on_load_checkpoint`). A refusal is a :class:`ResumeRefused`: one line, exit 2,
nothing written. A run that starts over keeps nothing of an earlier attempt in its folder.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_only

from qaft.run_folder import CorruptRun, RunFolder
from qaft.training.config import ConfigError
from qaft.training.identity import differences
from qaft.training.module import checkpoint_damage


class ResumeRefused(ConfigError):
    """A checkpoint that is not this run's: resuming it would train something other than the config says."""


@dataclass(frozen=True)
class Checkpoint:
    """An accepted checkpoint: where it is (Lightning's ``ckpt_path``) and the training step it was saved at."""

    path: str
    step: int


def _start_over(folder: RunFolder) -> None:
    folder.trim_metrics(0)
    shutil.rmtree(folder.checkpoints, ignore_errors=True)
    folder.remove_record()


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - not a checkpoint, or one that would need to run code to load
        raise ResumeRefused(f"resume: {path} is not a readable checkpoint ({type(err).__name__}); "
                            "rerun with resume=never to start over") from None


def resume_checkpoint(choice: str, folder: RunFolder, identity: dict[str, Any]) -> Checkpoint | None:
    """``auto``: the folder's ``last.ckpt`` when there is one; a path: that file; ``never``: none (and the folder
    is cleared of the earlier attempt). Refuses (:class:`ResumeRefused`) a checkpoint of another config, a damaged
    one, and a folder whose ``metrics.jsonl`` cannot be read back whole."""
    last = folder.last_checkpoint
    path = {"auto": last if last.is_file() else None, "never": None}.get(choice, Path(choice))
    if path is None:
        rank_zero_only(_start_over)(folder)
        return None
    saved = _load(path)
    theirs = saved.get("qaft", {}).get("identity")
    if theirs is None:
        raise ResumeRefused(f"resume: {path} carries no run identity (written by an older qaft); "
                            "rerun with resume=never to start over")
    if theirs != identity:
        changed = "; ".join(differences(theirs, identity))
        raise ResumeRefused(f"resume: {path} was trained with another config ({changed}); "
                            "rerun with resume=never to start over, or without resume=<path>")
    if (damage := checkpoint_damage(saved)) is not None:
        raise ResumeRefused(f"resume: {path} cannot be trusted: {damage}; rerun with resume=never to start over")
    step = int(saved["global_step"])
    try:
        rank_zero_only(folder.trim_metrics)(step)
    except CorruptRun as err:
        raise ResumeRefused(f"resume: {err}; a resumed run would lose that row: repair or remove the file, or "
                            "rerun with resume=never") from None
    return Checkpoint(str(path), step)


__all__ = ["Checkpoint", "ResumeRefused", "resume_checkpoint"]
