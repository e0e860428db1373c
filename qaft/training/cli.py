"""``qaft-train`` (and ``python -m qaft.training.cli``): validate the composed config, then run it.

With no arguments this is the main job: L4Q at int4, groups of 64, on SmolLM2-135M fine-tuned on Austen,
ending with a float / PTQ / L4Q perplexity table. ``qaft-train -m method.bits=4,3 method.init=minmax,l4q,mse``
sweeps; ``hydra/launcher=slurm`` sends each sweep job to a cluster as a DDP run.

Exit status: 0 ``ok``; 1 ``failed``; 2 invalid config (one line, nothing written); 3 ``diverged``; 4 the run
folder is in use by another process; 128 + signal ``interrupted`` (resumable). In a sweep, a job that did not
finish does not stop the others; the sweep exits non-zero at the end.
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qaft.paths import conf_dir
from qaft.quiet import silence_third_party_noise
from qaft.run_folder import RunFolder, Status
from qaft.training.config import ConfigError, register_conf, validate
from qaft.training.sweep_cleanup import SweepCleanup

# Absolute, because Hydra resolves a relative path against the calling module.
CONF_DIR = str(conf_dir())
# conf/train.yaml's ${qaft.*} resolvers. Here, when the Hydra app loads, not in main(): a launcher that runs
# sweep jobs in other processes (submitit, on a cluster) recomposes each job's config there after unpickling
# _main, which imports this module but never calls main(). (Importing qaft itself registers nothing.)
register_conf()
silence_third_party_noise()  # known library noise out of the log (qaft.quiet); here for the same reason


def _fail(message: str, code: int) -> None:
    print(f"qaft-train: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the deployed model's perplexity (for sweepers that optimise it)."""
    from qaft.training.pipeline import discard_run_dir

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        spec = validate(cfg)
    except ConfigError as err:
        discard_run_dir(cfg.get("runs_root"))
        if multirun:
            raise  # one bad sweep point is reported by Hydra; the others still run
        _fail(f"invalid config: {err}", 2)
    # Imported only now: a config error should cost no more than the imports validation needs.
    from qaft.evaluation.deployed import deployed_perplexity
    from qaft.training.outcomes import outcome
    from qaft.training.pipeline import run, run_dir_of

    try:
        metrics = run(cfg, spec)
    except Exception as err:  # RunInterrupted too (it is not a KeyboardInterrupt): a sweep stops as a whole then
        ended = outcome(err)
        if ended.status is None:  # a checkpoint refused on resume, or the folder busy: nothing was written
            if isinstance(err, ConfigError):
                discard_run_dir(cfg.get("runs_root"))
            if multirun:
                raise
            _fail(str(err), ended.exit_code)
        if multirun and ended.status != Status.INTERRUPTED:
            raise
        if ended.status == Status.INTERRUPTED:
            _fail(f"{ended.error}; rerun the same command to resume", ended.exit_code)
        _fail(f"run {ended.status}: {type(err).__name__}: {err} (record: {RunFolder(run_dir_of(cfg)).record_path})",
              ended.exit_code)
    return deployed_perplexity(metrics) if metrics else None


def main() -> None:
    """Console entry point (see the module doc for exit statuses)."""
    try:
        _main()
    except SystemExit as done:
        if done.code not in (0, None):
            SweepCleanup.after_failure()
        raise
    except BaseException:
        SweepCleanup.after_failure()
        raise


if __name__ == "__main__":
    main()
