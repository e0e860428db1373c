"""The files of a claims report: ``claims.json`` (the source of truth), ``claims.csv``, ``claims.md`` and the
forest plot ``claims.png``, one row per claim (:func:`qaft.reporting.claims.evaluate` makes the rows).

Every file is a pure function of the rows (no dates, no library version stamps), so a rerun on the same records
rewrites the same bytes.

Claims with a ``paper:`` field (:mod:`qaft.reporting.claims_paper`) add ``paper_*`` entries to their rows; the
files show them only where some claim of the set has them (``claims.csv`` gains the :data:`PAPER_COLUMNS`,
``claims.md`` the paper's a, b and effect and, under Sources, its table, model and protocol; the forest plot
marks the paper's effect with a cross), so a claim set without papers' numbers writes what it always wrote.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from qaft.reporting.claims_paper import Protocol

COLUMNS = ["id", "verdict", "effect", "ci_low", "ci_high", "unit", "n_seeds", "seeds_a", "seeds_b", "n_items",
           "paired_seeds", "metric", "better", "note"]
PAPER_COLUMNS = ["paper_a", "paper_b", "paper_effect", "paper_in_ci", "paper_table", "paper_model", "paper_protocol"]


def _number(value: Any, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def seed_counts(r: dict[str, Any]) -> tuple[int, int]:
    """Seeds of side a and side b (rows written before the per-side counts: ``n_seeds`` for both)."""
    return r.get("seeds_a", r["n_seeds"]), r.get("seeds_b", r["n_seeds"])


def seeds_text(r: dict[str, Any]) -> str:
    """``3``, or ``3 / 1`` (a / b) where the sides have different numbers of seeds (RTN PTQ: one run for all)."""
    a, b = seed_counts(r)
    return str(a) if a == b else f"{a} / {b}"


def _has_paper(rows: list[dict[str, Any]]) -> bool:
    return any("paper_effect" in r for r in rows)


def _paper_cells(r: dict[str, Any]) -> str:
    inside = {True: "yes", False: "no", None: "—"}[r.get("paper_in_ci")]
    return (f" {_number(r.get('paper_a'), 2)} | {_number(r.get('paper_b'), 2)} | {_number(r.get('paper_effect'))} |"
            f" {inside if 'paper_effect' in r else '—'} |")


def _paper_source(r: dict[str, Any]) -> str:
    """`` Paper: DL-QAT Table 1 ..., LLaMA2-7B; acc, 0-shot.`` (empty for a claim without the paper's numbers)."""
    if "paper_effect" not in r:
        return ""
    model = f", {r['paper_model']}" if r.get("paper_model") else ""
    return f" Paper: {r['paper_table']}{model}; {Protocol(**r['paper_protocol']).text()}."


def _markdown(rows: list[dict[str, Any]]) -> str:
    counts = pd.Series([r["verdict"] for r in rows]).value_counts()
    paper = _has_paper(rows)
    lines = ["# Claims: verdicts", "",
             ("Effect > 0: the claim's direction holds (perplexity: log ratio b/a, or a/b where higher is "
              "claimed better; accuracy: points a - b, or b - a where lower is). 95% bootstrap interval over "
              "seeds and eval items (qaft.reporting.bootstrap)."), "",
             "Verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()), ""]
    if paper:
        lines += [("Paper a / b: the paper's numbers for the two sides as printed (% or perplexity); paper effect: "
                   "theirs, computed as ours; in CI: whether it lies inside our interval. Table, model and "
                   "protocol under Sources."), ""]
    extra = (" paper a | paper b | paper effect | in CI |", " --- | --- | --- | --- |") if paper else ("", "")
    lines += ["| id | verdict | effect | 95% CI | unit | seeds (a / b) | items | note |" + extra[0],
              "| --- | --- | --- | --- | --- | --- | --- | --- |" + extra[1]]
    for r in rows:
        ci = f"[{_number(r['ci_low'])}, {_number(r['ci_high'])}]"
        lines.append(f"| {r['id']} | {r['verdict']} | {_number(r['effect'])} | {ci} | {r['unit']} | "
                     f"{seeds_text(r)} | {r['n_items']} | {r['note']} |" + (_paper_cells(r) if paper else ""))
    lines += ["", "## Sources", ""] + [f"* `{r['id']}`: {r['source']}{_paper_source(r)}" for r in rows]
    return "\n".join(lines) + "\n"


def _forest(rows: list[dict[str, Any]], path: Path) -> Path:
    """One panel per unit (log ratio, points): each claim's effect and interval, 0 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = sorted({r["unit"] for r in rows})
    heights = [sum(r["unit"] == u for r in rows) for u in units]
    fig, axes = plt.subplots(len(units), 1, figsize=(7, 1.2 + 0.22 * len(rows)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colours = {"held": "tab:green", "reversed": "tab:red", "inconclusive": "tab:gray", "missing": "white"}
    for ax, unit in zip(axes[:, 0], units):
        mine = [r for r in rows if r["unit"] == unit][::-1]
        for y, r in enumerate(mine):
            if r["effect"] is None:
                continue
            if r["ci_low"] is not None:
                ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=colours[r["verdict"]], linewidth=2)
            ax.plot([r["effect"]], [y], "o", color=colours[r["verdict"]], markeredgecolor="black", markersize=4)
        for y, r in enumerate(mine):
            if r.get("paper_effect") is not None:  # the paper's own effect, where the claim carries it
                ax.plot([r["paper_effect"]], [y], "x", color="tab:blue", markersize=5)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(mine)), [f"{r['id']} ({r['verdict']})" for r in mine], fontsize=6)
        ax.set_ylim(-0.7, len(mine) - 0.3)
        crosses = "; x: the paper's" if any(r.get("paper_effect") is not None for r in mine) else ""
        ax.set_xlabel(f"effect ({unit}; > 0: claim holds{crosses})", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})  # no version stamp: regenerated files stay equal
    plt.close(fig)
    return path


def write_outputs(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """The four files in ``out`` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"claims.{ext}" for ext in ("json", "csv", "md", "png")]
    paths[0].write_text(json.dumps(rows, indent=1) + "\n")
    columns = COLUMNS + (PAPER_COLUMNS if _has_paper(rows) else []) + ["source"]
    flat = [r | {"paper_protocol": Protocol(**r["paper_protocol"]).text()} if "paper_protocol" in r else r
            for r in rows]  # the protocol as the md writes it, not a dict's repr
    pd.DataFrame(flat, columns=columns).to_csv(paths[1], index=False)
    paths[2].write_text(_markdown(rows))
    _forest(rows, paths[3])
    return paths
