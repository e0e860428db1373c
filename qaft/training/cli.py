"""``qaft-train`` (and ``python -m qaft.training.cli``): validate the composed config, then run it.

With no arguments this is the main job: L4Q at int4, groups of 64, on SmolLM2-135M fine-tuned on Austen,
ending with a float / PTQ / L4Q perplexity table. ``qaft-train -m method.bits=4,3 method.init=minmax,l4q,mse``
sweeps; ``hydra/launcher=slurm`` sends each sweep job to a cluster as a DDP run. ``qaft-train --help`` (``-h``)
lists the config groups, their options and the experiments, without loading torch (:mod:`qaft.cli_help`);
Hydra's own flags (``--cfg job``, ``--info``, ``--hydra-help``) work as in any Hydra app.

Exit status: 0 ``ok``; 1 ``failed``; 2 invalid config (one line, nothing written: a single run is validated before
Hydra makes its folder, :mod:`qaft.training.run_dir`; an unknown key or option, or an override Hydra cannot parse,
is the same one line); 3 ``diverged``; 4 the run folder is in use by another process; 128 + signal
``interrupted`` (resumable). In a sweep, a job that did not finish does not stop the others; the sweep ends with a
table of its jobs (:mod:`qaft.training.sweep_summary`) and exits 0 only where every job ended ``ok`` (else with the
status of the first that did not).

The app itself is :mod:`qaft.training.app`, imported only once a run is asked for.
"""
from __future__ import annotations

import sys

from qaft import cli_help
from qaft.paths import conf_dir

# Absolute, because Hydra resolves a relative path against the calling module.
CONF_DIR = str(conf_dir())
ABOUT = ("Trains, merges and evaluates one run (or, with -m, a sweep) as the composed Hydra config says. With no "
         "arguments: the main job, L4Q at int4, groups of 64, on SmolLM2-135M fine-tuned on Austen, ending with a "
         "float / PTQ / L4Q perplexity table. Every run writes into runs_root/<readable name>-<digest>; a rerun of "
         "the same command resumes it.")
USAGE = ("usage: qaft-train [group=option ...] [key=value ...] [+new.key=value] [-m key=a,b,c ...] "
         "[--cfg job] [--hydra-help]")


def help_text() -> str:
    """``qaft-train --help``: the groups and their options, the experiments, the top-level keys, the examples."""
    keys = cli_help.section("Other keys (key=value; qaft-train --cfg job prints them all with their values)",
                            [", ".join(cli_help.top_level_keys(conf_dir() / "train.yaml"))])
    return cli_help.page(USAGE, cli_help.wrap(ABOUT), cli_help.groups_section(cli_help.group_options()),
                         cli_help.experiments_section(), keys, cli_help.examples_section("qaft-train"))


def main() -> None:
    """Console entry point (see the module doc for exit statuses)."""
    if cli_help.wants_help(sys.argv[1:]):
        print(help_text(), end="")
        return
    from qaft.training.app import main as run

    run()


if __name__ == "__main__":
    main()
