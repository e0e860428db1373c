"""The README's findings, generated from a claims report, so that no verdict is ever written by hand.

``claims.json`` (:mod:`qaft.reporting.claims`, one row per claim with its ``verdict``, ``effect`` and 95%
interval) is the source of truth; :func:`render` turns it into the markdown list the README shows between
:data:`BEGIN` and :data:`END`: the counts per verdict, then every ``held`` and ``reversed`` claim with its effect
and interval, then the ``inconclusive`` and ``missing`` ones. Prose around the block may explain a verdict; the
block itself is rewritten, never edited (``tests/docs`` fails when README's block is not :func:`render`'s)::

    python -m qaft.reporting.findings results/tiny/claims.json README.md
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from qaft.reporting.claims_output import seed_counts, seeds_text

BEGIN = ("<!-- findings:begin: generated from results/tiny/claims.json by "
         "`python -m qaft.reporting.findings results/tiny/claims.json README.md`; do not edit -->")
END = "<!-- findings:end -->"
ORDER = ("held", "reversed", "inconclusive", "missing")
FOLDED = frozenset({"inconclusive", "missing"})


class FindingsError(ValueError):
    """A README without exactly one findings block, or a claims file that is not a claims report."""


def _number(value: Any) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.3f}"


def _line(row: dict[str, Any]) -> str:
    interval = (f", 95% CI [{_number(row['ci_low'])}, {_number(row['ci_high'])}]"
                if row.get("ci_low") is not None else ", no interval")
    a, b = seed_counts(row)
    seeds = f"{a} seed(s) a side" if a == b else f"{seeds_text(row)} seeds (a / b)"
    evidence = f"{seeds}, {row['n_items']} item(s)"
    note = f"; {row['note']}" if row.get("note") else ""
    return f"* `{row['id']}`: effect {_number(row['effect'])} {row['unit']}{interval} ({evidence}{note})"


def render(rows: list[dict[str, Any]]) -> str:
    """The findings block (without its markers) for the rows of a ``claims.json``."""
    unknown = sorted({r.get("verdict") for r in rows} - set(ORDER), key=str)
    if unknown:
        raise FindingsError(f"claims rows with unknown verdicts {unknown}")
    by_verdict = {v: [r for r in rows if r["verdict"] == v] for v in ORDER}
    counts = ", ".join(f"{len(by_verdict[v])} {v}" for v in ORDER)
    head = (f"Verdicts of the {len(rows)} claims on `results/tiny/records.jsonl`: {counts}. Effect > 0 is the "
            "claimed direction (perplexity: log ratio; accuracy: points); a claim is `held` or `reversed` only "
            "when its 95% bootstrap interval over seeds and eval items excludes 0.")
    lines = [head, ""]
    for verdict in ORDER:
        mine = by_verdict[verdict]
        title = f"{verdict.capitalize()} ({len(mine)})"
        if not mine:
            lines += [f"**{title}**: none.", ""]
        elif verdict in FOLDED:  # the long tail stays one click away, so the verdicts that decide stay in view
            lines += [f"<details><summary>{title}</summary>", ""] + [_line(r) for r in mine] + ["", "</details>", ""]
        else:
            lines += [f"**{title}**:"] + [_line(r) for r in mine] + [""]
    return "\n".join(lines).rstrip("\n")


def block(text: str) -> tuple[int, int]:
    """Where README's generated block lies: the offsets just after :data:`BEGIN` and at :data:`END`."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise FindingsError(f"README needs exactly one findings block: {BEGIN!r} ... {END!r}")
    return text.index(BEGIN) + len(BEGIN), text.index(END)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``claims.json`` (a list of objects, each with at least ``id`` and ``verdict``)."""
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"id", "verdict"} <= set(r) for r in rows):
        raise FindingsError(f"{path}: not a claims report (a list of objects with id and verdict)")
    return rows


def updated(readme: str, rows: list[dict[str, Any]]) -> str:
    """``readme`` with its findings block replaced by :func:`render` of ``rows``."""
    start, end = block(readme)
    return readme[:start] + "\n" + render(rows) + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m qaft.reporting.findings CLAIMS_JSON README_MD", file=sys.stderr)
        return 2
    try:
        readme = Path(args[1]).read_text()
        new = updated(readme, read_rows(args[0]))
    except (OSError, ValueError) as err:
        print(f"findings: {err}", file=sys.stderr)
        return 2
    if new != readme:
        Path(args[1]).write_text(new)
    print(f"{args[1]}: findings block {'rewritten' if new != readme else 'unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
