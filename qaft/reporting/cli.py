"""``qaft-report``: the tables and plots of report specs, or one table of every run, from a run store (see
:mod:`qaft.reporting.tables` and :mod:`qaft.reporting.runs_table`).

Arguments are ``key=value``, like ``qaft-export`` (and the overrides of ``qaft-train`` / ``qaft-eval``)::

    qaft-report runs=runs                              # every run of the store: one table, printed (out=: also saved)
    qaft-report spec='experiments/reports/*.yaml' runs=runs out=results/tiny archive=results/tiny/records.jsonl
    qaft-report spec='experiments/reports/*.yaml' runs=results/tiny/records.jsonl out=results/tiny  # same tables
    qaft-report claims='experiments/claims/*.yaml' runs=results/tiny/records.jsonl out=results/tiny  # verdicts

``--help`` (``-h``) answers without torch (:mod:`qaft.cli_help`); a Hydra flag (``--cfg job``) is refused in one
line that names ``--help``.

Exit status: 0 done; 1 a spec matched no run of the store (named on stderr; its tables are not written, the other
specs' are); 2 bad arguments or a bad claim file (one line on stderr, nothing written).
"""
from __future__ import annotations

import ast
import glob
import sys
from importlib.util import find_spec
from pathlib import Path

import yaml

from qaft import cli_help
from qaft.paths import experiments_dir
from qaft.quiet import silence_third_party_noise

silence_third_party_noise()  # known library noise out of the output (qaft.quiet)
USAGE = ("usage: qaft-report [spec=PATTERN[,PATTERN...] | claims=PATTERN[,PATTERN...]] [runs=runs] [out=FOLDER] "
         "[archive=FILE.jsonl] [wandb=ENTITY/PROJECT|FOLDER]")
KEYS = {  # qaft-report --help: one line each
    "spec": "report spec YAMLs (globs/paths, comma-separated, quoted); none: one table of every run in runs=",
    "claims": "claim YAMLs (as spec=): each claim's effect, 95% interval and verdict as claims.* in out=",
    "runs": "run store: a folder of run folders or a records .jsonl (default: runs); 'runs=': none (wandb only)",
    "out": "folder for what is written (default: results for specs/claims; without a spec: print only)",
    "archive": "also write the specs' run records to this .jsonl (a run store runs= accepts, small to commit)",
    "wandb": "also read runs from a wandb project (entity/project) or the wandb run files under a folder",
}
DEFAULTS = {"runs": "runs", "out": None, "archive": None, "wandb": None}
RESULTS = "results"  # where spec and claim outputs go without out=
EXIT_NO_MATCH = 1


class UsageError(ValueError):
    """A bad command line: reported in one line, exit status 2."""


def _spec_format() -> str:
    """What a report spec holds: :mod:`qaft.reporting.tables`' docstring, read from its file (importing it would
    import pandas and torch)."""
    origin = find_spec("qaft.reporting.tables").origin  # type: ignore[union-attr]
    return ast.get_docstring(ast.parse(Path(str(origin)).read_text())) or ""


def help_text() -> str:
    """``qaft-report --help``: usage, each key on one line, the README's examples, what a report spec holds."""
    keys = [f"{key:<8} {text}" for key, text in KEYS.items()]
    return cli_help.page(USAGE, cli_help.section("Arguments (key=value)", keys),
                         cli_help.examples_section("qaft-report"), "Report specs: " + _spec_format())


def _legacy(argv: list[str]) -> list[str]:
    """``--spec a.yaml b.yaml --runs runs`` (the old flags) as ``spec=a.yaml,b.yaml runs=runs``."""
    out: list[str] = []
    key: str | None = None
    values: list[str] = []

    def flush() -> None:
        if key is not None:
            if not values:
                raise UsageError(f"--{key} needs a value")
            out.append(f"{key}={','.join(values)}")

    for arg in argv:
        if arg.startswith("--"):
            flush()
            key, _, value = arg[2:].partition("=")
            values = [value] if value else []
        elif key is not None and (key == "spec" or not values):
            values.append(arg)
        else:
            flush()
            key, values = None, []
            out.append(arg)
    flush()
    return out


