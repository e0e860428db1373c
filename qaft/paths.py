"""Where qaft's own files are: the Hydra config tree and the tables' experiment configs.

They live at the top of the repository (``conf/``, ``experiments/``) and the wheel ships the same files inside
the package, as ``qaft/conf/`` and ``qaft/experiments/`` (``[tool.setuptools]`` in pyproject.toml). So: the
package's copy when there is one (an installed wheel), else the repository's folder (a source checkout or an
editable install, where edits to ``conf/`` apply at once).

The package folder is this file's folder (what ``importlib.resources.files("qaft")`` is for an unzipped
install) rather than ``files("qaft")`` itself, which would import all of qaft from its bottom layer.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_REPO = _PACKAGE.parent


def _shipped(name: str) -> Path:
    """``qaft/<name>`` in an installed wheel, else ``<repository>/<name>``."""
    shipped = _PACKAGE / name
    return shipped if shipped.is_dir() else _REPO / name


def conf_dir() -> Path:
    """The Hydra config tree (``train.yaml``, ``eval.yaml`` and the groups)."""
    return _shipped("conf")


def experiments_dir() -> Path:
    """The tables' experiment configs (``experiment/``) and report specs (``reports/``)."""
    return _shipped("experiments")
