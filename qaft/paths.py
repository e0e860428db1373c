"""Where qaft's own files are: the Hydra config tree and the tables' experiment configs.

In a source checkout (and an editable install) they are the repository's top-level ``conf/`` and
``experiments/``; the wheel ships the same files.
"""
from __future__ import annotations

from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def conf_dir() -> Path:
    """The Hydra config tree (``train.yaml``, ``eval.yaml`` and the groups)."""
    return _REPO / "conf"


def experiments_dir() -> Path:
    """The tables' experiment configs (``experiment/``) and report specs (``reports/``)."""
    return _REPO / "experiments"
