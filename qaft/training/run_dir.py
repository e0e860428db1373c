"""The run folder around Hydra: made only for a valid config, and on a later refusal removed only where this
process made it.

Hydra makes the run folder (``hydra.run.dir``) in ``run_job``, before it calls ``qaft-train``'s job function, so
checks made there come too late to leave nothing behind. :class:`RunFolderGuard`, a Hydra callback
(``conf/train.yaml``), runs :func:`qaft.training.config.validate` at ``on_run_start`` instead: the config is composed
and nothing is written yet. A refusal is one line and exit 2, and ``runs_root`` is left as it was.

It also notes which folders existed before the run, so that :func:`discard_run_dir`, for the refusals that can
only come once a folder exists (a sweep job's config, whose jobs Hydra composes one by one; a checkpoint refused on
resume), removes what this process made and nothing else: never a ``runs_root`` the user created, even empty.

(``conf/train.yaml`` also sets ``hydra.output_subdir: null``: Hydra writes no ``.hydra/`` into a run folder, so the
process holding the folder's lock is its only writer; a second process, refused with exit 4, used to rewrite the
running run's ``.hydra/overrides.yaml``. The resolved config is the run's own ``config.yaml``.)
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from qaft.run_folder import LOCK_FILE
from qaft.training.config import ConfigError, RunSpec, validate

EXIT_INVALID = 2  # qaft-train's exit status for a refused config (qaft.training.cli lists them all)

def refuse(message: str, code: int) -> NoReturn:
    """End ``qaft-train`` with ``message`` as its one line on stderr and exit status ``code``."""
    print(f"qaft-train: {message}", file=sys.stderr)
    sys.exit(code)


def _absolute(path: Any) -> Path:
    return Path(os.path.abspath(Path(str(path)).expanduser()))


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (``path`` itself included) that does not exist yet, if any."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


class RunFolderGuard(Callback):
    """Validates a single run before Hydra makes its folder; notes what existed before (see the module doc).

    State is on the class: Hydra instantiates its callbacks itself, and the job function reads it from there.
    """

    spec: RunSpec | None = None  # the single run's, validated in on_run_start; the job function takes it
    made_from: Path | None = None  # the outermost folder up to runs_root that this process may create
    run_existed = False

    @staticmethod
    def _note(runs_root: Any, run_dir: Path | None) -> None:
        RunFolderGuard.made_from = _first_missing(_absolute(runs_root))
        RunFolderGuard.run_existed = run_dir is not None and run_dir.exists()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns a callback's exception into a warning, so a refusal here exits itself (refuse).
        HydraConfig.instance().set_config(config)  # the job config's ${hydra:...} resolve as in run_job
        job = copy.deepcopy(config)
        with read_write(job), open_dict(job):
            del job["hydra"]
        try:
            RunFolderGuard.spec = validate(job)
        except ConfigError as err:
            refuse(f"invalid config: {err}", EXIT_INVALID)
        RunFolderGuard._note(job.runs_root, _absolute(OmegaConf.select(config, "hydra.run.dir")))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        RunFolderGuard.spec = None  # each job validates its own config
        RunFolderGuard._note(config.runs_root, None)

    @classmethod
    def take_spec(cls) -> RunSpec | None:
        """The spec :meth:`on_run_start` validated (once; ``None`` in a sweep)."""
        spec, cls.spec = cls.spec, None
        return spec


def discard_run_dir() -> None:
    """Remove the folder Hydra made for a job refused after all, if it holds only Hydra's log and qaft's lock, and
    the folders above it that this process made and this leaves empty: nothing may look like a run that happened,
    and nothing this process did not make may go."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    out = _absolute(hydra_cfg.runtime.output_dir)
    if RunFolderGuard.run_existed or not out.is_dir():
        return
    if not {p.name for p in out.iterdir()} <= {".hydra", f"{hydra_cfg.job.name}.log", LOCK_FILE}:
        return
    shutil.rmtree(out)
    remove_made(out.parent)


def remove_made(folder: Path) -> None:
    """Remove ``folder`` and the folders above it while they are empty and were made by this process (up to the
    outermost folder of ``runs_root`` that did not exist when the run or sweep started)."""
    made, folder = RunFolderGuard.made_from, _absolute(folder)
    while made is not None and folder.is_relative_to(made) and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


__all__ = ["EXIT_INVALID", "RunFolderGuard", "discard_run_dir", "refuse", "remove_made"]
