"""A run's log starts with qaft's own first line: the known third-party noise (torchao's import, Lightning's
advertisement and deprecation, the interruption checkpoint's ``weights_only`` line) is gone, and the filters
that remove it are exact, so a new warning still shows (see ``qaft.quiet``).

The runs keep stderr in the same stream as stdout, in order, and leave ``PYTHONWARNINGS`` unset (the other
process tests set it to ``ignore``), since what a user's log shows is what is tested.
"""
from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

from qaft.quiet import ignore_known_warnings, quiet_imports, silence_third_party_noise

from helpers import TESTS, tiny_run_overrides, wait_for

# What each silenced line contains; none may appear anywhere in a run's output.
NOISE = ("Failed to load", "is an Enum subclass", "litlogger", "LeafSpec", "weights_only", "gemm_4bit_forward",
         "publisher trust", "qaft-packed (")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600, env=_env(), cwd=cwd, check=False)


def _assert_quiet(output: str, first_line_starts: str) -> None:
    head = "\n".join(output.splitlines()[:8])
    assert output.startswith(first_line_starts), f"printed before qaft's first line:\n{head}"
    assert not [n for n in NOISE if n in output], output[-3000:]


def test_train_log_starts_with_qafts_own_line_and_an_interruption_adds_no_weights_only_line(tmp_path):
    """One run covers both: the noise came at import, at Trainer construction and at fit's start (before the
    signal), and from the interruption checkpoint's save."""
    marker = tmp_path / "paused"
    probe = f"+callbacks.pause={{_target_: run_probes.PauseAt, step: 1, marker: '{marker}', seconds: 2}}"
    proc = subprocess.Popen([sys.executable, "-m", "qaft.training.cli", *tiny_run_overrides(tmp_path / "runs"), probe],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=tmp_path)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, output[-3000:]
    assert "qaft-train: interrupted by SIGINT at step 2" in output  # the interruption checkpoint was written
    _assert_quiet(output, "run l4q-")


def test_eval_log_starts_with_qafts_own_line(tmp_path):
    proc = _run(["qaft.evaluation.cli", "model=tiny-llama", "perplexity.seq_len=32", "perplexity.max_tokens=128",
                 "tasks=[]", f"output={tmp_path / 'eval.json'}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    _assert_quiet(proc.stdout, "perplexity (austen test, 32-token windows, 128 tokens): started")


class KernelPreference(enum.Enum):  # renders as torchao's enum of that name does: "<enum 'KernelPreference'>"
    A = 1


class MyPreference(enum.Enum):
    A = 1


ENUM_MESSAGE = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
                "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future "
                "release.")


def _shown(logger_name: str, message: str, *args: object) -> bool:
    """Whether ``logger_name``'s filters let the record through (what Logger.handle asks before any handler)."""
    logger = logging.getLogger(logger_name)
    return bool(logger.filter(logger.makeRecord(logger_name, logging.WARNING, __file__, 1, message, args, None)))


def test_log_filters_drop_only_the_exact_known_lines():
    silence_third_party_noise()
    so = "/venv/site-packages/torchao/_C_cutlass_90a.abi3.so"
    assert not _shown("torchao", f"Failed to load {so}: Could not load this library: {so}")
    assert _shown("torchao", "Failed to load /venv/site-packages/torchao/_C.abi3.so: undefined symbol: foo")
    assert _shown("torchao", "Something new from torchao")
    assert not _shown("torch.utils._pytree", ENUM_MESSAGE, KernelPreference)
    assert _shown("torch.utils._pytree", ENUM_MESSAGE, MyPreference)  # a user's enum still warns
    assert _shown("pytorch_lightning.utilities.rank_zero", "GPU available: False, used: False")
    assert not _shown("pytorch_lightning.utilities.rank_zero", "💡 Tip: For seamless cloud logging and experiment "
                      "tracking, try installing [litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, "
                      "which logs metrics and artifacts automatically to the Lightning Experiments platform.")
    assert not _shown("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: "
                      "%s. Please make sure you already `pip install kernels` and the kernels >= 0.11.1", "offline")


def test_import_filters_are_removed_after_the_imports():
    so = "/venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so"
    before = list(logging.getLogger("torchao").filters)
    with quiet_imports():
        assert not _shown("torchao", f"Failed to load {so}: Could not load this library: {so}")
    assert logging.getLogger("torchao").filters == before


def test_warning_filter_is_exact():
    leafspec = ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
                "treespec.is_leaf()` instead.")
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        ignore_known_warnings()
        where = {"filename": "_pytree.py", "lineno": 21, "module": "pytorch_lightning.utilities._pytree"}
        warnings.warn_explicit(leafspec, FutureWarning, **where)
        warnings.warn_explicit(leafspec + " Soon.", FutureWarning, **where)  # a new message from the same place
        warnings.warn_explicit(leafspec, FutureWarning, "train.py", 1, module="my_project.train")  # user's code
        warnings.warn_explicit(leafspec, DeprecationWarning, **where)  # another category
    assert [(str(w.message), w.category, w.filename) for w in seen] == [
        (leafspec + " Soon.", FutureWarning, "_pytree.py"), (leafspec, FutureWarning, "train.py"),
        (leafspec, DeprecationWarning, "_pytree.py")]
