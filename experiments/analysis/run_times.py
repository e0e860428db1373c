"""What each sweep of a run archive cost: runs, seeds and the sum of the runs' own wall times, per experiment.

Reads the ``timings`` every run record carries (``total_s``: load, training and evaluation of that run, from the
process's start to its record). The sum is the sweep's cost run after run; runs that shared the machine (two
lanes on two cores) include the wait for it. Two kinds of run are counted apart and left out of the sum: runs whose
process was stopped for a while (``--paused`` names them by run folder), since their ``total_s`` counts the pause,
and resumed runs (``timings.resumed_at_step`` in their record; ``--resumed`` names those whose record predates the
field), since theirs counts only the last process.

    python experiments/analysis/run_times.py results/tiny/records.jsonl \\
        --resumed $(python experiments/analysis/run_times.py --find-resumed results/tiny/runs)
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from qaft.reporting.store import load_runs
from qaft.run_folder import RunFolder


def run_times(archive: Path, paused: Sequence[str] = (), resumed: Sequence[str] = ()) -> pd.DataFrame:
    """One row per experiment: runs, distinct seeds, sum and median of ``timings.total_s`` (minutes / seconds).

    ``archive`` is what a report reads: a ``records.jsonl`` archive or a run store (records checked alike)."""
    records = load_runs(archive)
    names = records["run_dir"].map(lambda d: Path(str(d)).name)
    stopped = names.isin(paused)
    was_resumed = names.isin(resumed)
    if "timings.resumed_at_step" in records:
        was_resumed |= records["timings.resumed_at_step"].notna()
    kept = records[~stopped & ~was_resumed]
    table = kept.groupby("experiment").agg(runs=("identity", "size"), seeds=("seed", "nunique"),
                                           total_min=("timings.total_s", lambda s: s.sum() / 60),
                                           median_run_s=("timings.total_s", "median"))
    for column, left_out in (("paused runs left out", stopped), ("resumed runs left out", was_resumed & ~stopped)):
        table[column] = records[left_out].groupby("experiment").size()
        table[column] = table[column].fillna(0).astype(int)
    return table.round(1)


def resumed_before_the_field(runs_root: Path) -> list[str]:
    """Run folders whose record predates ``timings.resumed_at_step`` but whose run was resumed: ``train_s`` (this
    process's training) under 80% of the step times ``metrics.jsonl`` logged (every process's steps)."""
    found = []
    for path in sorted(p for p in runs_root.iterdir() if p.is_dir()):
        folder = RunFolder(path)
        timings = (folder.read_record() or {}).get("timings")
        if not timings or "resumed_at_step" in timings:
            continue
        logged = sum(row.get("train/step_s", 0.0) for row in folder.read_metrics())
        if logged and timings.get("train_s", logged) < 0.8 * logged:
            found.append(path.name)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path, nargs="?",
                        help="records.jsonl written by qaft-report archive=, or a run store")
    parser.add_argument("--paused", nargs="*", default=[], help="run folder names whose timings include a pause")
    parser.add_argument("--resumed", nargs="*", default=[],
                        help="run folder names of runs resumed before their records said so (timings.resumed_at_step)")
    parser.add_argument("--find-resumed", type=Path, metavar="RUNS_ROOT",
                        help="print the run folders of RUNS_ROOT resumed before their records said so, and stop")
    args = parser.parse_args()
    if args.find_resumed:
        print(" ".join(resumed_before_the_field(args.find_resumed)))
        return
    if args.archive is None:
        parser.error("an archive or run store to sum (or --find-resumed RUNS_ROOT)")
    table = run_times(args.archive, args.paused, args.resumed)
    print(table.to_markdown())
    print(f"\nall: {int(table['runs'].sum())} runs, {table['total_min'].sum() / 60:.1f} h")


if __name__ == "__main__":
    main()
