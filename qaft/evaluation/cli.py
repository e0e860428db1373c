"""``qaft-eval`` (and ``python -m qaft.evaluation.cli``): perplexity and lm-eval tasks on a run's deployed model or
any HF model, as ``conf/eval.yaml`` describes (the app: :mod:`qaft.evaluation.app`, imported only for a run).

``qaft-eval --help`` (``-h``) lists what evaluation reads, ``conf/eval.yaml``'s keys and the ``model`` presets, and
none of training's groups, without loading torch (:mod:`qaft.cli_help`); Hydra's own flags (``--cfg job``,
``--info``) work as in any Hydra app.

Exit status: 0 done; 2 bad input (an unknown task, a missing run folder or model, nothing asked for: one line);
4 the run folder is in use by another process.
"""
from __future__ import annotations

import sys

from qaft import cli_help
from qaft.paths import conf_dir

CONF_DIR = str(conf_dir())
USAGE = "usage: qaft-eval [run_dir=RUN | model=PRESET] [key=value ...] [--cfg job]"
ABOUT = ("Scores a qaft-train run's deployed model (run_dir=; results into its record) or any Hugging Face model, "
         "optionally after RTN / GPTQ / SmoothQuant PTQ (ptq.algorithm=). It scores what it is asked to: the lm-eval "
         "tasks, and perplexity only without tasks or with perplexity.enabled=true; a perplexity is printed with "
         "its window length and token count (the run's own table uses 512-token windows, qaft-eval 2,048: the same "
         "model scores differently).")


def help_text() -> str:
    """``qaft-eval --help``: the keys of ``conf/eval.yaml`` as written, the model presets, the README's examples."""
    eval_yaml = conf_dir() / "eval.yaml"
    return cli_help.page(USAGE, cli_help.wrap(ABOUT), cli_help.groups_section(cli_help.group_options(["model"])),
                         cli_help.section(f"Keys (key=value; defaults and meaning from {eval_yaml.name})",
                                          cli_help.config_body(eval_yaml)),
                         cli_help.examples_section("qaft-eval"))


def main() -> None:
    """Console entry point (see the module doc for exit statuses)."""
    if cli_help.wants_help(sys.argv[1:]):
        print(help_text(), end="")
        return
    from qaft.evaluation.app import main as run

    run()


if __name__ == "__main__":
    main()