def parse_args(argv: list[str]) -> dict[str, object]:
    """``key=value`` arguments as ``{"spec": [paths], "runs": ..., "out": ..., "archive": ..., "wandb": ...}``."""
    args: dict[str, object] = dict(DEFAULTS)
    patterns: list[str] = []
    claim_patterns: list[str] = []
    for arg in _legacy(argv):
        key, eq, value = arg.partition("=")
        if not eq:
            raise UsageError(f"expected key=value, got {arg!r}")
        if key not in KEYS:
            raise UsageError(f"unknown key {key!r} (keys: {', '.join(KEYS)})")
        if key == "spec":
            patterns += [p.strip() for p in value.split(",") if p.strip()]
        elif key == "claims":
            claim_patterns += [p.strip() for p in value.split(",") if p.strip()]
        elif key == "runs" and value == "":
            args[key] = None
        else:
            args[key] = value if value not in ("", "null", "None") else DEFAULTS[key]
    if args["archive"] and args["runs"] is None:
        raise UsageError("archive= writes the records of the local run store: it needs runs=")
    if claim_patterns and args["runs"] is None:
        raise UsageError("claims= tests claims against run records: it needs runs=")
    if not patterns and not claim_patterns and args["runs"] is None and args["wandb"] is None:
        raise UsageError("nothing to report: no spec=, claims=, runs= or wandb=")
    args["spec"] = expand_specs(patterns)
    args["claims"] = expand_specs(claim_patterns, "claims")
    return args


def _matches(pattern: str) -> list[str]:
    if glob.has_magic(pattern):
        return sorted(glob.glob(pattern, recursive=True))
    return [pattern] if Path(pattern).is_file() else []


def expand_specs(patterns: list[str], what: str = "spec") -> list[Path]:
    """Each pattern's files (sorted), in the order given, each file once. A relative ``experiments/...``
    pattern that matches nothing here is looked up among the specs installed with qaft."""
    found: list[Path] = []
    for pattern in patterns:
        paths = _matches(pattern)
        parts = Path(pattern).parts
        if not paths and not Path(pattern).is_absolute() and parts[:1] == ("experiments",):
            paths = _matches(str(experiments_dir().joinpath(*parts[1:])))
        if not paths:
            raise UsageError(f"{what} {pattern!r} matches no file")
        found += [Path(p) for p in paths if Path(p) not in found]
    return found


def all_runs(args: dict[str, object]) -> int:
    """Without a spec: the table of every run in the store, printed, and written to ``out=`` when given."""
    from qaft.reporting.runs_table import render, runs_table, write_runs_table
    from qaft.reporting.tables import load_store

    store = str(args["runs"] or args["wandb"])
    if args["runs"] and not Path(str(args["runs"])).exists():
        raise UsageError(f"runs={args['runs']}: no such run store")
    table, same = runs_table(load_store(args["runs"], args["wandb"]))  # type: ignore[arg-type]
    text = render(table, same, store)
    print(text, end="")
    if args["out"]:
        for path in write_runs_table(text, table, Path(str(args["out"]))):
            print(path)
    return 0


def run(args: dict[str, object]) -> int:
    """Write what ``args`` ask for; the exit status (:data:`EXIT_NO_MATCH` where a spec matched no run)."""
    from qaft.reporting.tables import archive_runs, load_store, report, select_runs

    specs: list[Path] = args["spec"]  # type: ignore[assignment]
    if not specs and not args.get("claims"):
        return all_runs(args)
    out = args["out"] or RESULTS
    checked = None
    if args.get("claims"):  # checked before any table is written: a bad claim file writes nothing
        from qaft.reporting.claims import prepare

        checked = prepare(args["claims"], args["runs"])  # type: ignore[arg-type]
    frame = load_store(args["runs"], args["wandb"]) if specs else None  # type: ignore[arg-type]
    status = 0
    for spec in specs:
        where = (yaml.safe_load(spec.read_text()) or {}).get("where", {})
        if select_runs(frame, where).empty:  # type: ignore[arg-type]
            store = " + ".join(str(s) for s in (args["runs"], args["wandb"]) if s)
            print(f"qaft-report: spec {spec} matches no run in {store} (where: {where}): its tables are not written",
                  file=sys.stderr)
            status = EXIT_NO_MATCH
            continue
        for path in report(spec, None, out, frame=frame):  # type: ignore[arg-type]
            print(path)
    if args["archive"]:
        wheres = [(yaml.safe_load(spec.read_text()) or {}).get("where", {}) for spec in specs]
        print(archive_runs(args["runs"], args["archive"], wheres))  # type: ignore[arg-type]
    if checked is not None:
        from qaft.reporting.claims import report_claims

        for path in report_claims(*checked, out):  # type: ignore[arg-type]
            print(path)
    return status


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``qaft-report key=value ...`` (``--help`` for the keys)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if cli_help.wants_help(argv):
        print(help_text(), end="")
        return
    if flag := cli_help.hydra_flag(argv):
        print(cli_help.refuse_hydra_flag("qaft-report", flag), file=sys.stderr)
        sys.exit(2)
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"qaft-report: {err}; see qaft-report --help", file=sys.stderr)
        sys.exit(2)
    from qaft.reporting.claims import ClaimError

    try:
        status = run(args)
    except (ClaimError, UsageError) as err:
        print(f"qaft-report: {err}", file=sys.stderr)
        sys.exit(2)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
