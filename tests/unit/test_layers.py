"""The package's stages import downwards only: import-linter's contract in pyproject.toml, run here."""
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _contract() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["importlinter"]["contracts"][0]


def test_the_layers_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in proc.stdout


def test_every_module_of_qaft_has_a_layer():
    """A new package or loose module outside the layers would escape the contract."""
    named = {m.strip() for layer in _contract()["layers"] for m in layer.split("|")}
    package = ROOT / "qaft"
    present = {f"qaft.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    present |= {f"qaft.{p.name}" for p in package.iterdir() if (p / "__init__.py").exists()}
    assert present == named
