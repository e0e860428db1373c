"""The end of a sweep (``qaft-train -m ...``): one line per job, its status, its headline metric and its folder.

A Hydra callback notes each job as it ends (:meth:`SweepSummary.on_job_end`): the status its record says, or, for a
job that left none (its config refused, its folder busy), why; and the deployed model's perplexity, the number
``qaft-train`` returns. ``qaft-train`` prints the table once the sweep is over, whether every job ended ``ok`` (exit
0) or not (Hydra then re-raises the first failure after running the rest, and ``qaft-train`` exits with its
status: :mod:`qaft.training.cli`). A sweep of more jobs than fit one screen shows every job that did not end ``ok``,
then as many ``ok`` ones as fit, and a count of the rest.

Jobs run by a launcher in other processes (``hydra/launcher=slurm``) end there, so this process cannot list them:
the table then says so and where their records are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qaft.run_folder import CorruptRun, RunFolder, Status

SCREEN_LINES = 30  # job lines in the table at most
NOTE_CHARS = 70
REFUSED = "refused"  # a job that wrote no record: its config or its folder was refused


@dataclass(frozen=True)
class JobLine:
    """One job of a sweep as the summary shows it."""

    number: int
    status: str
    metric: float | None
    folder: str
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == Status.OK.value


def _failure(error: Any) -> tuple[str, str]:
    """``(status, note)`` of a job that raised ``error`` (:func:`qaft.training.outcomes.outcome`)."""
    from qaft.training.outcomes import outcome  # a job has run: its imports are loaded already

    ended = outcome(error) if isinstance(error, BaseException) else None
    status = ended.status.value if ended is not None and ended.status is not None else REFUSED
    text = f"{type(error).__name__}: {error}".splitlines()[0] if error is not None else ""
    return status, text[:NOTE_CHARS]


def job_line(config: DictConfig, job_return: JobReturn) -> JobLine:
    """The summary line of a job that ended (``config``: its config, with its ``hydra`` node)."""
    folder = Path(str(config.hydra.runtime.output_dir))
    number = int(config.hydra.job.get("num", 0) or 0)
    if job_return.status != JobStatus.COMPLETED:
        status, note = _failure(job_return._return_value)
        try:
            record = RunFolder(folder).read_record() if status != REFUSED else None
        except CorruptRun:
            record = None
        status = str(record["status"]) if record else status
        return JobLine(number, status, None, folder.name, note)
    value = job_return.return_value
    metric = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return JobLine(number, Status.OK.value, metric, folder.name)


def render(lines: list[JobLine], root: str, screen: int = SCREEN_LINES) -> str:
    """The table: a header, the jobs (those not ``ok`` first where they do not all fit), a closing count."""
    failed = [line for line in lines if not line.ok]
    shown = lines if len(lines) <= screen else (failed + [line for line in lines if line.ok])[:screen]
    out = [f"sweep: {len(lines)} job{'s' * (len(lines) != 1)} in {root}",
           f"  {'job':>4}  {'status':<11}  {'ppl (deployed)':>14}  folder"]
    for line in sorted(shown, key=lambda j: j.number):
        metric = "-" if line.metric is None else f"{line.metric:.3f}"
        out.append(f"  {line.number:>4}  {line.status:<11}  {metric:>14}  {line.folder}")
        if line.note:
            out.append(f"  {'':>4}  {line.note}")
    if len(shown) < len(lines):
        out.append(f"  ... and {len(lines) - len(shown)} more {Status.OK}")
    out.append(f"sweep: every job ended {Status.OK}" if not failed else
               f"sweep: {len(failed)} of {len(lines)} jobs did not end {Status.OK} (exit status non-zero)")
    return "\n".join(out)


class SweepSummary(Callback):
    """Notes every job of a sweep as it ends (see the module doc); :meth:`report` prints the table once.

    State is on the class: Hydra instantiates its callbacks itself, and ``qaft-train``'s ``main()`` reads it."""

    root: str | None = None  # the sweep's folder while a sweep is on
    lines: ClassVar[list[JobLine]] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.root, SweepSummary.lines = str(config.hydra.sweep.dir), []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if SweepSummary.root is not None:
            SweepSummary.lines.append(job_line(config, job_return))

    @classmethod
    def report(cls) -> None:
        """Print the table of the sweep that just ended (nothing after a single run, or twice)."""
        root, cls.root = cls.root, None
        if root is None:
            return
        if not cls.lines:
            print(f"sweep: no job ended in this process (a launcher ran them elsewhere): their records are in {root}")
            return
        print(render(cls.lines, root), flush=True)


__all__ = ["JobLine", "SweepSummary", "job_line", "render"]
