"""``qaft-report``: the tables and plots of report specs, from a run store (see :mod:`qaft.reporting.tables`).

Arguments are ``key=value``, like ``qaft-train``, ``qaft-eval`` and ``qaft-export``::

    qaft-report spec='experiments/reports/*.yaml' runs=runs out=results/tiny archive=results/tiny/records.jsonl
    qaft-report spec='experiments/reports/*.yaml' runs=results/tiny/records.jsonl out=results/tiny  # same tables
    qaft-report claims='experiments/claims/*.yaml' runs=results/tiny/records.jsonl out=results/tiny  # verdicts

Exit status: 0 done; 2 bad arguments or a bad claim file (one line on stderr, nothing written).
"""
from __future__ import annotations

import glob
import sys
import textwrap
from pathlib import Path

import yaml

from qaft.paths import experiments_dir
from qaft.quiet import silence_third_party_noise

silence_third_party_noise()  # known library noise out of the output (qaft.quiet)
USAGE = ("usage: qaft-report spec=PATTERN[,PATTERN...] | claims=PATTERN[,PATTERN...] [runs=runs] [out=results] "
         "[archive=FILE.jsonl] [wandb=ENTITY/PROJECT|FOLDER]")
KEYS = {
    "spec": "report spec YAML files: globs or paths, comma-separated, expanded by qaft-report (quote them); "
            "'experiments/...' falls back to the specs installed with qaft",
    "claims": "claim YAML files (globs or paths, comma-separated, as spec=): each claim's effect, 95% bootstrap "
              "interval and verdict as claims.md/.csv/.json/.png in out= (qaft.reporting.claims)",
    "runs": "run store: a folder of run folders, or a records .jsonl (default: runs); 'runs=' (empty): none, "
            "e.g. to build the tables from wandb alone",
    "out": "folder for the tables and plots (default: results)",
    "archive": "also write the specs' run records to this .jsonl file (a run store that runs= accepts, small "
               "enough to commit beside the tables)",
    "wandb": "also read runs from this wandb project (entity/project), or from the wandb run files under this "
             "folder (runs of logger=wandb, offline or not yet synced)",
}
DEFAULTS = {"runs": "runs", "out": "results", "archive": None, "wandb": None}


class UsageError(ValueError):
    """A bad command line: reported in one line, exit status 2."""


def _help() -> str:
    from qaft.reporting import tables

    keys = "\n".join(textwrap.fill(text, 110, initial_indent=f"  {key:<8} ", subsequent_indent=" " * 11)
                     for key, text in KEYS.items())
    return f"{USAGE}\n\n{keys}\n\n{tables.__doc__}"


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
    if not patterns and not claim_patterns:
        raise UsageError("missing spec=... (report spec YAML files, e.g. spec='experiments/reports/*.yaml') "
                         "or claims=... (e.g. claims='experiments/claims/*.yaml')")
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


def run(args: dict[str, object]) -> None:
    from qaft.reporting.tables import archive_runs, load_store, report

    specs: list[Path] = args["spec"]  # type: ignore[assignment]
    checked = None
    if args.get("claims"):  # checked before any table is written: a bad claim file writes nothing
        from qaft.reporting.claims import prepare

        checked = prepare(args["claims"], args["runs"])  # type: ignore[arg-type]
    frame = load_store(args["runs"], args["wandb"]) if specs else None  # type: ignore[arg-type]
    for spec in specs:
        for path in report(spec, None, args["out"], frame=frame):  # type: ignore[arg-type]
            print(path)
    if args["archive"]:
        wheres = [(yaml.safe_load(spec.read_text()) or {}).get("where", {}) for spec in specs]
        print(archive_runs(args["runs"], args["archive"], wheres))  # type: ignore[arg-type]
    if checked is not None:
        from qaft.reporting.claims import report_claims

        for path in report_claims(*checked, args["out"]):  # type: ignore[arg-type]
            print(path)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``qaft-report key=value ...`` (``--help`` for the keys)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(_help())
        return
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"qaft-report: {err}; see qaft-report --help", file=sys.stderr)
        sys.exit(2)
    from qaft.reporting.claims import ClaimError

    try:
        run(args)
    except ClaimError as err:
        print(f"qaft-report: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
