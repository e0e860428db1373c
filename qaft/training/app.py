"""The ``qaft-train`` Hydra app behind :mod:`qaft.training.cli`: validate the composed config, then run it.

Imported only when a run is asked for (``--help`` never loads it), and by a launcher that runs sweep jobs in
other processes (submitit), which unpickles :func:`_main` from here: so the resolvers and method schemas that
``conf/train.yaml`` needs are registered when this module loads. Exit statuses: :mod:`qaft.training.cli`.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from qaft.paths import conf_dir
from qaft.quiet import silence_third_party_noise
from qaft.run_folder import RunFolder, Status
from qaft.training.config import ConfigError, register_conf, validate
from qaft.training.run_dir import EXIT_INVALID, RunFolderGuard, discard_run_dir, refuse
from qaft.training.sweep_cleanup import SweepCleanup
from qaft.training.sweep_summary import SweepSummary

# Absolute, because Hydra resolves a relative path against the calling module.
CONF_DIR = str(conf_dir())
# conf/train.yaml's ${qaft.*} resolvers. Here, when the Hydra app loads, not in main(): a launcher that runs
# sweep jobs in other processes (submitit, on a cluster) recomposes each job's config there after unpickling
# _main, which imports this module but never calls main(). (Importing qaft itself registers nothing.)
register_conf()
silence_third_party_noise()  # known library noise out of the log (qaft.quiet); here for the same reason


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the deployed model's perplexity (for sweepers that optimise it)."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        spec = RunFolderGuard.take_spec() or validate(cfg)  # a single run was validated before its folder existed
    except ConfigError as err:
        discard_run_dir()
        if multirun:
            raise  # one bad sweep point is reported at the sweep's end; the others still run
        refuse(f"invalid config: {err}", EXIT_INVALID)
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
                discard_run_dir()
            if multirun:
                raise
            refuse(str(err), ended.exit_code)
        if multirun and ended.status != Status.INTERRUPTED:
            raise
        if ended.status == Status.INTERRUPTED:
            refuse(f"{ended.error}; rerun the same command to resume", ended.exit_code)
        refuse(f"run {ended.status}: {type(err).__name__}: {err} (record: {RunFolder(run_dir_of(cfg)).record_path})",
              ended.exit_code)
    return deployed_perplexity(metrics) if metrics else None


def hydra_error_line(err: BaseException) -> str:
    """Hydra's (or OmegaConf's) error about the command line or the config files, as one line that names the key,
    option or override (Hydra's own report is 6-22 lines: the message, its cause, the options, the search path)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0].rstrip(".") if lines else type(err).__name__
    if isinstance(err, OverrideParseException):
        text = f"{err.override}: {text}"
    if isinstance(err, MissingConfigException) and err.options:
        text += f"; available: {', '.join(err.options)}"
    cause = str(err.__cause__ or "").strip()
    if cause:
        text += f": {cause.splitlines()[0]}"
    hint = next((line for line in lines[1:] if line.startswith("To append")), None)
    return f"{text} ({hint[0].lower()}{hint[1:]})" if hint else text


def _exit_for(err: Exception, full_error: bool) -> None:
    """Exit with one line for an error that reached ``main()`` (Hydra's own, or a sweep's first failed job, which
    Hydra re-raises at the sweep's end after naming the job); return, for a plain traceback, only where the user
    asked for one (``HYDRA_FULL_ERROR``) and the error is no refusal."""
    from qaft.training.outcomes import outcome

    if isinstance(err, ConfigError):
        refuse(f"invalid config: {err}", EXIT_INVALID)
    ended = outcome(err)
    if ended.status is None:  # the folder busy: nothing was written
        refuse(str(err), ended.exit_code)
    if full_error:
        return
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        refuse(f"invalid config: {hydra_error_line(err)}", EXIT_INVALID)
    refuse(f"{ended.status}: {type(err).__name__}: {err} (HYDRA_FULL_ERROR=1 shows the traceback)", ended.exit_code)


@contextlib.contextmanager
def _hydra_errors_raised() -> Iterator[bool]:
    """Hydra prints its own errors (6-22 lines, exit 1) unless ``HYDRA_FULL_ERROR=1``; set, they reach ``main()``
    as exceptions. Yields whether the user had set it (they then get the traceback of anything not refused)."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield before == "1"
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def main() -> None:
    """Run the app (exit statuses: :mod:`qaft.training.cli`)."""
    with _hydra_errors_raised() as full_error:
        try:
            _main()
            SweepSummary.report()  # a sweep's table of jobs; nothing after a single run
        except SystemExit as done:
            SweepSummary.report()
            if done.code not in (0, None):
                SweepCleanup.after_failure()
            raise
        except Exception as err:
            SweepSummary.report()  # before the line about the first failed job
            SweepCleanup.after_failure()
            _exit_for(err, full_error)
            raise
        except BaseException:
            SweepSummary.report()
            SweepCleanup.after_failure()
            raise

