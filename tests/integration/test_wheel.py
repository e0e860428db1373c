"""qaft installed from its wheel, not used from a checkout: the configs ship in it and the CLIs run from anywhere;
and importing qaft changes no global state.

How, offline and without touching this environment:

* the wheel is built with this environment's own setuptools (``pip wheel --no-deps --no-build-isolation
  --no-index``; build isolation would fetch setuptools from the network) from a copy of the checkout's
  ``pyproject.toml``, ``README.md``, ``qaft/``, ``conf/`` and ``experiments/``, so that the build writes no
  ``build/`` or ``*.egg-info`` into the repository;
* a fresh venv (``python -m venv --without-pip``) gets one ``.pth`` file that appends this environment's
  site-packages to its path, so torch, Lightning, Hydra, ... import from there. Only the listed folders are
  added: the ``.pth`` files inside them (among them the editable qaft's import hook) do not run there, and the
  fresh venv's own site-packages comes first on the path anyway;
* the wheel is installed into the fresh venv by its own interpreter running this environment's pip
  (``--no-deps --no-index --ignore-installed``: nothing of this environment is looked at or uninstalled), so the
  installed copy has its dist-info (``qaft.__version__``) and console scripts with the fresh venv's python;
* every command runs in a folder outside the checkout with ``PYTHONPATH`` unset, and the test checks that
  ``qaft``, ``conf_dir()``, ``experiments_dir()`` and the distribution's metadata are the installed copy's.

About 1 to 2 minutes on 2 CPU cores, most of it the tiny training run and the interpreters importing torch.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT

SOURCES = ("pyproject.toml", "README.md", "qaft", "conf", "experiments")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1", "PYTHONWARNINGS": "ignore",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True, check=False,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


class Installed:
    def __init__(self, wheel: Path, venv: Path, elsewhere: Path):
        self.wheel, self.venv, self.elsewhere = wheel, venv, elsewhere
        self.python = venv / "bin" / "python"

    def run(self, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        return _run(args, self.elsewhere, timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, venv, elsewhere = tmp / "src", tmp / "dist", tmp / "venv", tmp / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=junk)
        else:
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", dist, src], tmp)
    (wheel,) = dist.glob("qaft-*.whl")

    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_this_environment.pth").write_text("".join(f"{p}\n" for p in ours))
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel], tmp)
    return Installed(wheel, venv, elsewhere)


def test_wheel_ships_the_package_and_its_configs(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "qaft").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - names == set(), "a package of qaft/ is missing from [tool.setuptools] packages"
    configs = {f"qaft/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    configs |= {f"qaft/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "experiments").rglob("*.yaml")}
    assert {"qaft/conf/train.yaml", "qaft/conf/eval.yaml", "qaft/experiments/experiment/groupwise.yaml",
            "qaft/experiments/reports/groupwise.yaml", "qaft/experiments/reports/paper/groupwise.yaml"} <= configs
    assert configs - names == set()
    assert "qaft/evaluation/tasks/quiz_mc.yaml" in names and "qaft/assets/austen/emma.txt" in names
    # only the YAML configs of experiments/: not its scripts, not top-level packages named conf or experiments
    assert not [n for n in names if n.startswith("qaft/experiments/") and not n.endswith(".yaml")]
    assert not [n for n in names if n.split("/")[0] in ("conf", "experiments", "tests", "results")]


def test_the_installed_copy_is_the_one_imported(installed):
    code = ("import importlib.metadata as md, qaft, qaft.paths as p; "
            "print(qaft.__file__, p.conf_dir(), p.experiments_dir(), md.distribution('qaft').locate_file(''), "
            "qaft.__version__, sep='\\n')")
    lines = installed.run([installed.python, "-c", code]).stdout.splitlines()[-5:]
    init, conf, experiments, dist_root, version = lines
    site = Path(dist_root).resolve()
    assert site.is_relative_to(installed.venv.resolve()), dist_root
    assert Path(init).resolve() == site / "qaft" / "__init__.py"
    assert Path(conf) == site / "qaft" / "conf" and (Path(conf) / "train.yaml").is_file()
    assert Path(experiments) == site / "qaft" / "experiments" and (Path(experiments) / "experiment").is_dir()
    assert version == "0.1.0"


def test_the_checkout_uses_its_own_folders():
    """A checkout (or an editable install): the repository's conf/ and experiments/, so edits apply at once."""
    from qaft import paths

    if Path(paths.__file__).resolve().parent != ROOT / "qaft":
        pytest.skip("qaft is installed, not used from this checkout")
    assert paths.conf_dir() == ROOT / "conf" and paths.experiments_dir() == ROOT / "experiments"


def test_installed_qaft_train_runs_and_composes_the_experiments(installed, tmp_path):
    bin_ = installed.venv / "bin"
    job = installed.run([bin_ / "qaft-train", "--cfg", "job", "experiment=groupwise"]).stdout
    assert "experiment_name: groupwise" in job
    runs = tmp_path / "runs"
    installed.run([installed.python, "-m", "qaft.training.cli", "model=tiny-llama", "trainer.max_steps=1",
                   f"runs_root={runs}", "data.datamodule.seq_len=32", "data.datamodule.max_train_tokens=2048",
                   "eval.seq_len=32", "eval.max_tokens=256", "eval.baselines=false", "save_model=false",
                   "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"])
    (record,) = runs.rglob("record.json")
    assert json.loads(record.read_text())["status"] == "ok"
    # every run of the store, tabulated without a spec
    out = tmp_path / "tables"
    installed.run([bin_ / "qaft-report", f"runs={runs}", f"out={out}"])
    assert record.parent.name in (out / "runs.md").read_text()
    # the shipped report specs, found from outside a checkout: the cost table's spec is read (this one tiny run is
    # none of its rows, which qaft-report says, naming the installed spec, with exit status 1)
    spec = subprocess.run([str(bin_ / "qaft-report"), "spec=experiments/reports/cost.yaml", f"runs={runs}",
                           f"out={out}"], cwd=installed.elsewhere, env=_env(), capture_output=True, text=True)
    assert spec.returncode == 1, spec.stderr
    assert f"{installed.venv.name}/lib/" in spec.stderr
    assert "qaft/experiments/reports/cost.yaml matches no run" in spec.stderr


def test_importing_qaft_registers_no_resolver():
    code = ("from omegaconf import OmegaConf; import qaft, qaft.training.config; "
            "print(OmegaConf.has_resolver('qaft.run_name'), OmegaConf.has_resolver('qaft.experiments_dir')); "
            "import qaft.training.app; print(OmegaConf.has_resolver('qaft.run_name'))")
    lines = _run([sys.executable, "-c", code], ROOT).stdout.splitlines()[-2:]
    assert lines == ["False False", "True"]  # the CLI registers them, for Hydra; a library import does not
