"""One ``--help`` convention for the four tools: ``--help`` and ``-h`` exit 0 with a page that names what the tool
reads (groups, experiments, keys) and the README's examples, in a process that never imports torch or
transformers; ``qaft-export`` and ``qaft-report`` refuse a Hydra flag in one line naming ``--help``."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qaft.cli_help import readme_examples
from qaft.paths import conf_dir, experiments_dir

MAINS = {"qaft-train": "qaft.training.cli", "qaft-eval": "qaft.evaluation.cli", "qaft-export": "qaft.deploy.cli",
         "qaft-report": "qaft.reporting.cli"}
# Run as the console script does (sys.argv, then main()), for each flag; report the pages and the heavy imports.
PROBE = """
import contextlib, io, json, sys
from {module} import main
pages = {{}}
for flag in ("--help", "-h"):
    sys.argv, out = ["{tool}", flag], io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main()
    pages[flag] = [code or 0, out.getvalue()]
print(json.dumps({{"pages": pages, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}}))
"""


def _help_pages(tool: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE.format(module=MAINS[tool], tool=tool)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["heavy"] == [], f"{tool} --help imported {result['heavy']}"
    (code, page), (short_code, short_page) = result["pages"]["--help"], result["pages"]["-h"]
    assert code == short_code == 0 and page == short_page
    for example in readme_examples(tool):
        assert example in page
    return page


def _names(folder) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def test_train_help_lists_every_group_option_and_experiment_of_both_folders():
    page = _help_pages("qaft-train")
    for group in ("method", "quant", "model", "data", "trainer", "scale", "logger"):
        line = next(line for line in page.splitlines() if line.split()[:1] == [group])
        assert all(option in line for option in _names(conf_dir() / group)), line
    for name in _names(conf_dir() / "experiment") + _names(experiments_dir() / "experiment"):
        assert name in page
    assert "groupwise" in page and "slurm_ddp" in page and readme_examples("qaft-train")


def test_eval_help_shows_what_evaluation_reads_and_no_training_group():
    page = _help_pages("qaft-eval")
    for key in ("run_dir:", "ptq:", "perplexity:", "enabled:", "seq_len:", "tasks:", "lm_eval:", "output:"):
        assert key in page
    assert "tiny-llama" in page  # the model presets eval.yaml composes
    for training_only in ("quant ", "trainer ", "method ", "data ", "experiment"):
        assert not any(line.strip().startswith(training_only) for line in page.splitlines()), training_only


@pytest.mark.parametrize("tool, keys", [
    ("qaft-export", ("RUN_DIR", "format", "out", "dtype", "approximate", "allow_float", "overwrite")),
    ("qaft-report", ("spec", "claims", "runs", "out", "archive", "wandb")),
])
def test_key_value_tools_list_each_argument_on_one_line_and_refuse_hydra_flags(tool, keys, capsys):
    page = _help_pages(tool)
    listed = {line.split()[0] for line in page.splitlines() if line.startswith("  ") and line.split()}
    assert set(keys) <= listed
    module = __import__(MAINS[tool], fromlist=["main"])
    try:
        code = module.main(["--cfg", "job"])
    except SystemExit as done:
        code = done.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"see {tool} --help" in err[0] and "--cfg" in err[0], err
